"""Tally's outbound events end to end: a real `tally serve` POSTs Standard Webhooks to a receiver
that verifies each delivery with the `standardwebhooks` package (see conftest.py), and each
account's events are checked against the documented contract: their types, their order, and
their exact bodies.

The catalog is the built-in one with the free plan's low-balance threshold raised to 100, so
the free plan's daily allowance (5 credits, expiring at the next 00:00 UTC) is part of every
account's story: a `credits.granted` of source `allowance` when the account is created, and a
`credits.expiring` for it (it expires within the 7-day horizon). Each event's `available` is the
balance right after its own ledger entry (two grants written by one change: the first tells the
balance after it alone); `account.opened`, `credits.clawed_back` and `credits.low_balance` tell
the balance after the whole change. `credits.expiring` is written by the dispatcher's
housekeeping, not by the change itself, so its place among an account's other events depends on
timing: it is checked once per grant, after that grant's `credits.granted` and before its
`credits.expired`; every other event is checked in order.
"""

import datetime as dt
import hashlib
import hmac
import json
import re
import time
import urllib.request
import uuid

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2

from conftest import ROOT, STRIPE_SECRET, pb, pb_grpc

UTC = dt.timezone.utc
RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
QUIET = 1.0  # seconds without a new event before an account's events are taken as complete
SIGNUP_BONUS = 100
ALLOWANCE = 5
STARTER = 500

# data's fields per type, exactly (account_id is in every one).
FIELDS = {
    "account.opened": {"plan", "bonus", "available"},
    "credits.granted": {"grant_id", "source", "expires_at", "amount", "reason", "business_key", "available"},
    "credits.low_balance": {"plan", "available", "threshold"},
    "credits.expiring": {"grant_id", "source", "expires_at", "remaining"},
    "credits.expired": {"grant_id", "source", "expires_at", "amount", "available"},
    "credits.clawed_back": {"amount", "debt", "reason", "business_key", "available"},
    "purchase.completed": {"business_key", "credits", "grant_id", "amount_paid"},
    "purchase.failed": {"business_key", "credits", "grant_id", "amount_paid"},
    "subscription.updated": {"subscription_id", "status", "plan", "current_period_end", "cancel_at_period_end"},
    "hold.expired": {"hold_id", "amount", "metadata", "expired_at", "available"},
}
SOURCES = {"purchase", "subscription", "allowance", "signup_bonus", "promotion", "adjustment", "refund", "transfer"}


# ---------------------------------------------------------------------------------------------
# helpers


def key():
    return f"wh-{uuid.uuid4().hex}"


def new_account(prefix):
    return f"wh:{prefix}:{uuid.uuid4().hex[:12]}"


def parse_time(s):
    assert isinstance(s, str) and RFC3339_MS.match(s), f"not RFC 3339 with milliseconds and Z: {s!r}"
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00"))


def ms(t):
    """A datetime as the events write it: RFC 3339, milliseconds, Z."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def ts_of(message_ts):
    return message_ts.ToDatetime().replace(tzinfo=UTC)


def next_midnight(t):
    return dt.datetime.combine(t.astimezone(UTC).date() + dt.timedelta(days=1), dt.time(), UTC)


def near(t, want, slack=dt.timedelta(seconds=30)):
    return abs(t - want) <= slack


class Rpc:
    def __init__(self, server):
        self.channel = grpc.insecure_channel(server.target)
        self.credit = pb_grpc.CreditServiceStub(self.channel)
        self.admin = pb_grpc.AdminServiceStub(self.channel)
        self.md = (("authorization", f"Bearer {server.token}"),)

    def __call__(self, method, request):
        return method(request, metadata=self.md, timeout=10)


@pytest.fixture(scope="module")
def rpc(server):
    r = Rpc(server)
    yield r
    r.channel.close()


@pytest.fixture(scope="session", autouse=True)
def same_utc_day():
    """The free plan's allowance is daily (UTC): a run across 00:00 UTC would see yesterday's
    expire and today's granted. Start after midnight when it is less than 90 s away."""
    now = dt.datetime.now(UTC)
    left = (next_midnight(now) - now).total_seconds()
    if left < 90:
        time.sleep(left + 2)


def stripe_post(server, event):
    body = json.dumps(event).encode()
    t = int(time.time())
    sig = hmac.new(STRIPE_SECRET.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    req = urllib.request.Request(
        f"http://127.0.0.1:{server.http_port}/stripe/webhook",
        data=body,
        headers={"stripe-signature": f"t={t},v1={sig}", "content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        answer = json.loads(r.read() or b"{}")
        assert r.status == 200, (r.status, answer)
        return answer


def settled(receiver, account, count, timeout=30):
    """The account's events once `count` have arrived and no more came for QUIET seconds."""
    got = receiver.wait(account, count, timeout)
    deadline = time.monotonic() + QUIET
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = receiver.events(account)
        if len(now) != len(got):
            got, deadline = now, time.monotonic() + QUIET
    return got


def check_shape(receiver, account, events):
    """Every event: the envelope, the data's exact fields, the types of common fields."""
    bodies = {wid: body for wid, body in receiver.all_bodies()}
    for wid, kind, data in events:
        body = bodies[wid]
        assert set(body) == {"type", "timestamp", "data"}, body
        assert body["type"] == kind in FIELDS, body
        assert near(parse_time(body["timestamp"]), dt.datetime.now(UTC), dt.timedelta(minutes=2)), body
        assert data["account_id"] == account, body
        assert set(data) == FIELDS[kind] | {"account_id"}, f"{kind}: fields {sorted(data)}"
        for f in ("expires_at", "expired_at"):
            if data.get(f) is not None:
                parse_time(data[f])
        if "source" in data:
            assert data["source"] in SOURCES, body
        for f in ("amount", "available", "remaining", "debt", "bonus", "threshold", "credits"):
            if f in data:
                assert isinstance(data[f], int) and not isinstance(data[f], bool), (f, body)


def split(events):
    """(the events in order without credits.expiring, credits.expiring by grant id); checks
    that each expiring grant's credits.expiring comes after its credits.granted and before its
    credits.expired, once."""
    ordered = [(k, d) for _, k, d in events if k != "credits.expiring"]
    expiring = {}
    for i, (_, k, d) in enumerate(events):
        if k != "credits.expiring":
            continue
        g = d["grant_id"]
        assert g not in expiring, f"two credits.expiring for {g}"
        expiring[g] = d
        before = [e for _, kk, e in events[:i] if kk == "credits.granted" and e["grant_id"] == g]
        after = [e for _, kk, e in events[:i] if kk == "credits.expired" and e["grant_id"] == g]
        assert before, f"credits.expiring for {g} before its credits.granted"
        assert not after, f"credits.expiring for {g} after its credits.expired"
    return ordered, expiring


def kinds(ordered):
    return [k for k, _ in ordered]


def running(grants, before=0):
    """The balance right after each of these grants, in the order they were sent (the grants of
    one change, from the balance before it)."""
    out = {}
    for g in grants:
        before += g["amount"]
        out[g["grant_id"]] = before
    return out


def check_allowance(granted, opened_at, available):
    """The free plan's allowance grant of the day the account was opened."""
    day = opened_at.astimezone(UTC).date()
    assert granted == {
        "account_id": granted["account_id"],
        "grant_id": granted["grant_id"],
        "source": "allowance",
        "expires_at": ms(next_midnight(opened_at)),
        "amount": ALLOWANCE,
        "reason": f"allowance daily:{day.isoformat()}",
        "business_key": None,
        "available": available,
    }, granted
    assert granted["grant_id"].startswith("grt_")


def check_allowance_expiring(expiring, allowance):
    assert expiring.get(allowance["grant_id"]) == {
        "account_id": allowance["account_id"],
        "grant_id": allowance["grant_id"],
        "source": "allowance",
        "expires_at": allowance["expires_at"],
        "remaining": ALLOWANCE,
    }, expiring


# ---------------------------------------------------------------------------------------------
# the catalog the server runs with


def test_catalog_is_the_builtin_one_with_a_threshold_of_100_and_events(server):
    builtin = (ROOT / "src" / "catalog.default.toml").read_text()
    # The numbers below are the built-in catalog's; a changed default must change this test.
    assert f"[signup_bonus]\namount = {SIGNUP_BONUS}\nexpires_in = \"30days\"" in builtin
    assert f'allowance = {{ amount = {ALLOWANCE}, period = "daily", rollover = "none" }}' in builtin
    assert f'[packs.starter]\ndisplay_name = "Starter pack"\ncredits = {STARTER}\n' in builtin
    assert 'expires_in = "365days"' in builtin.split("[packs.starter]")[1].split("[packs.studio]")[0]
    free = server.catalog.split("[plans.free]")[1].split("[plans.pro]")[0]
    assert "low_balance_threshold = 100\n" in free
    assert server.catalog.count("[events.endpoints.app]") == 1


# ---------------------------------------------------------------------------------------------
# 1 and 2: an account opened, its low-balance crossing, its holds expiring


def test_open_account_low_balance_and_expired_holds(server, receiver, rpc):
    a = new_account("open")
    opened_at = dt.datetime.now(UTC)
    r = rpc(rpc.admin.OpenAccount, pb.OpenAccountRequest(account_id=a, plan="free", idempotency_key=key()))
    assert (r.plan, r.bonus, r.available) == ("free", SIGNUP_BONUS, SIGNUP_BONUS + ALLOWANCE)
    opened = SIGNUP_BONUS + ALLOWANCE  # 105

    # account.opened and its two grants (the day's allowance, the sign-up bonus).
    first = [(k, d) for _, k, d in receiver.wait(a, 3)]
    assert kinds(first)[0] == "account.opened", first

    # 105 → 75: under 100, one credits.low_balance.
    h1 = rpc(rpc.credit.Reserve, pb.ReserveRequest(
        account_id=a, amount=30, ttl=duration_pb2.Duration(seconds=2), idempotency_key=key(),
        metadata={"job": "j-1"})).hold
    deadline = time.monotonic() + 30
    while "credits.low_balance" not in [k for _, k, _ in receiver.events(a)]:
        assert time.monotonic() < deadline, f"no credits.low_balance: {receiver.events(a)}"
        time.sleep(0.05)
    # 75 → 65: still under, no second one. It lives a second longer, so the two holds expire
    # in two sweeps: 65 → 95 → 105 (back up, which is no crossing).
    h2 = rpc(rpc.credit.Reserve, pb.ReserveRequest(
        account_id=a, amount=10, ttl=duration_pb2.Duration(seconds=3), idempotency_key=key())).hold

    events = settled(receiver, a, 7)
    check_shape(receiver, a, events)
    ordered, expiring = split(events)
    assert kinds(ordered) == [
        "account.opened", "credits.granted", "credits.granted", "credits.low_balance",
        "hold.expired", "hold.expired",
    ], json.dumps(events, indent=1)
    (_, acc), (_, g1), (_, g2), (_, low), (_, x1), (_, x2) = ordered

    assert acc == {"account_id": a, "plan": "free", "bonus": SIGNUP_BONUS, "available": opened}
    grants = {g["source"]: g for g in (g1, g2)}
    assert set(grants) == {"allowance", "signup_bonus"}, (g1, g2)
    after = running([g1, g2])
    check_allowance(grants["allowance"], opened_at, after[grants["allowance"]["grant_id"]])
    bonus = grants["signup_bonus"]
    assert near(parse_time(bonus["expires_at"]), opened_at + dt.timedelta(days=30)), bonus
    assert bonus == {
        "account_id": a, "grant_id": bonus["grant_id"], "source": "signup_bonus",
        "expires_at": bonus["expires_at"], "amount": SIGNUP_BONUS, "reason": bonus["reason"],
        "business_key": None, "available": after[bonus["grant_id"]],
    }
    assert isinstance(bonus["reason"], str) and bonus["reason"], bonus
    assert low == {"account_id": a, "plan": "free", "available": opened - 30, "threshold": 100}

    assert x1 == {
        "account_id": a, "hold_id": h1.hold_id, "amount": 30, "metadata": {"job": "j-1"},
        "expired_at": ms(ts_of(h1.expires_at)), "available": opened - 10,
    }, x1
    assert x2 == {
        "account_id": a, "hold_id": h2.hold_id, "amount": 10, "metadata": {},
        "expired_at": ms(ts_of(h2.expires_at)), "available": opened,
    }, x2
    assert set(expiring) == {grants["allowance"]["grant_id"]}, expiring
    check_allowance_expiring(expiring, grants["allowance"])

    b = rpc(rpc.credit.CheckBalance, pb.CheckBalanceRequest(account_id=a))
    assert (b.available, b.held, b.open_holds) == (opened, 0, 0)


# ---------------------------------------------------------------------------------------------
# 3: a promotion that expires (and a first delivery refused: delivered again, in order)


def test_expiring_and_expired_promotion(server, receiver, rpc):
    b = new_account("expiry")
    with receiver.lock:
        receiver.refuse_once.add(b)
    expires = timestamp_pb2.Timestamp()
    expires.FromSeconds(int(time.time()) + 3)
    opened_at = dt.datetime.now(UTC)
    r = rpc(rpc.admin.Grant, pb.GrantRequest(
        account_id=b, amount=50, reason="promo", source=pb.GRANT_SOURCE_PROMOTION,
        expires_at=expires, idempotency_key=key()))
    assert r.available == 50 + ALLOWANCE

    events = settled(receiver, b, 6)
    check_shape(receiver, b, events)
    ordered, expiring = split(events)
    assert kinds(ordered) == [
        "account.opened", "credits.granted", "credits.granted", "credits.expired",
    ], json.dumps(events, indent=1)
    (_, acc), (_, g1), (_, g2), (_, gone) = ordered
    assert acc == {"account_id": b, "plan": "free", "bonus": 0, "available": 50 + ALLOWANCE}
    grants = {g["source"]: g for g in (g1, g2)}
    assert set(grants) == {"allowance", "promotion"}, (g1, g2)
    after = running([g1, g2])
    check_allowance(grants["allowance"], opened_at, after[grants["allowance"]["grant_id"]])
    promo = grants["promotion"]
    assert promo == {
        "account_id": b, "grant_id": r.grant_id, "source": "promotion",
        "expires_at": ms(ts_of(expires)), "amount": 50, "reason": "promo", "business_key": None,
        "available": after[r.grant_id],
    }
    assert expiring.get(r.grant_id) == {
        "account_id": b, "grant_id": r.grant_id, "source": "promotion",
        "expires_at": ms(ts_of(expires)), "remaining": 50,
    }, expiring
    check_allowance_expiring(expiring, grants["allowance"])
    assert set(expiring) == {r.grant_id, grants["allowance"]["grant_id"]}
    assert gone == {
        "account_id": b, "grant_id": r.grant_id, "source": "promotion",
        "expires_at": ms(ts_of(expires)), "amount": 50, "available": ALLOWANCE,
    }
    # The promotion's own order: granted, expiring, expired.
    mine = [k for _, k, d in events if d.get("grant_id") == r.grant_id]
    assert mine == ["credits.granted", "credits.expiring", "credits.expired"], mine

    # The first delivery was answered 503: the same event (id and body) came again, and none
    # of the account's later events overtook it.
    with receiver.lock:
        refused = [(w, d) for w, d in receiver.refused if d["data"]["account_id"] == b]
    assert len(refused) == 1, refused
    wid, body = refused[0]
    assert body["type"] == "account.opened"
    assert events[0][0] == wid, "a later event was delivered before the refused one"


# ---------------------------------------------------------------------------------------------
# 4: a purchase through a Stripe webhook, then its full refund


def test_purchase_and_claw_back(server, receiver, rpc):
    c = new_account("buy")
    tag = uuid.uuid4().hex[:16]
    cs, pi, ch = f"cs_{tag}", f"pi_{tag}", f"ch_{tag}"
    business_key = f"checkout_session:{cs}"
    opened_at = dt.datetime.now(UTC)
    answer = stripe_post(server, {
        "id": f"evt_buy_{tag}", "object": "event", "api_version": "2026-09-30.endive",
        "type": "checkout.session.completed", "created": 1764000000, "livemode": False,
        "data": {"object": {
            "id": cs, "object": "checkout.session", "mode": "payment", "payment_status": "paid",
            "status": "complete", "client_reference_id": c, "customer": f"cus_{tag}",
            "payment_intent": pi, "amount_total": 1900, "currency": "usd",
            "metadata": {"account_id": c, "pack_id": "starter"},
        }},
    })
    assert answer.get("granted") is True, answer
    bought = STARTER + ALLOWANCE  # 505

    first = receiver.wait(c, 4)
    assert "purchase.completed" in [k for _, k, _ in first], first
    # The claw-back takes credits in consumption order, the allowance (expiring soonest)
    # first: wait for the allowance's credits.expiring (housekeeping, every 200 ms) before the
    # refund, or there may be no allowance credits left to announce.
    deadline = time.monotonic() + 30
    while "credits.expiring" not in [k for _, k, _ in receiver.events(c)]:
        assert time.monotonic() < deadline, f"no credits.expiring: {receiver.events(c)}"
        time.sleep(0.05)

    answer = stripe_post(server, {
        "id": f"evt_ref_{tag}", "object": "event", "api_version": "2026-09-30.endive",
        "type": "charge.refunded", "created": 1764000100, "livemode": False,
        "data": {"object": {
            "id": ch, "object": "charge", "payment_intent": pi, "amount": 1900,
            "amount_refunded": 1900, "refunded": True,
        }},
    })
    assert answer.get("credits", {}).get("clawed") == STARTER, answer

    events = settled(receiver, c, 7)
    check_shape(receiver, c, events)
    ordered, expiring = split(events)
    # 505 → 5 by the claw-back: under the threshold of 100, so a credits.low_balance too.
    assert kinds(ordered) == [
        "account.opened", "credits.granted", "credits.granted", "purchase.completed",
        "credits.clawed_back", "credits.low_balance",
    ], json.dumps(events, indent=1)
    (_, acc), (_, g1), (_, g2), (_, done), (_, claw), (_, low) = ordered
    assert acc == {"account_id": c, "plan": "free", "bonus": 0, "available": bought}
    grants = {g["source"]: g for g in (g1, g2)}
    assert set(grants) == {"allowance", "purchase"}, (g1, g2)
    after = running([g1, g2])
    check_allowance(grants["allowance"], opened_at, after[grants["allowance"]["grant_id"]])
    grant = grants["purchase"]
    assert near(parse_time(grant["expires_at"]), opened_at + dt.timedelta(days=365)), grant
    assert grant == {
        "account_id": c, "grant_id": grant["grant_id"], "source": "purchase",
        "expires_at": grant["expires_at"], "amount": STARTER, "reason": grant["reason"],
        "business_key": business_key, "available": after[grant["grant_id"]],
    }
    assert isinstance(grant["reason"], str) and grant["reason"], grant
    assert done == {
        "account_id": c, "business_key": business_key, "credits": STARTER,
        "grant_id": grant["grant_id"], "amount_paid": 1900,
    }
    assert claw == {
        "account_id": c, "amount": STARTER, "debt": 0, "reason": claw["reason"],
        "business_key": business_key, "available": ALLOWANCE,
    }
    assert isinstance(claw["reason"], str) and claw["reason"], claw
    assert low == {"account_id": c, "plan": "free", "available": ALLOWANCE, "threshold": 100}
    assert set(expiring) == {grants["allowance"]["grant_id"]}, expiring
    check_allowance_expiring(expiring, grants["allowance"])


# ---------------------------------------------------------------------------------------------
# 5: every delivery, whatever its account


def test_every_delivery_verified_and_consistent(server, receiver):
    # Runs last: whatever came in before it must have verified.
    assert receiver.received, "no delivery at all"
    assert receiver.failures == [], receiver.failures
    with receiver.lock:
        received = list(receiver.received)
        refused = list(receiver.refused)
        ids = {}
        for wid, body in received + refused:
            ids.setdefault(wid, json.dumps(body, sort_keys=True))
            assert ids[wid] == json.dumps(body, sort_keys=True), f"{wid}: two bodies"
            assert wid.startswith("evt_"), wid
        # No delivery of ours was left undelivered: each refused one came again.
        assert {w for w, _ in refused} <= {w for w, _ in received}
        # Only the test's accounts get events.
        accounts = {body["data"]["account_id"] for _, body in received}
    assert all(a.startswith("wh:") for a in accounts), accounts
