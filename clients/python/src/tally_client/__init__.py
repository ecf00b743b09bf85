"""A Python client for Tally: credits around expensive generation jobs.

::

    from tally_client import Client, InsufficientCredits

    client = Client("tally:50051", token)
    try:
        with client.job("user_1", operation="video_export", params={"seconds": 12}) as job:
            job.commit(render())  # an exception releases the hold instead
    except InsufficientCredits as e:
        print(f"{e.available} available, {e.requested} needed")
"""

from ._client import MAX_AMOUNT, Balance, Client, Hold, Job, Settled, new_key
from .errors import (
    AccountExists,
    AccountNotFound,
    BalanceLimitExceeded,
    HoldAlreadyCommitted,
    HoldExpired,
    HoldNotCommitted,
    HoldNotFound,
    HoldReleased,
    IdempotencyKeyReused,
    InsufficientCredits,
    Internal,
    InvalidArgument,
    OutcomeUnknown,
    PermissionDenied,
    RefundExceedsCharge,
    TallyError,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "MAX_AMOUNT", "Balance", "Client", "Hold", "Job", "Settled", "new_key",
    "AccountExists", "AccountNotFound", "BalanceLimitExceeded", "HoldAlreadyCommitted",
    "HoldExpired", "HoldNotCommitted", "HoldNotFound", "HoldReleased", "IdempotencyKeyReused",
    "InsufficientCredits", "Internal", "InvalidArgument", "OutcomeUnknown", "PermissionDenied",
    "RefundExceedsCharge", "TallyError", "Unauthenticated", "Unavailable",
]
