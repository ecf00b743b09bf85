"""A real `tally serve --admin-console` (TALLY_BIN, default target/debug/tally) on free loopback
ports with a fresh SQLite file and a callers file (an admin and a generation caller), seeded
through the CLI, and Debian's Chromium driven by Playwright. Screenshots go to SCREENSHOT_DIR
(default: a fresh directory the run prints)."""

import os
import re
import pathlib
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

import pytest
from playwright.sync_api import sync_playwright

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _token(binary):
    out = subprocess.run([binary, "auth", "new-token"], check=True, capture_output=True, text=True).stdout
    fields = dict(line.split(None, 1) for line in out.splitlines() if line.strip())
    return fields["token"].strip(), fields["token_sha256"].strip()


class Server:
    def __init__(self, binary, tmp):
        self.binary = binary
        self.admin_token, admin_hash = _token(binary)
        self.generation_token, generation_hash = _token(binary)
        (tmp / "callers.toml").write_text(
            f'[callers.support]\nroles = ["admin"]\ntoken_sha256 = ["{admin_hash}"]\n'
            f'[callers.jobs]\nroles = ["generation"]\ntoken_sha256 = ["{generation_hash}"]\n'
        )
        grpc_port, http_port, self.metrics_port = _free_ports(3)
        self.grpc = f"http://127.0.0.1:{grpc_port}"
        self.base = f"http://127.0.0.1:{http_port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
        args = [
            binary, "serve",
            "--listen", f"127.0.0.1:{grpc_port}",
            "--http-listen", f"127.0.0.1:{http_port}",
            "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
            "--database-url", f"sqlite://{tmp}/t.db",
            "--callers-file", str(tmp / "callers.toml"),
            "--admin-console",
            "--admin-session-key", "browser-test-session-key-0123456789abcdef",
        ]
        self.log = open(tmp / "server.log", "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("tally serve did not become ready: " + (tmp / "server.log").read_text())
            time.sleep(0.05)

    def cli(self, *args, token=None):
        """Runs a `tally` client command against the server; its stdout."""
        env = dict(self.env, TALLY_TOKEN=token or self.admin_token)
        return subprocess.run(
            [self.binary, *args, "--server", self.grpc], check=True, capture_output=True, text=True, env=env
        ).stdout

    def available(self, account):
        """The account's available credits, as `tally balance` reports them."""
        out = self.cli("balance", account, token=self.generation_token)
        return int(re.search(r"^available\s+(-?\d+)", out, re.M).group(1))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=15)
        self.log.close()


@pytest.fixture(scope="session")
def server():
    binary = os.environ.get("TALLY_BIN", str(ROOT / "target/debug/tally"))
    with tempfile.TemporaryDirectory() as d:
        s = Server(binary, pathlib.Path(d))
        try:
            yield s
        finally:
            s.stop()


@pytest.fixture(scope="session")
def shots():
    d = pathlib.Path(os.environ.get("SCREENSHOT_DIR") or tempfile.mkdtemp(prefix="tally-console-shots-"))
    d.mkdir(parents=True, exist_ok=True)
    yield d
    print(f"\nbrowser-test: screenshots in {d}")


@pytest.fixture(scope="session")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    errors = []
    # A CSP violation or a script error on any page fails the test (a page answered with a 4xx
    # status on purpose is logged as a failed load: not an error here).
    pg.on("console", lambda m: errors.append(m.text)
          if m.type == "error" and not m.text.startswith("Failed to load resource") else None)
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    ctx.close()
    assert not errors, errors
