#!/usr/bin/env python3
"""scripts/console-bench.py - admin console page times at 1,000,000 ledger entries.

Fills a fresh database with ACCOUNTS accounts (default 10,000) and JOBS committed jobs (default
500,000: a reserve and a commit entry each, so 1,000,000 entries) spread over the last 60 days,
with four priced operations, plus PURCHASES paid pack purchases and their Stripe events; then
starts `tally serve --admin-console` on it, signs in over HTTP, and times every console page:
the median and the slowest of RUNS loads (the dashboard also cold: the first load after a
start, its numbers not cached). Both backends: a throwaway PostgreSQL cluster on a free
loopback port (Debian's binaries, run as `postgres` when root) and a SQLite file.

    python3 scripts/console-bench.py            # both backends
    BACKENDS=sqlite python3 scripts/console-bench.py

Knobs: TALLY_BIN (default target/release/tally, else target/debug/tally), ACCOUNTS, JOBS,
PURCHASES, RUNS (default 20), BACKENDS ("postgres sqlite"), PGBIN. Binds 127.0.0.1 only; stops
what it started (by pid) and removes its scratch directory, also on failure. The generated
rows are shaped like Tally's (same tables, columns and indexes `tally migrate` makes) but are
written by SQL, not through the ledger: the run measures reads, not a consistent history.
"""

import glob
import http.cookiejar
import os
import pathlib
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
ACCOUNTS = int(os.environ.get("ACCOUNTS", "10000"))
JOBS = int(os.environ.get("JOBS", "500000"))
PURCHASES = int(os.environ.get("PURCHASES", "5000"))
RUNS = int(os.environ.get("RUNS", "20"))
BACKENDS = os.environ.get("BACKENDS", "postgres sqlite").split()
OPS = ["video_export", "image_generate", "upscale", "voice_clone"]


def binary():
    b = os.environ.get("TALLY_BIN")
    if b:
        return b
    for c in ("target/release/tally", "target/debug/tally"):
        if (ROOT / c).exists():
            return str(ROOT / c)
    sys.exit("console-bench: build tally first (cargo build --release) or set TALLY_BIN")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


# The data, as SQL over a generated sequence (PostgreSQL: generate_series; SQLite: a recursive
# CTE). {now} is the current time in the backend's type, {day} one day, {sec} one second.
def pg_sql():
    return f"""
INSERT INTO account (account_id, plan, available, held, created_at, updated_at)
SELECT 'user_' || lpad(i::text, 5, '0'), CASE WHEN i % 10 = 0 THEN 'pro' ELSE 'free' END,
       (i * 37) % 3000, 0, now() - interval '90 days', now() - (i % 60) * interval '1 day'
FROM generate_series(1, {ACCOUNTS}) i;
INSERT INTO hold (hold_id, account_id, amount, state, committed_amount, metadata, created_at, expires_at, resolved_at)
SELECT 'hold_' || lpad(to_hex(j), 32, '0'), 'user_' || lpad((1 + j % {ACCOUNTS})::text, 5, '0'), 40, 'committed',
       10 + j % 30, '{{"operation":"' || (ARRAY{OPS!r})[1 + j % 4] || '"}}',
       now() - (j::bigint * 60 * 86400 / {JOBS}) * interval '1 second',
       now() - (j::bigint * 60 * 86400 / {JOBS}) * interval '1 second' + interval '10 minutes',
       now() - (j::bigint * 60 * 86400 / {JOBS}) * interval '1 second' + interval '30 seconds'
FROM generate_series(1, {JOBS}) j;
INSERT INTO entry (account_id, hold_id, kind, available_delta, held_delta, reason, created_at)
SELECT account_id, hold_id, k.kind,
       CASE k.kind WHEN 'reserve' THEN -amount ELSE amount - committed_amount END,
       CASE k.kind WHEN 'reserve' THEN amount ELSE -amount END, '',
       CASE k.kind WHEN 'reserve' THEN created_at ELSE resolved_at END
FROM hold, (VALUES ('reserve'), ('commit')) AS k(kind)
ORDER BY 7;
INSERT INTO bucket (bucket_id, account_id, source, granted, remaining, reason, created_at, business_key)
SELECT 'grt_' || lpad(to_hex(p), 32, '0'), 'user_' || lpad((1 + p * 7 % {ACCOUNTS})::text, 5, '0'), 'purchase',
       (ARRAY[500, 2000, 10000])[1 + p % 3], 0,
       (ARRAY['Starter', 'Creator', 'Studio'])[1 + p % 3] || ' (checkout_session:cs_' || p || '; evt_' || p || ')',
       now() - (p::bigint * 60 * 86400 / {PURCHASES}) * interval '1 second', 'checkout_session:cs_' || p
FROM generate_series(1, {PURCHASES}) p;
INSERT INTO stripe_fact (business_key, account_id, state, credits, grant_id, created_at, updated_at, amount_paid)
SELECT business_key, account_id, 'granted', granted, bucket_id, created_at, created_at,
       CASE granted WHEN 500 THEN 500 WHEN 2000 THEN 1900 ELSE 7900 END
FROM bucket WHERE source = 'purchase';
INSERT INTO stripe_event (event_id, type, livemode, created, effect, received_at, business_key)
SELECT 'evt_' || p, 'checkout.session.completed', false, 0, 'grant pack',
       now() - (p::bigint * 60 * 86400 / {PURCHASES}) * interval '1 second', 'checkout_session:cs_' || p
FROM generate_series(1, {PURCHASES}) p;
ANALYZE;
"""


def sqlite_statements():
    now = int(time.time() * 1_000_000)
    day = 86_400_000_000
    step = 60 * day // JOBS
    pstep = 60 * day // PURCHASES
    ops = " ".join(f"WHEN {i} THEN '{o}'" for i, o in enumerate(OPS))
    seq = "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {n})"
    return [
        f"""{seq.format(n=ACCOUNTS)}
INSERT INTO account (account_id, plan, available, held, created_at, updated_at)
SELECT 'user_' || printf('%05d', i), CASE WHEN i % 10 = 0 THEN 'pro' ELSE 'free' END, (i * 37) % 3000, 0,
       {now} - 90 * {day}, {now} - (i % 60) * {day} FROM s""",
        f"""{seq.format(n=JOBS)}
INSERT INTO hold (hold_id, account_id, amount, state, committed_amount, metadata, created_at, expires_at, resolved_at)
SELECT 'hold_' || printf('%032x', i), 'user_' || printf('%05d', 1 + i % {ACCOUNTS}), 40, 'committed', 10 + i % 30,
       '{{"operation":"' || CASE i % 4 {ops} END || '"}}',
       {now} - i * {step}, {now} - i * {step} + 600000000, {now} - i * {step} + 30000000 FROM s""",
        """INSERT INTO entry (account_id, hold_id, kind, available_delta, held_delta, reason, created_at)
SELECT account_id, hold_id, k.kind,
       CASE k.kind WHEN 'reserve' THEN -amount ELSE amount - committed_amount END,
       CASE k.kind WHEN 'reserve' THEN amount ELSE -amount END, '',
       CASE k.kind WHEN 'reserve' THEN created_at ELSE resolved_at END
FROM hold, (SELECT 'reserve' AS kind UNION ALL SELECT 'commit') k ORDER BY 7""",
        f"""{seq.format(n=PURCHASES)}
INSERT INTO bucket (bucket_id, account_id, source, granted, remaining, reason, created_at, business_key)
SELECT 'grt_' || printf('%032x', i), 'user_' || printf('%05d', 1 + i * 7 % {ACCOUNTS}), 'purchase',
       CASE i % 3 WHEN 0 THEN 500 WHEN 1 THEN 2000 ELSE 10000 END, 0,
       CASE i % 3 WHEN 0 THEN 'Starter' WHEN 1 THEN 'Creator' ELSE 'Studio' END
         || ' (checkout_session:cs_' || i || '; evt_' || i || ')',
       {now} - i * {pstep}, 'checkout_session:cs_' || i FROM s""",
        """INSERT INTO stripe_fact (business_key, account_id, state, credits, grant_id, created_at, updated_at, amount_paid)
SELECT business_key, account_id, 'granted', granted, bucket_id, created_at, created_at,
       CASE granted WHEN 500 THEN 500 WHEN 2000 THEN 1900 ELSE 7900 END
FROM bucket WHERE source = 'purchase'""",
        f"""{seq.format(n=PURCHASES)}
INSERT INTO stripe_event (event_id, type, livemode, created, effect, received_at, business_key)
SELECT 'evt_' || i, 'checkout.session.completed', 0, 0, 'grant pack', {now} - i * {pstep},
       'checkout_session:cs_' || i FROM s""",
        "ANALYZE",
    ]


class Pg:
    """A throwaway PostgreSQL cluster (as `postgres` when root: initdb refuses root)."""

    def __init__(self, base):
        pgbin = os.environ.get("PGBIN")
        if not pgbin:
            try:
                pgbin = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip()
            except OSError:
                pgbin = ""
            if not os.path.exists(f"{pgbin}/initdb"):
                found = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
                pgbin = found[-1] if found else ""
        if not os.path.exists(f"{pgbin}/initdb"):
            sys.exit("console-bench: no PostgreSQL server binaries (apt-get install postgresql, or PGBIN)")
        self.bin = pgbin
        self.run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.data = base / "pg"
        self.data.mkdir()
        if self.run_as:
            shutil.chown(base, "postgres")
            shutil.chown(self.data, "postgres")
        self.port = free_port()
        subprocess.run(self.run_as + [f"{pgbin}/initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                                      "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"],
                       check=True, capture_output=True)
        subprocess.run(self.run_as + [f"{pgbin}/pg_ctl", "-D", str(self.data), "-l", str(base / "pg.log"), "-w",
                                      "-o", f"-p {self.port} -k {base} -c listen_addresses=127.0.0.1 "
                                            "-c shared_buffers=256MB -c max_connections=100",
                                      "start"], check=True, capture_output=True)
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def psql(self, sql):
        subprocess.run([f"{self.bin}/psql", "-q", "-v", "ON_ERROR_STOP=1", self.url], input=sql, text=True,
                       check=True, capture_output=True)

    def stop(self):
        subprocess.run(self.run_as + [f"{self.bin}/pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop"],
                       capture_output=True)


class Server:
    def __init__(self, tally, url, base):
        self.http = f"http://127.0.0.1:{free_port()}"
        self.metrics = free_port()
        self.args = [tally, "serve", "--database-url", url, "--listen", f"127.0.0.1:{free_port()}",
                     "--http-listen", self.http.removeprefix("http://"),
                     "--metrics-listen", f"127.0.0.1:{self.metrics}", "--admin-console",
                     "--admin-session-key", "console-bench-session-key-0123456789abcdef",
                     "--audit-interval", "0s"]
        self.log = open(base / "serve.log", "ab")
        self.proc = None

    def start(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
        env["RUST_LOG"] = "warn"
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/readyz", timeout=1):
                    return
            except (OSError, urllib.error.HTTPError):
                time.sleep(0.05)
        raise RuntimeError("tally serve did not become ready")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)


def session(base):
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    form = opener.open(base + "/admin/login").read().decode()
    csrf = re.search(r'name="csrf" value="([^"]+)"', form).group(1)
    body = urllib.parse.urlencode({"token": "", "csrf": csrf}).encode()
    page = opener.open(base + "/admin/login", body).read().decode()
    assert "Signed in as" in page, page[:500]
    return opener


def timed(opener, url):
    t = time.perf_counter()
    with opener.open(url) as r:
        body = r.read()
        assert r.status == 200, (url, r.status)
    return (time.perf_counter() - t) * 1000, len(body)


PAGES = [
    ("accounts, first page", "/admin/accounts"),
    ("accounts, prefix search", "/admin/accounts?q=user_07"),
    ("accounts, plan filter", "/admin/accounts?plan=pro"),
    ("accounts, low balance", "/admin/accounts?low=1"),
    ("account (50 entries)", "/admin/accounts/user_00042"),
    ("account, commits since a date", "/admin/accounts/user_00042?kind=commit&since={since}"),
    ("account, page 2 of entries", "/admin/accounts/user_00042?before={before}"),
    ("dashboard (cached)", "/admin/dashboard"),
    ("dashboard CSV", "/admin/dashboard.csv?table=usage"),
    ("Stripe events", "/admin/stripe"),
]


def bench(name, url, base, tally):
    server = Server(tally, url, base)
    rows = []
    try:
        cold = []
        for _ in range(3):
            server.start()
            opener = session(server.http)
            cold.append(timed(opener, server.http + "/admin/dashboard")[0])
            server.stop()
        server.start()
        opener = session(server.http)
        page = opener.open(server.http + "/admin/accounts/user_00042").read().decode()
        before = re.search(r'before=(\d+)', page)
        since = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 7 * 86400))
        rows.append(("dashboard, cold (numbers not cached yet)", statistics.median(cold), max(cold), 0))
        timed(opener, server.http + "/admin/dashboard")  # fills this server's cache
        for label, path in PAGES:
            if "{before}" in path and not before:
                continue
            path = path.format(since=since, before=before.group(1) if before else "")
            times, size = [], 0
            for _ in range(RUNS):
                ms, size = timed(opener, server.http + path)
                times.append(ms)
            rows.append((label, statistics.median(times), max(times), size))
    finally:
        server.stop()
    print(f"\n{name}: {ACCOUNTS:,} accounts, {2 * JOBS:,} entries, {PURCHASES:,} purchases; "
          f"median and slowest of {RUNS} loads (cold dashboard: of 3 starts)")
    print(f"  {'page':44} {'p50 ms':>8} {'max ms':>8} {'bytes':>8}")
    for label, p50, mx, size in rows:
        print(f"  {label:44} {p50:8.1f} {mx:8.1f} {size:8}")


def main():
    tally = binary()
    base = pathlib.Path(tempfile.mkdtemp(prefix="tally-console-bench-"))
    os.chmod(base, 0o755)
    pg = None
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        print(f"console-bench: {tally} at {commit}, {os.cpu_count()} CPUs")
        if "postgres" in BACKENDS:
            pg = Pg(base)
            subprocess.run([tally, "migrate", "--database-url", pg.url], check=True, capture_output=True)
            t = time.monotonic()
            pg.psql(pg_sql())
            print(f"console-bench: PostgreSQL filled in {time.monotonic() - t:.0f} s")
            bench("PostgreSQL 15", pg.url, base, tally)
        if "sqlite" in BACKENDS:
            path = base / "console.db"
            url = f"sqlite://{path}"
            subprocess.run([tally, "migrate", "--database-url", url], check=True, capture_output=True)
            t = time.monotonic()
            db = sqlite3.connect(path)
            for s in sqlite_statements():
                db.execute(s)
            db.commit()
            db.close()
            print(f"console-bench: SQLite filled in {time.monotonic() - t:.0f} s")
            bench("SQLite", url, base, tally)
    finally:
        if pg:
            pg.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
