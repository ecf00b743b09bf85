"""Typed errors, decoded from the `google.rpc.ErrorInfo` Tally attaches to every refusal.

Every error is a :class:`TallyError` with the gRPC ``code``, the stable ``reason`` (a name of the
proto's ``ErrorReason`` enum), the server's ``message`` and the ErrorInfo ``metadata``. The reasons
that carry numbers get a class of their own with those numbers as ``int`` attributes.
"""

from __future__ import annotations

from typing import Dict, Optional, Type

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tally.v1 import credit_service_pb2 as pb

DOMAIN = "tally.v1"


class TallyError(Exception):
    """A call Tally refused, or that could not be completed."""

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        metadata: Optional[Dict[str, str]] = None,
        key: Optional[str] = None,
    ) -> None:
        super().__init__(f"{reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata: Dict[str, str] = dict(metadata or {})
        #: The idempotency key to retry with when the outcome is unknown.
        self.key = key
        #: For INVALID_ARGUMENT: each bad field and why (google.rpc.BadRequest).
        self.violations: Dict[str, str] = {}

    @property
    def reason_value(self) -> int:
        """The reason as an ``ErrorReason`` value (``ERROR_REASON_UNSPECIFIED`` if unknown)."""
        try:
            return pb.ErrorReason.Value(self.reason)
        except ValueError:
            return pb.ERROR_REASON_UNSPECIFIED

    def _int(self, name: str) -> int:
        try:
            return int(self.metadata.get(name, "0"))
        except ValueError:
            return 0


class InvalidArgument(TallyError):
    """A field breaks a limit; ``violations`` maps each bad field to why."""


class AccountNotFound(TallyError):
    """No such account (accounts begin with a grant or OpenAccount)."""


class HoldNotFound(TallyError):
    """No such hold."""


class IdempotencyKeyReused(TallyError):
    """The key was used for a different request: a caller bug, never retried."""


class AccountExists(TallyError):
    """OpenAccount of an account that exists."""


class InsufficientCredits(TallyError):
    """Not enough available credits: top up; retrying will not help."""

    @property
    def available(self) -> int:
        return self._int("available")

    @property
    def requested(self) -> int:
        return self._int("requested")


class HoldAlreadyCommitted(TallyError):
    """Commit or extend of a committed hold."""


class HoldReleased(TallyError):
    """The hold was released."""


class HoldExpired(TallyError):
    """The hold passed its expiry; its credits went back."""


class HoldNotCommitted(TallyError):
    """A partial refund of an open hold."""


class RefundExceedsCharge(TallyError):
    """A refund beyond what is committed and not yet refunded."""

    @property
    def refundable(self) -> int:
        return self._int("refundable")

    @property
    def requested(self) -> int:
        return self._int("requested")


class BalanceLimitExceeded(TallyError):
    """The balance would pass its limit."""

    @property
    def limit(self) -> int:
        return self._int("limit")


class Unauthenticated(TallyError):
    """No, malformed or unknown bearer token."""


class PermissionDenied(TallyError):
    """The caller may not do this, or not on this account."""


class Unavailable(TallyError):
    """The server or its database stayed unavailable, overloaded or busy through every retry."""


class OutcomeUnknown(TallyError):
    """The call may or may not have happened: retry it with :attr:`key` (it replays or applies)."""


class Internal(TallyError):
    """A bug in Tally."""


_BY_REASON: Dict[str, Type[TallyError]] = {
    "INVALID_ARGUMENT": InvalidArgument,
    "ACCOUNT_NOT_FOUND": AccountNotFound,
    "HOLD_NOT_FOUND": HoldNotFound,
    "IDEMPOTENCY_KEY_REUSED": IdempotencyKeyReused,
    "ACCOUNT_EXISTS": AccountExists,
    "INSUFFICIENT_CREDITS": InsufficientCredits,
    "HOLD_ALREADY_COMMITTED": HoldAlreadyCommitted,
    "HOLD_RELEASED": HoldReleased,
    "HOLD_EXPIRED": HoldExpired,
    "HOLD_NOT_COMMITTED": HoldNotCommitted,
    "REFUND_EXCEEDS_CHARGE": RefundExceedsCharge,
    "BALANCE_LIMIT_EXCEEDED": BalanceLimitExceeded,
    "CONCURRENT_MODIFICATION": Unavailable,
    "DATABASE_UNAVAILABLE": Unavailable,
    "OVERLOADED": Unavailable,
    "RATE_LIMITED": Unavailable,
    "TOO_MANY_STREAMS": Unavailable,
    "SHUTTING_DOWN": Unavailable,
    "OUTCOME_UNKNOWN": OutcomeUnknown,
    "INTERNAL": Internal,
    "UNAUTHENTICATED": Unauthenticated,
    "PERMISSION_DENIED": PermissionDenied,
}

_BY_CODE: Dict[grpc.StatusCode, Type[TallyError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Unavailable,
    grpc.StatusCode.ABORTED: Unavailable,
    grpc.StatusCode.INTERNAL: Internal,
}


def details(error: grpc.RpcError):
    """The ErrorInfo, RetryInfo and BadRequest of a failed call (each ``None`` when absent)."""
    info = retry = bad = None
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError:
        status = None
    for d in status.details if status is not None else []:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
        elif d.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            d.Unpack(retry)
        elif d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            d.Unpack(bad)
    return info, retry, bad


def from_rpc_error(error: grpc.RpcError, key: Optional[str] = None) -> TallyError:
    """The typed error of a failed call."""
    code = error.code()  # type: ignore[attr-defined]
    message = error.details() or ""  # type: ignore[attr-defined]
    info, _, bad = details(error)
    reason = info.reason if info is not None else code.name
    metadata: Dict[str, str] = dict(info.metadata) if info is not None else {}
    cls = _BY_REASON.get(reason) or _BY_CODE.get(code, TallyError)
    e = cls(code, reason, message, metadata, key)
    if bad is not None:
        e.violations = {v.field: v.description for v in bad.field_violations}
    return e
