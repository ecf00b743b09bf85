#!/usr/bin/env python3
"""Outbound events' delivery latency (issue 28): commit to receipt, at a steady rate.

Starts `tally serve` (TALLY_BIN, default target/release/tally) on a fresh SQLite file, or on
DATABASE_URL when it is set (a PostgreSQL database this script may write to), with one event
endpoint: a receiver on loopback in this process. Drives AdminService.Grant at RATE calls/s
(default 100) for DURATION seconds (default 30) over 64 accounts (SERVER_FLAGS: more serve flags); each grant makes one credits.granted
event (each new account also an account.opened). Latency of an event = its receipt here minus
its body's `timestamp` (the change's transaction time, which is at or before its commit).
Prints p50, p90, p99 and max, and the rate reached, as one JSON line.

Run with the CI venv's python (grpcio, grpcio-tools): `$(bash .ci/python-venv) scripts/events-latency.py`.
"""

import json
import os
import pathlib
import secrets
import base64
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT = pathlib.Path(__file__).resolve().parents[1]
RATE = float(os.environ.get("RATE", "100"))
SECONDS = float(os.environ.get("DURATION", "30"))


def stubs(tmp):
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"--python_out={tmp}",
         f"--grpc_python_out={tmp}", str(ROOT / "proto/tally/v1/credit_service.proto")],
        check=True,
    )
    sys.path.insert(0, str(tmp))


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


received = {}
lock = threading.Lock()


class Hook(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        at = time.time()
        event_id = self.headers.get("webhook-id", "")
        with lock:
            if event_id not in received:
                ts = json.loads(body)["timestamp"]
                sent = datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
                received[event_id] = (at - sent) * 1000.0
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def pct(values, p):
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100.0 * (len(v) - 1))))]


def main():
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="tally-events-latency-"))
    stubs(tmp)
    import grpc
    from tally.v1 import credit_service_pb2 as pb
    from tally.v1 import credit_service_pb2_grpc as pb_grpc

    # A listen backlog for the dispatcher's 32 parallel posts (the default of 5 drops SYNs,
    # and each dropped one costs a 1 s retransmission).
    ThreadingHTTPServer.request_queue_size = 256
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{server.server_address[1]}/hooks"
    catalog = (ROOT / "src/catalog.default.toml").read_text()
    catalog += f'\n[events.endpoints.app]\nurl = "{hook}"\nsecret_env = "TALLY_BENCH_EVENTS_SECRET"\n'
    (tmp / "catalog.toml").write_text(catalog)
    grpc_port, http_port, metrics_port = free_ports(3)
    db = os.environ.get("DATABASE_URL") or f"sqlite://{tmp}/t.db"
    binary = os.environ.get("TALLY_BIN", str(ROOT / "target/release/tally"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env["TALLY_BENCH_EVENTS_SECRET"] = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    env.setdefault("RUST_LOG", "warn")
    log = open(tmp / "serve.log", "wb")
    proc = subprocess.Popen(
        [binary, "serve", "--listen", f"127.0.0.1:{grpc_port}", "--http-listen", f"127.0.0.1:{http_port}",
         "--metrics-listen", f"127.0.0.1:{metrics_port}", "--database-url", db,
         "--catalog", str(tmp / "catalog.toml"), "--events-allow-private",
         "--rate-limit-rps", "0", "--admin-rate-limit-rps", "0",
         *os.environ.get("SERVER_FLAGS", "").split()],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                raise SystemExit("tally serve did not become ready: " + (tmp / "serve.log").read_text()[-2000:])
            time.sleep(0.05)
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        admin = pb_grpc.AdminServiceStub(channel)
        run = uuid.uuid4().hex[:8]
        accounts = [f"lat-{run}-{i}" for i in range(64)]
        # Open the accounts first, so the measured window has one event per grant.
        for a in accounts:
            admin.Grant(pb.GrantRequest(account_id=a, amount=1, reason="warm-up",
                                        idempotency_key=f"w-{a}"), timeout=10)
        time.sleep(2)
        with lock:
            received.clear()
        start = time.time()
        n = 0
        futures = []
        while time.time() - start < SECONDS:
            due = start + n / RATE
            now = time.time()
            if due > now:
                time.sleep(due - now)
            futures.append(admin.Grant.future(pb.GrantRequest(
                account_id=accounts[n % len(accounts)], amount=1, reason="latency",
                idempotency_key=f"l-{run}-{n}"), timeout=10))
            n += 1
        for f in futures:
            f.result()
        sent_for = time.time() - start
        wait_until = time.time() + 30
        while time.time() < wait_until:
            with lock:
                if len(received) >= n:
                    break
            time.sleep(0.05)
        with lock:
            lat = list(received.values())
        out = {
            "backend": "postgres" if db.startswith("postgres") else "sqlite",
            "grants": n, "rate_per_s": round(n / sent_for, 1), "events_received": len(lat),
            "latency_ms": {"p50": round(pct(lat, 50), 1), "p90": round(pct(lat, 90), 1),
                           "p99": round(pct(lat, 99), 1), "max": round(max(lat), 1)},
        }
        print(json.dumps(out))
        if len(lat) < n:
            raise SystemExit(f"only {len(lat)} of {n} events arrived")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        server.shutdown()


if __name__ == "__main__":
    main()
