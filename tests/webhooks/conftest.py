"""Fixtures of the outbound-events test: a receiver that verifies every delivery with the
`standardwebhooks` package, and a real `tally serve` (TALLY_BIN, default target/debug/tally of
the repository) whose catalog sends every event type to that receiver.

The gRPC stubs are generated here from proto/ with grpcio-tools' protoc into a temporary folder
(first on sys.path), so this suite depends on neither clients/python nor its installed package.
"""

import base64
import json
import os
import pathlib
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

ROOT = pathlib.Path(__file__).resolve().parents[2]
STRIPE_SECRET = "whsec_test_current"
HOOK_PATH = "/hooks/tally"


def _generate_stubs():
    out = pathlib.Path(tempfile.mkdtemp(prefix="tally-webhooks-stubs-"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"--python_out={out}",
         f"--grpc_python_out={out}", str(ROOT / "proto" / "tally" / "v1" / "credit_service.proto")],
        check=True,
    )
    sys.path.insert(0, str(out))
    return out


_STUBS = _generate_stubs()

from tally.v1 import credit_service_pb2 as pb  # noqa: E402
from tally.v1 import credit_service_pb2_grpc as pb_grpc  # noqa: E402

assert pathlib.Path(pb.__file__).resolve().is_relative_to(_STUBS.resolve()), pb.__file__


def pytest_unconfigure(config):
    shutil.rmtree(_STUBS, ignore_errors=True)


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Receiver:
    """POST /hooks/tally: each delivery is verified with standardwebhooks' Webhook(secret);
    verified ones are recorded in arrival order (redeliveries included), failures too."""

    def __init__(self, secret):
        self.secret = secret
        self.webhook = Webhook(secret)
        # A key that is not the endpoint's: a delivery that verifies under it too would mean
        # that verification checks nothing.
        self.wrong = Webhook("whsec_" + base64.b64encode(secrets.token_bytes(32)).decode())
        self.lock = threading.Lock()
        self.received = []  # (webhook-id, parsed body) per verified request, in arrival order
        self.bodies = {}  # webhook-id -> raw body of its first delivery
        self.failures = []  # why a request was refused or looked wrong
        self.refuse_once = set()  # accounts whose next delivery is answered 503
        self.refused = []  # (webhook-id, parsed body) of the deliveries answered 503
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                receiver.handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}{HOOK_PATH}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def handle(self, req):
        body = req.rfile.read(int(req.headers.get("content-length") or 0))
        headers = {k: req.headers.get(k) or "" for k in ("webhook-id", "webhook-timestamp", "webhook-signature")}
        wid = headers["webhook-id"]
        problems = []
        if req.path != HOOK_PATH:
            problems.append(f"POST to {req.path!r}")
        try:
            parsed = self.webhook.verify(body, headers)
        except WebhookVerificationError as e:
            parsed = None
            problems.append(f"standardwebhooks refused {wid!r}: {e}")
        if parsed is not None:
            try:
                self.wrong.verify(body, headers)
                problems.append(f"{wid!r} also verified under an unrelated secret")
            except WebhookVerificationError:
                pass
            if not wid.startswith("evt_"):
                problems.append(f"webhook-id {wid!r} does not start with evt_")
            if not (req.headers.get("content-type") or "").startswith("application/json"):
                problems.append(f"{wid!r}: content-type {req.headers.get('content-type')!r}")
        status = 400 if parsed is None else 204
        with self.lock:
            if parsed is not None:
                first = self.bodies.setdefault(wid, body)
                if first != body:
                    problems.append(f"{wid!r} redelivered with another body: {first!r} then {body!r}")
                account = (parsed.get("data") or {}).get("account_id") if isinstance(parsed, dict) else None
                if account in self.refuse_once:
                    # Answered 503: Tally must deliver the same event again (same id and body).
                    self.refuse_once.discard(account)
                    self.refused.append((wid, parsed))
                    status = 503
                else:
                    self.received.append((wid, parsed))
            self.failures.extend(problems)
        req.send_response(status)
        req.send_header("content-length", "0")
        req.end_headers()

    def start(self):
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def events(self, account):
        """The account's events, each once (its first delivery), in order of first receipt:
        (webhook-id, type, data)."""
        seen = set()
        out = []
        with self.lock:
            for wid, body in self.received:
                data = body.get("data") or {}
                if data.get("account_id") == account and wid not in seen:
                    seen.add(wid)
                    out.append((wid, body["type"], data))
        return out

    def all_bodies(self):
        with self.lock:
            return list(self.received)

    def wait(self, account, count, timeout=30):
        """The account's first `count` distinct events, once that many have arrived (fails
        after `timeout` seconds with what did arrive)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.events(account)
            if len(got) >= count:
                return got[:count]
            time.sleep(0.05)
        raise AssertionError(
            f"{account}: {count} events expected within {timeout}s, got "
            + json.dumps([(t, d) for _, t, d in self.events(account)], indent=1)
            + f"\nreceiver failures: {self.failures}"
        )


class Server:
    def __init__(self, binary, tmp, receiver_url, events_secret):
        out = subprocess.run([binary, "auth", "new-token"], check=True, capture_output=True, text=True).stdout
        fields = dict(line.split(None, 1) for line in out.splitlines() if line.strip())
        self.token = fields["token"].strip()
        (tmp / "callers.toml").write_text(
            f'[callers.webhooks]\nroles = ["generation", "admin"]\ntoken_sha256 = ["{fields["token_sha256"].strip()}"]\n'
        )
        catalog = (ROOT / "src" / "catalog.default.toml").read_text()
        free = catalog.index("[plans.free]")
        at = catalog.index("low_balance_threshold = 2\n", free)
        assert at < catalog.index("[plans.pro]"), "plans.free has no low_balance_threshold = 2"
        catalog = catalog[:at] + "low_balance_threshold = 100\n" + catalog[at + len("low_balance_threshold = 2\n"):]
        catalog += (
            '\n[events]\nexpiring_horizon = "7days"\n'
            f'[events.endpoints.app]\nurl = "{receiver_url}"\nsecret_env = "TALLY_TEST_EVENTS_SECRET"\n'
        )
        self.catalog = catalog
        (tmp / "catalog.toml").write_text(catalog)
        self.grpc_port, self.http_port, self.metrics_port = _free_ports(3)
        self.target = f"127.0.0.1:{self.grpc_port}"
        self.args = [
            binary, "serve",
            "--listen", self.target,
            "--http-listen", f"127.0.0.1:{self.http_port}",
            "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
            "--database-url", f"sqlite://{tmp}/t.db",
            "--callers-file", str(tmp / "callers.toml"),
            "--catalog", str(tmp / "catalog.toml"),
            "--events-allow-private",
            "--events-retry-schedule", "0s,1s,2s",
            "--events-poll-interval", "50ms",
            "--events-housekeeping-interval", "200ms",
            "--sweep-interval", "100ms",
            "--stripe-webhook-secret", STRIPE_SECRET,
        ]
        self.log_path = tmp / "server.log"
        self.log = open(self.log_path, "wb")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
        self.env["TALLY_TEST_EVENTS_SECRET"] = events_secret
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tally serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"tally serve did not become ready:\n{self.log_tail()}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, n=40):
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


@pytest.fixture(scope="session")
def events_secret():
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@pytest.fixture(scope="session")
def receiver(events_secret):
    r = Receiver(events_secret)
    r.start()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture(scope="session")
def server(request, receiver, events_secret):
    binary = os.environ.get("TALLY_BIN", str(ROOT / "target" / "debug" / "tally"))
    if not os.access(binary, os.X_OK):
        pytest.fail(f"no tally binary at {binary} (cargo build, or set TALLY_BIN)")
    with tempfile.TemporaryDirectory(prefix="tally-webhooks-") as d:
        s = Server(binary, pathlib.Path(d), receiver.url, events_secret)
        s.start()
        try:
            yield s
        finally:
            s.stop()
            if request.session.testsfailed:
                print(f"\n--- tally serve's log (last lines) ---\n{s.log_tail(80)}", file=sys.stderr)
            s.log.close()
