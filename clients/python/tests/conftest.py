"""A real `tally serve` (TALLY_BIN, default target/debug/tally of the repository) on free
loopback ports with a fresh SQLite file and a callers file, started once for the session and
stopped (by its pid) at the end."""

import os
import pathlib
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid

import grpc
import pytest

from tally.v1 import credit_service_pb2 as pb
from tally.v1 import credit_service_pb2_grpc as pb_grpc

ROOT = pathlib.Path(__file__).resolve().parents[3]


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Server:
    def __init__(self, binary, tmp):
        out = subprocess.run([binary, "auth", "new-token"], check=True, capture_output=True, text=True).stdout
        fields = dict(line.split(None, 1) for line in out.splitlines() if line.strip())
        self.token = fields["token"].strip()
        (tmp / "callers.toml").write_text(
            f'[callers.py]\nroles = ["generation", "admin"]\ntoken_sha256 = ["{fields["token_sha256"].strip()}"]\n'
        )
        self.grpc_port, http_port, self.metrics_port = _free_ports(3)
        self.target = f"127.0.0.1:{self.grpc_port}"
        self.args = [
            binary, "serve",
            "--listen", self.target,
            "--http-listen", f"127.0.0.1:{http_port}",
            "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
            "--database-url", f"sqlite://{tmp}/t.db",
            "--callers-file", str(tmp / "callers.toml"),
        ]
        self.log = open(tmp / "server.log", "wb")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
        self.proc = None

    def start(self, wait=True):
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        if wait:
            self.wait_ready()

    def wait_ready(self):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("tally serve did not become ready")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=15)

    def grant(self, account, amount):
        """Credits for a test account, as an operator would grant them."""
        with grpc.insecure_channel(self.target) as ch:
            pb_grpc.AdminServiceStub(ch).Grant(
                pb.GrantRequest(
                    account_id=account, amount=amount, reason="python package test",
                    idempotency_key=f"grant-{uuid.uuid4().hex}", source=pb.GRANT_SOURCE_PURCHASE,
                ),
                metadata=(("authorization", f"Bearer {self.token}"),),
                timeout=10,
            )


@pytest.fixture(scope="session")
def server():
    binary = os.environ.get("TALLY_BIN", str(ROOT / "target" / "debug" / "tally"))
    if not os.access(binary, os.X_OK):
        pytest.fail(f"no tally binary at {binary} (cargo build, or set TALLY_BIN)")
    with tempfile.TemporaryDirectory() as d:
        s = Server(binary, pathlib.Path(d))
        s.start()
        try:
            yield s
        finally:
            s.stop()
            s.log.close()


@pytest.fixture
def account():
    """A fresh account id per test."""
    return f"py:{uuid.uuid4().hex[:12]}"
