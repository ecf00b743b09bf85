"""tally_client against a real `tally serve`: the job path, typed errors, retries, jobs."""

import datetime as dt
import pathlib
import tempfile
import time

import grpc
import pytest

import tally_client as tc
from tally.v1 import credit_service_pb2 as pb

from conftest import Server


def client(server, **kw):
    return tc.Client(server.target, server.token, **kw)


def test_reserve_commit_refund_with_aware_times(server, account):
    server.grant(account, 100)
    with client(server) as c:
        start = c.check_balance(account).available
        hold = c.reserve(account, 30, metadata={"job": "j-1"})
        assert (hold.state, hold.amount, hold.metadata) == ("open", 30, {"job": "j-1"})
        now = dt.datetime.now(dt.timezone.utc)
        assert hold.expires_at.tzinfo is not None and hold.expires_at > now
        assert hold.created_at <= hold.expires_at
        settled = c.commit(hold.hold_id, 20)
        assert (settled.hold.state, settled.released, settled.available) == ("committed", 10, start - 20)
        refunded = c.refund(hold.hold_id, 5, reason="bad frames")
        assert (refunded.refunded, refunded.available) == (5, start - 15)
        b = c.check_balance(account)
        assert (b.available, b.held, b.open_holds) == (start - 15, 0, 0)
        assert b.by_source["purchase"] > 0


def test_insufficient_credits_is_typed_with_its_numbers(server, account):
    server.grant(account, 40)
    with client(server) as c:
        available = c.check_balance(account).available
        with pytest.raises(tc.InsufficientCredits) as e:
            c.reserve(account, available + 1_000)
        assert (e.value.available, e.value.requested) == (available, available + 1_000)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert e.value.reason_value == pb.INSUFFICIENT_CREDITS
        assert c.check_balance(account).available == available  # nothing changed


def test_a_key_replays_and_a_reused_key_is_refused(server, account):
    server.grant(account, 50)
    with client(server) as c:
        first = c.reserve(account, 5, key="py-same-key")
        again = c.reserve(account, 5, key="py-same-key")
        assert again.hold_id == first.hold_id
        with pytest.raises(tc.IdempotencyKeyReused):
            c.reserve(account, 6, key="py-same-key")


def test_invalid_argument_names_the_fields(server):
    with client(server) as c:
        with pytest.raises(tc.InvalidArgument) as e:
            c.reserve("not a valid id!", 5)
        assert "account_id" in e.value.violations
        with pytest.raises(ValueError):
            c.reserve("acct", 0)  # checked before sending
        with pytest.raises(tc.AccountNotFound):
            c.check_balance("py:nobody")


def test_the_token_never_shows_in_a_repr(server):
    with client(server) as c:
        assert server.token not in repr(c) and server.token not in str(c)


def test_a_wrong_token_is_unauthenticated(server):
    with tc.Client(server.target, "tly_wrong") as c:
        with pytest.raises(tc.Unauthenticated):
            c.check_balance("py:any")


def test_priced_operation_is_priced_by_the_server(server, account):
    server.grant(account, 1_000)
    with client(server) as c:
        params = {"seconds": 12, "resolution": "1080p"}
        cost = c.estimate("video_export", params)
        hold = c.reserve(account, operation="video_export", params=params)
        assert hold.amount == cost > 0
        c.refund(hold.hold_id)


def test_a_job_commits_the_real_cost(server, account):
    server.grant(account, 100)
    with client(server) as c:
        start = c.check_balance(account).available
        with c.job(account, 30) as job:
            settled = job.commit(12)
        assert settled.available == start - 12
        assert c.get_hold(job.hold_id).state == "committed"


def test_a_failed_or_abandoned_job_is_released(server, account):
    server.grant(account, 100)
    with client(server) as c:
        start = c.check_balance(account).available
        with pytest.raises(RuntimeError):
            with c.job(account, 30) as job:
                raise RuntimeError("render failed")
        assert c.get_hold(job.hold_id).state == "released"
        with c.job(account, 10) as abandoned:
            pass
        assert c.get_hold(abandoned.hold_id).state == "released"
        assert c.check_balance(account).available == start


def test_heartbeats_keep_a_short_hold_alive(server, account):
    server.grant(account, 100)
    with client(server, hold_ttl=1.5) as c:
        with c.job(account, 20) as job:
            time.sleep(3.5)  # more than twice the TTL: only the heartbeats keep it open
            assert c.get_hold(job.hold_id).state == "open"
            settled = job.commit(20)
        assert settled.hold.state == "committed"


def test_calls_retry_until_the_server_answers_and_then_report_the_key():
    import os
    binary = os.environ.get("TALLY_BIN", str(pathlib.Path(__file__).resolve().parents[3] / "target" / "debug" / "tally"))
    with tempfile.TemporaryDirectory() as d:
        late = Server(binary, pathlib.Path(d))
        channel = grpc.insecure_channel(
            late.target,
            options=[("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 300)],
        )
        c = tc.Client(late.target, late.token, deadline=20, attempts=1_000, max_backoff=0.2, channel=channel)
        late.start(wait=False)  # not listening yet: the first attempts are UNAVAILABLE
        try:
            with pytest.raises(tc.AccountNotFound):
                c.check_balance("py:late")  # retried until the server was up, then a real answer
        finally:
            late.stop()
        # The server is gone: a reserve gives up within its deadline with the key to retry with.
        c.deadline = 1.0
        with pytest.raises(tc.OutcomeUnknown) as e:
            c.reserve("py:late", 5)
        assert e.value.key and e.value.key.startswith("reserve-")
        c.close()
        late.log.close()


def test_watch_balance_follows_changes_and_resumes(server, account):
    server.grant(account, 100)
    with client(server) as c:
        start = c.check_balance(account).available
        stream = c.watch_balance(account)
        v0, b0 = next(stream)
        assert b0.available == start
        hold = c.reserve(account, 30)
        v1, b1 = next(stream)
        assert v1 > v0 and (b1.available, b1.held) == (start - 30, 30)
        stream.close()
        # A reconnect with the newest version gets only what comes next.
        resumed = c.watch_balance(account, after_version=v1)
        c.commit(hold.hold_id, 10)
        v2, b2 = next(resumed)
        assert v2 > v1 and (b2.available, b2.held) == (start - 10, 0)
        resumed.close()
        with pytest.raises(tc.AccountNotFound):
            next(c.watch_balance("py:nobody"))
