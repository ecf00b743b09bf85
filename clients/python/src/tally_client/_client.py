"""The client: deadlines, retries with one idempotency key per operation, and jobs."""

from __future__ import annotations

import datetime as _dt
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, Mapping, Optional, Tuple, TypeVar

import grpc
from google.protobuf import duration_pb2

from tally.v1 import credit_service_pb2 as pb
from tally.v1 import credit_service_pb2_grpc as pb_grpc

from . import errors

T = TypeVar("T")

#: The largest credit amount Tally takes (and every int64 it sends fits a Python int).
MAX_AMOUNT = 1_000_000_000_000


def _aware(ts) -> Optional[_dt.datetime]:
    """A protobuf Timestamp as a timezone-aware UTC datetime (``None`` when unset)."""
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return None
    return _dt.datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=_dt.timezone.utc)


def _duration(seconds: float) -> duration_pb2.Duration:
    whole = int(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=int(round((seconds - whole) * 1e9)))


def new_key(what: str) -> str:
    """A fresh idempotency key for one operation (``what`` names it in logs)."""
    return f"{what}-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class Hold:
    """A reservation of credits for one job."""

    hold_id: str
    account_id: str
    amount: int
    state: str  # open, committed, released or expired
    committed_amount: int
    refunded_amount: int
    created_at: Optional[_dt.datetime]
    expires_at: Optional[_dt.datetime]
    resolved_at: Optional[_dt.datetime]
    metadata: Dict[str, str] = field(default_factory=dict)

    @classmethod
    def _of(cls, h) -> "Hold":
        return cls(
            hold_id=h.hold_id,
            account_id=h.account_id,
            amount=h.amount,
            state=pb.HoldState.Name(h.state).removeprefix("HOLD_STATE_").lower(),
            committed_amount=h.committed_amount,
            refunded_amount=h.refunded_amount,
            created_at=_aware(h.created_at),
            expires_at=_aware(h.expires_at),
            resolved_at=_aware(h.resolved_at) if h.HasField("resolved_at") else None,
            metadata=dict(h.metadata),
        )


@dataclass(frozen=True)
class Balance:
    """An account's credits now."""

    account_id: str
    plan: str
    available: int
    held: int
    debt: int
    open_holds: int
    low_balance: bool
    by_source: Dict[str, int]
    next_expiry: Optional[_dt.datetime]
    next_expiry_amount: int
    allowance_left: Optional[int]


@dataclass(frozen=True)
class Settled:
    """What a commit, refund or release left."""

    hold: Hold
    available: int
    released: int = 0
    extra_drawn: int = 0
    refunded: int = 0


def _retryable(e: grpc.RpcError) -> bool:
    code = e.code()  # type: ignore[attr-defined]
    # UNKNOWN and CANCELLED: Tally never sends them; they are a connection broken mid-call, an
    # unknown outcome that a retry with the same key settles.
    if code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
    ):
        return True
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # rate limited, not an empty wallet
        return errors.details(e)[1] is not None
    return False


class Client:
    """A Tally client over one gRPC channel (thread-safe; share one per process).

    Every call has a deadline (``deadline`` seconds for the whole call, retries included). A call
    that fails with UNAVAILABLE, ABORTED, a lost reply, or a rate limit carrying RetryInfo is sent
    again — the same request with the same idempotency key, so it can never apply twice — after a
    jittered exponential backoff (at least what RetryInfo asks), until ``attempts`` or the deadline
    run out; then :class:`errors.OutcomeUnknown` carries the key to retry with later.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        token: Optional[str] = None,
        *,
        deadline: float = 5.0,
        attempts: int = 6,
        initial_backoff: float = 0.025,
        max_backoff: float = 1.0,
        hold_ttl: float = 60.0,
        credentials: Optional[grpc.ChannelCredentials] = None,
        channel: Optional[grpc.Channel] = None,
    ) -> None:
        if channel is None:
            channel = (
                grpc.secure_channel(target, credentials)
                if credentials is not None
                else grpc.insecure_channel(target)
            )
        self._channel = channel
        self._credit = pb_grpc.CreditServiceStub(channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.deadline = deadline
        self.attempts = attempts
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.hold_ttl = hold_ttl

    def __repr__(self) -> str:  # never the token
        return f"Client(deadline={self.deadline}, attempts={self.attempts}, hold_ttl={self.hold_ttl})"

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the retry loop -------------------------------------------------------------------

    def _call(self, method: Callable[..., T], request, key: Optional[str] = None) -> T:
        end = time.monotonic() + self.deadline
        backoff = self.initial_backoff
        attempt = 0
        while True:
            attempt += 1
            left = max(end - time.monotonic(), 0.001)
            try:
                return method(request, timeout=left, metadata=self._metadata)
            except grpc.RpcError as e:
                code = e.code()  # type: ignore[attr-defined]
                unknown = code == grpc.StatusCode.DEADLINE_EXCEEDED or _retryable(e)
                if not unknown:
                    raise errors.from_rpc_error(e, key) from None
                hint = errors.details(e)[1]
                wait = random.uniform(0, backoff)
                if hint is not None:
                    wait = max(wait, hint.retry_delay.seconds + hint.retry_delay.nanos / 1e9)
                if (
                    code == grpc.StatusCode.DEADLINE_EXCEEDED
                    or attempt >= self.attempts
                    or time.monotonic() + wait >= end
                ):
                    typed = errors.from_rpc_error(e, key)
                    raise errors.OutcomeUnknown(
                        typed.code,
                        typed.reason,
                        f"gave up after {attempt} attempts: {typed.message}",
                        typed.metadata,
                        key,
                    ) from None
                time.sleep(wait)
                backoff = min(backoff * 2, self.max_backoff)

    # -- the calls ------------------------------------------------------------------------

    def check_balance(self, account: str) -> Balance:
        """The account's credits now."""
        return _balance(
            self._call(self._credit.CheckBalance, pb.CheckBalanceRequest(account_id=account))
        )

    def watch_balance(
        self, account: str, *, after_version: Optional[int] = None
    ) -> Iterator[Tuple[int, Balance]]:
        """Follows the account's balance (WatchBalance): yields ``(version, balance)`` now, then
        after each committed change, through any replica (the newest state; a higher version is
        newer). When the server restarts or the connection drops it reconnects by itself with
        the last version, missing nothing. Stop by leaving the loop. Raises for a refusal
        (unknown account, TOO_MANY_STREAMS, PERMISSION_DENIED)."""
        backoff = self.initial_backoff
        while True:
            req = pb.WatchBalanceRequest(account_id=account)
            if after_version is not None:
                req.after_version = after_version
            call = self._credit.WatchBalance(req, metadata=self._metadata)
            try:
                for m in call:
                    backoff = self.initial_backoff
                    after_version = m.version
                    yield m.version, _balance(m.balance)
                return
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]
                    raise errors.from_rpc_error(e, None) from None
                time.sleep(random.uniform(0, backoff))
                backoff = min(backoff * 2, self.max_backoff)
            finally:
                call.cancel()

    def estimate(self, operation: str, params: Mapping[str, object]) -> int:
        """Whole credits a Reserve of ``operation`` would hold."""
        r = self._call(
            self._credit.EstimateCost,
            pb.EstimateCostRequest(operation=operation, params={k: str(v) for k, v in params.items()}),
        )
        return r.cost

    def reserve(
        self,
        account: str,
        amount: Optional[int] = None,
        *,
        operation: Optional[str] = None,
        params: Optional[Mapping[str, object]] = None,
        ttl: Optional[float] = None,
        metadata: Optional[Mapping[str, str]] = None,
        key: Optional[str] = None,
    ) -> Hold:
        """Holds ``amount`` credits, or the server's price of ``operation`` with ``params``."""
        if (amount is None) == (operation is None):
            raise ValueError("give an amount or an operation (not both)")
        req = pb.ReserveRequest(
            account_id=account,
            idempotency_key=key or new_key("reserve"),
            metadata=dict(metadata or {}),
        )
        if amount is not None:
            req.amount = _checked(amount)
        else:
            req.operation.name = operation or ""
            req.operation.params.update({k: str(v) for k, v in (params or {}).items()})
        if ttl is not None:
            req.ttl.CopyFrom(_duration(ttl))
        r = self._call(self._credit.Reserve, req, req.idempotency_key)
        return Hold._of(r.hold)

    def commit(self, hold_id: str, amount: int, *, key: Optional[str] = None) -> Settled:
        """Settles a hold with what the job really cost."""
        req = pb.CommitRequest(hold_id=hold_id, amount=_checked(amount), idempotency_key=key or new_key("commit"))
        r = self._call(self._credit.Commit, req, req.idempotency_key)
        return Settled(Hold._of(r.hold), r.available, released=r.released, extra_drawn=r.extra_drawn)

    def refund(
        self,
        hold_id: str,
        amount: Optional[int] = None,
        *,
        reason: str = "",
        key: Optional[str] = None,
    ) -> Settled:
        """Releases an open hold, or returns ``amount`` (default: all) of a committed one."""
        req = pb.RefundRequest(hold_id=hold_id, reason=reason[:512], idempotency_key=key or new_key("refund"))
        if amount is not None:
            req.amount = _checked(amount)
        r = self._call(self._credit.Refund, req, req.idempotency_key)
        return Settled(Hold._of(r.hold), r.available, refunded=r.refunded)

    def extend(self, hold_id: str, ttl: float, *, key: Optional[str] = None) -> Hold:
        """Moves an open hold's expiry to now + ``ttl`` seconds."""
        req = pb.ExtendHoldRequest(hold_id=hold_id, ttl=_duration(ttl), idempotency_key=key or new_key("extend"))
        return Hold._of(self._call(self._credit.ExtendHold, req, req.idempotency_key).hold)

    def get_hold(self, hold_id: str) -> Hold:
        """One hold, in any state."""
        return Hold._of(self._call(self._credit.GetHold, pb.GetHoldRequest(hold_id=hold_id)).hold)

    def job(
        self,
        account: str,
        amount: Optional[int] = None,
        *,
        operation: Optional[str] = None,
        params: Optional[Mapping[str, object]] = None,
        metadata: Optional[Mapping[str, str]] = None,
    ) -> "Job":
        """Reserves for a job and keeps the hold alive while it runs; use it with ``with``::

            with client.job("user_1", operation="video_export", params={"seconds": 12}) as job:
                cost = render()
                job.commit(cost)

        An exception in the block, or leaving it without a commit, releases the hold.
        """
        hold = self.reserve(
            account, amount, operation=operation, params=params, ttl=self.hold_ttl, metadata=metadata
        )
        return Job(self, hold)


def _balance(r) -> Balance:
    return Balance(
        account_id=r.account_id,
        plan=r.plan,
        available=r.available,
        held=r.held,
        debt=r.debt,
        open_holds=r.open_holds,
        low_balance=r.low_balance,
        by_source=dict(r.by_source),
        next_expiry=_aware(r.next_expiry.at) if r.HasField("next_expiry") else None,
        next_expiry_amount=r.next_expiry.amount if r.HasField("next_expiry") else 0,
        allowance_left=r.allowance_left if r.HasField("allowance_left") else None,
    )


def _checked(n: int) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_AMOUNT:
        raise ValueError(f"an amount is a whole number of credits in 1..={MAX_AMOUNT}: {n!r}")
    return n


class Job:
    """A reserved job: its hold is extended every third of its TTL until it is settled.

    :meth:`commit` settles it with the real cost; :meth:`fail` (or an exception in its ``with``
    block) releases it. A commit whose outcome is unknown (the reply was lost) is sent again with
    its own key until answered or the hold expires — never refunded, so never charged twice or
    not at all.
    """

    def __init__(self, client: Client, hold: Hold) -> None:
        self._client = client
        self.hold = hold
        self._settled = False
        self._stop = threading.Event()
        self._beats = threading.Thread(target=self._heartbeat, name=f"tally-heartbeat-{hold.hold_id}", daemon=True)
        self._beats.start()

    @property
    def hold_id(self) -> str:
        return self.hold.hold_id

    def _heartbeat(self) -> None:
        ttl = self._client.hold_ttl
        while not self._stop.wait(ttl / 3):
            try:
                self.hold = self._client.extend(self.hold_id, ttl)
            except errors.TallyError:
                # The next beat tries again; a hold that is gone will say so at commit.
                continue

    def _stop_beats(self) -> None:
        self._stop.set()
        if self._beats is not threading.current_thread():
            self._beats.join(timeout=self._client.deadline)

    def commit(self, actual: int) -> Settled:
        """Charges what the job really cost (less than held releases the rest)."""
        self._stop_beats()
        key = new_key("commit")
        expires = self.hold.expires_at
        while True:
            try:
                settled = self._client.commit(self.hold_id, actual, key=key)
                self._settled = True
                return settled
            except errors.OutcomeUnknown:
                if expires is not None and _dt.datetime.now(_dt.timezone.utc) >= expires:
                    self._settled = True  # expired: the server released it
                    raise
                time.sleep(0.1)

    def fail(self, reason: str = "job failed") -> Settled:
        """Releases the hold: the job did not run (or its result is thrown away)."""
        self._stop_beats()
        settled = self._client.refund(self.hold_id, reason=reason)
        self._settled = True
        return settled

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._stop_beats()
        if not self._settled:
            reason = f"job raised {exc_type.__name__}: {exc}" if exc_type else "job ended without a commit"
            try:
                self.fail(reason[:512])
            except errors.TallyError:
                if exc_type is None:
                    raise
        return False
