import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HoldState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HOLD_STATE_UNSPECIFIED: _ClassVar[HoldState]
    HOLD_STATE_OPEN: _ClassVar[HoldState]
    HOLD_STATE_COMMITTED: _ClassVar[HoldState]
    HOLD_STATE_RELEASED: _ClassVar[HoldState]
    HOLD_STATE_EXPIRED: _ClassVar[HoldState]

class ErrorReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_REASON_UNSPECIFIED: _ClassVar[ErrorReason]
    INVALID_ARGUMENT: _ClassVar[ErrorReason]
    ACCOUNT_NOT_FOUND: _ClassVar[ErrorReason]
    HOLD_NOT_FOUND: _ClassVar[ErrorReason]
    IDEMPOTENCY_KEY_REUSED: _ClassVar[ErrorReason]
    ACCOUNT_EXISTS: _ClassVar[ErrorReason]
    INSUFFICIENT_CREDITS: _ClassVar[ErrorReason]
    HOLD_ALREADY_COMMITTED: _ClassVar[ErrorReason]
    HOLD_RELEASED: _ClassVar[ErrorReason]
    HOLD_EXPIRED: _ClassVar[ErrorReason]
    HOLD_NOT_COMMITTED: _ClassVar[ErrorReason]
    REFUND_EXCEEDS_CHARGE: _ClassVar[ErrorReason]
    BALANCE_LIMIT_EXCEEDED: _ClassVar[ErrorReason]
    CONCURRENT_MODIFICATION: _ClassVar[ErrorReason]
    DATABASE_UNAVAILABLE: _ClassVar[ErrorReason]
    OUTCOME_UNKNOWN: _ClassVar[ErrorReason]
    INTERNAL: _ClassVar[ErrorReason]
    UNAUTHENTICATED: _ClassVar[ErrorReason]
    PERMISSION_DENIED: _ClassVar[ErrorReason]
    RATE_LIMITED: _ClassVar[ErrorReason]
    OVERLOADED: _ClassVar[ErrorReason]
    UNIMPLEMENTED: _ClassVar[ErrorReason]
    CLIENT_GAVE_UP: _ClassVar[ErrorReason]
    TOO_MANY_STREAMS: _ClassVar[ErrorReason]
    SHUTTING_DOWN: _ClassVar[ErrorReason]

class GrantSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GRANT_SOURCE_UNSPECIFIED: _ClassVar[GrantSource]
    GRANT_SOURCE_PURCHASE: _ClassVar[GrantSource]
    GRANT_SOURCE_SUBSCRIPTION: _ClassVar[GrantSource]
    GRANT_SOURCE_ALLOWANCE: _ClassVar[GrantSource]
    GRANT_SOURCE_SIGNUP_BONUS: _ClassVar[GrantSource]
    GRANT_SOURCE_PROMOTION: _ClassVar[GrantSource]
    GRANT_SOURCE_ADJUSTMENT: _ClassVar[GrantSource]
    GRANT_SOURCE_REFUND: _ClassVar[GrantSource]
    GRANT_SOURCE_TRANSFER: _ClassVar[GrantSource]

class EntryKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENTRY_KIND_UNSPECIFIED: _ClassVar[EntryKind]
    ENTRY_KIND_GRANT: _ClassVar[EntryKind]
    ENTRY_KIND_RESERVE: _ClassVar[EntryKind]
    ENTRY_KIND_COMMIT: _ClassVar[EntryKind]
    ENTRY_KIND_RELEASE: _ClassVar[EntryKind]
    ENTRY_KIND_EXPIRE: _ClassVar[EntryKind]
    ENTRY_KIND_REFUND: _ClassVar[EntryKind]
    ENTRY_KIND_EXPIRATION: _ClassVar[EntryKind]
    ENTRY_KIND_ADJUSTMENT: _ClassVar[EntryKind]
    ENTRY_KIND_TRANSFER_OUT: _ClassVar[EntryKind]
    ENTRY_KIND_TRANSFER_IN: _ClassVar[EntryKind]
    ENTRY_KIND_CLAWBACK: _ClassVar[EntryKind]
    ENTRY_KIND_DEBT_PAYMENT: _ClassVar[EntryKind]

class EventDeliveryState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_DELIVERY_STATE_UNSPECIFIED: _ClassVar[EventDeliveryState]
    EVENT_DELIVERY_STATE_PENDING: _ClassVar[EventDeliveryState]
    EVENT_DELIVERY_STATE_DELIVERED: _ClassVar[EventDeliveryState]
    EVENT_DELIVERY_STATE_FAILED: _ClassVar[EventDeliveryState]
HOLD_STATE_UNSPECIFIED: HoldState
HOLD_STATE_OPEN: HoldState
HOLD_STATE_COMMITTED: HoldState
HOLD_STATE_RELEASED: HoldState
HOLD_STATE_EXPIRED: HoldState
ERROR_REASON_UNSPECIFIED: ErrorReason
INVALID_ARGUMENT: ErrorReason
ACCOUNT_NOT_FOUND: ErrorReason
HOLD_NOT_FOUND: ErrorReason
IDEMPOTENCY_KEY_REUSED: ErrorReason
ACCOUNT_EXISTS: ErrorReason
INSUFFICIENT_CREDITS: ErrorReason
HOLD_ALREADY_COMMITTED: ErrorReason
HOLD_RELEASED: ErrorReason
HOLD_EXPIRED: ErrorReason
HOLD_NOT_COMMITTED: ErrorReason
REFUND_EXCEEDS_CHARGE: ErrorReason
BALANCE_LIMIT_EXCEEDED: ErrorReason
CONCURRENT_MODIFICATION: ErrorReason
DATABASE_UNAVAILABLE: ErrorReason
OUTCOME_UNKNOWN: ErrorReason
INTERNAL: ErrorReason
UNAUTHENTICATED: ErrorReason
PERMISSION_DENIED: ErrorReason
RATE_LIMITED: ErrorReason
OVERLOADED: ErrorReason
UNIMPLEMENTED: ErrorReason
CLIENT_GAVE_UP: ErrorReason
TOO_MANY_STREAMS: ErrorReason
SHUTTING_DOWN: ErrorReason
GRANT_SOURCE_UNSPECIFIED: GrantSource
GRANT_SOURCE_PURCHASE: GrantSource
GRANT_SOURCE_SUBSCRIPTION: GrantSource
GRANT_SOURCE_ALLOWANCE: GrantSource
GRANT_SOURCE_SIGNUP_BONUS: GrantSource
GRANT_SOURCE_PROMOTION: GrantSource
GRANT_SOURCE_ADJUSTMENT: GrantSource
GRANT_SOURCE_REFUND: GrantSource
GRANT_SOURCE_TRANSFER: GrantSource
ENTRY_KIND_UNSPECIFIED: EntryKind
ENTRY_KIND_GRANT: EntryKind
ENTRY_KIND_RESERVE: EntryKind
ENTRY_KIND_COMMIT: EntryKind
ENTRY_KIND_RELEASE: EntryKind
ENTRY_KIND_EXPIRE: EntryKind
ENTRY_KIND_REFUND: EntryKind
ENTRY_KIND_EXPIRATION: EntryKind
ENTRY_KIND_ADJUSTMENT: EntryKind
ENTRY_KIND_TRANSFER_OUT: EntryKind
ENTRY_KIND_TRANSFER_IN: EntryKind
ENTRY_KIND_CLAWBACK: EntryKind
ENTRY_KIND_DEBT_PAYMENT: EntryKind
EVENT_DELIVERY_STATE_UNSPECIFIED: EventDeliveryState
EVENT_DELIVERY_STATE_PENDING: EventDeliveryState
EVENT_DELIVERY_STATE_DELIVERED: EventDeliveryState
EVENT_DELIVERY_STATE_FAILED: EventDeliveryState

class Hold(_message.Message):
    __slots__ = ("hold_id", "account_id", "amount", "state", "committed_amount", "refunded_amount", "created_at", "expires_at", "resolved_at", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    HOLD_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_AMOUNT_FIELD_NUMBER: _ClassVar[int]
    REFUNDED_AMOUNT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_AT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    hold_id: str
    account_id: str
    amount: int
    state: HoldState
    committed_amount: int
    refunded_amount: int
    created_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    resolved_at: _timestamp_pb2.Timestamp
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, hold_id: _Optional[str] = ..., account_id: _Optional[str] = ..., amount: _Optional[int] = ..., state: _Optional[_Union[HoldState, str]] = ..., committed_amount: _Optional[int] = ..., refunded_amount: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., resolved_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CheckBalanceRequest(_message.Message):
    __slots__ = ("account_id",)
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    def __init__(self, account_id: _Optional[str] = ...) -> None: ...

class CheckBalanceResponse(_message.Message):
    __slots__ = ("account_id", "plan", "low_balance", "by_source", "next_expiry", "allowance_left", "entitlements", "available", "held", "open_holds", "debt")
    class BySourceEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class EntitlementsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    LOW_BALANCE_FIELD_NUMBER: _ClassVar[int]
    BY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    NEXT_EXPIRY_FIELD_NUMBER: _ClassVar[int]
    ALLOWANCE_LEFT_FIELD_NUMBER: _ClassVar[int]
    ENTITLEMENTS_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    OPEN_HOLDS_FIELD_NUMBER: _ClassVar[int]
    DEBT_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    plan: str
    low_balance: bool
    by_source: _containers.ScalarMap[str, int]
    next_expiry: Expiry
    allowance_left: int
    entitlements: _containers.ScalarMap[str, str]
    available: int
    held: int
    open_holds: int
    debt: int
    def __init__(self, account_id: _Optional[str] = ..., plan: _Optional[str] = ..., low_balance: _Optional[bool] = ..., by_source: _Optional[_Mapping[str, int]] = ..., next_expiry: _Optional[_Union[Expiry, _Mapping]] = ..., allowance_left: _Optional[int] = ..., entitlements: _Optional[_Mapping[str, str]] = ..., available: _Optional[int] = ..., held: _Optional[int] = ..., open_holds: _Optional[int] = ..., debt: _Optional[int] = ...) -> None: ...

class WatchBalanceRequest(_message.Message):
    __slots__ = ("account_id", "after_version")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    after_version: int
    def __init__(self, account_id: _Optional[str] = ..., after_version: _Optional[int] = ...) -> None: ...

class WatchBalanceResponse(_message.Message):
    __slots__ = ("version", "balance")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BALANCE_FIELD_NUMBER: _ClassVar[int]
    version: int
    balance: CheckBalanceResponse
    def __init__(self, version: _Optional[int] = ..., balance: _Optional[_Union[CheckBalanceResponse, _Mapping]] = ...) -> None: ...

class Expiry(_message.Message):
    __slots__ = ("at", "amount")
    AT_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    at: _timestamp_pb2.Timestamp
    amount: int
    def __init__(self, at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., amount: _Optional[int] = ...) -> None: ...

class CreditGrant(_message.Message):
    __slots__ = ("grant_id", "source", "granted", "remaining", "held", "expired", "expires_at", "priority", "reason", "created_at")
    GRANT_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    grant_id: str
    source: GrantSource
    granted: int
    remaining: int
    held: int
    expired: int
    expires_at: _timestamp_pb2.Timestamp
    priority: int
    reason: str
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, grant_id: _Optional[str] = ..., source: _Optional[_Union[GrantSource, str]] = ..., granted: _Optional[int] = ..., remaining: _Optional[int] = ..., held: _Optional[int] = ..., expired: _Optional[int] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., priority: _Optional[int] = ..., reason: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("account_id", "amount", "operation", "idempotency_key", "ttl", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    amount: int
    operation: PricedOperation
    idempotency_key: str
    ttl: _duration_pb2.Duration
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, account_id: _Optional[str] = ..., amount: _Optional[int] = ..., operation: _Optional[_Union[PricedOperation, _Mapping]] = ..., idempotency_key: _Optional[str] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class PricedOperation(_message.Message):
    __slots__ = ("name", "params")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    name: str
    params: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., params: _Optional[_Mapping[str, str]] = ...) -> None: ...

class EstimateCostRequest(_message.Message):
    __slots__ = ("operation", "params")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    operation: str
    params: _containers.ScalarMap[str, str]
    def __init__(self, operation: _Optional[str] = ..., params: _Optional[_Mapping[str, str]] = ...) -> None: ...

class EstimateCostResponse(_message.Message):
    __slots__ = ("cost", "exact", "factors")
    COST_FIELD_NUMBER: _ClassVar[int]
    EXACT_FIELD_NUMBER: _ClassVar[int]
    FACTORS_FIELD_NUMBER: _ClassVar[int]
    cost: int
    exact: str
    factors: _containers.RepeatedCompositeFieldContainer[CostFactor]
    def __init__(self, cost: _Optional[int] = ..., exact: _Optional[str] = ..., factors: _Optional[_Iterable[_Union[CostFactor, _Mapping]]] = ...) -> None: ...

class ListOperationsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListOperationsResponse(_message.Message):
    __slots__ = ("operations",)
    OPERATIONS_FIELD_NUMBER: _ClassVar[int]
    operations: _containers.RepeatedCompositeFieldContainer[PricedOperationInfo]
    def __init__(self, operations: _Optional[_Iterable[_Union[PricedOperationInfo, _Mapping]]] = ...) -> None: ...

class PricedOperationInfo(_message.Message):
    __slots__ = ("name", "description", "params", "formula", "base")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    FORMULA_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    params: _containers.RepeatedCompositeFieldContainer[OperationParam]
    formula: str
    base: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., params: _Optional[_Iterable[_Union[OperationParam, _Mapping]]] = ..., formula: _Optional[str] = ..., base: _Optional[str] = ...) -> None: ...

class OperationParam(_message.Message):
    __slots__ = ("name", "kind", "allowed_values", "min", "max", "unit", "per_unit", "required")
    class AllowedValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_VALUES_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    PER_UNIT_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    allowed_values: _containers.ScalarMap[str, str]
    min: str
    max: str
    unit: str
    per_unit: str
    required: bool
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., allowed_values: _Optional[_Mapping[str, str]] = ..., min: _Optional[str] = ..., max: _Optional[str] = ..., unit: _Optional[str] = ..., per_unit: _Optional[str] = ..., required: _Optional[bool] = ...) -> None: ...

class CostFactor(_message.Message):
    __slots__ = ("name", "value", "detail")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: str
    detail: str
    def __init__(self, name: _Optional[str] = ..., value: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("hold", "available")
    HOLD_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    hold: Hold
    available: int
    def __init__(self, hold: _Optional[_Union[Hold, _Mapping]] = ..., available: _Optional[int] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("hold_id", "amount", "idempotency_key")
    HOLD_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    hold_id: str
    amount: int
    idempotency_key: str
    def __init__(self, hold_id: _Optional[str] = ..., amount: _Optional[int] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("hold", "released", "extra_drawn", "available")
    HOLD_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    EXTRA_DRAWN_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    hold: Hold
    released: int
    extra_drawn: int
    available: int
    def __init__(self, hold: _Optional[_Union[Hold, _Mapping]] = ..., released: _Optional[int] = ..., extra_drawn: _Optional[int] = ..., available: _Optional[int] = ...) -> None: ...

class RefundRequest(_message.Message):
    __slots__ = ("hold_id", "amount", "reason", "idempotency_key")
    HOLD_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    hold_id: str
    amount: int
    reason: str
    idempotency_key: str
    def __init__(self, hold_id: _Optional[str] = ..., amount: _Optional[int] = ..., reason: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class RefundResponse(_message.Message):
    __slots__ = ("hold", "refunded", "available")
    HOLD_FIELD_NUMBER: _ClassVar[int]
    REFUNDED_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    hold: Hold
    refunded: int
    available: int
    def __init__(self, hold: _Optional[_Union[Hold, _Mapping]] = ..., refunded: _Optional[int] = ..., available: _Optional[int] = ...) -> None: ...

class ExtendHoldRequest(_message.Message):
    __slots__ = ("hold_id", "ttl", "idempotency_key")
    HOLD_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    hold_id: str
    ttl: _duration_pb2.Duration
    idempotency_key: str
    def __init__(self, hold_id: _Optional[str] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class ExtendHoldResponse(_message.Message):
    __slots__ = ("hold",)
    HOLD_FIELD_NUMBER: _ClassVar[int]
    hold: Hold
    def __init__(self, hold: _Optional[_Union[Hold, _Mapping]] = ...) -> None: ...

class GetHoldRequest(_message.Message):
    __slots__ = ("hold_id",)
    HOLD_ID_FIELD_NUMBER: _ClassVar[int]
    hold_id: str
    def __init__(self, hold_id: _Optional[str] = ...) -> None: ...

class GetHoldResponse(_message.Message):
    __slots__ = ("hold",)
    HOLD_FIELD_NUMBER: _ClassVar[int]
    hold: Hold
    def __init__(self, hold: _Optional[_Union[Hold, _Mapping]] = ...) -> None: ...

class ListHoldsRequest(_message.Message):
    __slots__ = ("account_id", "states", "page_size", "page_token")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    states: _containers.RepeatedScalarFieldContainer[HoldState]
    page_size: int
    page_token: str
    def __init__(self, account_id: _Optional[str] = ..., states: _Optional[_Iterable[_Union[HoldState, str]]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListHoldsResponse(_message.Message):
    __slots__ = ("holds", "next_page_token")
    HOLDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    holds: _containers.RepeatedCompositeFieldContainer[Hold]
    next_page_token: str
    def __init__(self, holds: _Optional[_Iterable[_Union[Hold, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GrantRequest(_message.Message):
    __slots__ = ("account_id", "amount", "reason", "idempotency_key", "source", "expires_at", "priority")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    amount: int
    reason: str
    idempotency_key: str
    source: GrantSource
    expires_at: _timestamp_pb2.Timestamp
    priority: int
    def __init__(self, account_id: _Optional[str] = ..., amount: _Optional[int] = ..., reason: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., source: _Optional[_Union[GrantSource, str]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., priority: _Optional[int] = ...) -> None: ...

class GrantResponse(_message.Message):
    __slots__ = ("account_id", "available", "grant_id")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    GRANT_ID_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    available: int
    grant_id: str
    def __init__(self, account_id: _Optional[str] = ..., available: _Optional[int] = ..., grant_id: _Optional[str] = ...) -> None: ...

class OpenAccountRequest(_message.Message):
    __slots__ = ("account_id", "plan", "idempotency_key")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    plan: str
    idempotency_key: str
    def __init__(self, account_id: _Optional[str] = ..., plan: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class OpenAccountResponse(_message.Message):
    __slots__ = ("account_id", "plan", "bonus", "available")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    BONUS_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    plan: str
    bonus: int
    available: int
    def __init__(self, account_id: _Optional[str] = ..., plan: _Optional[str] = ..., bonus: _Optional[int] = ..., available: _Optional[int] = ...) -> None: ...

class AdjustRequest(_message.Message):
    __slots__ = ("account_id", "delta", "reason", "operator", "idempotency_key")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    delta: int
    reason: str
    operator: str
    idempotency_key: str
    def __init__(self, account_id: _Optional[str] = ..., delta: _Optional[int] = ..., reason: _Optional[str] = ..., operator: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class AdjustResponse(_message.Message):
    __slots__ = ("account_id", "delta", "available")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    delta: int
    available: int
    def __init__(self, account_id: _Optional[str] = ..., delta: _Optional[int] = ..., available: _Optional[int] = ...) -> None: ...

class TransferRequest(_message.Message):
    __slots__ = ("from_account_id", "to_account_id", "amount", "reason", "idempotency_key")
    FROM_ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    TO_ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    from_account_id: str
    to_account_id: str
    amount: int
    reason: str
    idempotency_key: str
    def __init__(self, from_account_id: _Optional[str] = ..., to_account_id: _Optional[str] = ..., amount: _Optional[int] = ..., reason: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class TransferResponse(_message.Message):
    __slots__ = ("amount", "from_available", "to_available")
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    FROM_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    TO_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    amount: int
    from_available: int
    to_available: int
    def __init__(self, amount: _Optional[int] = ..., from_available: _Optional[int] = ..., to_available: _Optional[int] = ...) -> None: ...

class SetPlanRequest(_message.Message):
    __slots__ = ("account_id", "plan", "idempotency_key")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    plan: str
    idempotency_key: str
    def __init__(self, account_id: _Optional[str] = ..., plan: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class SetPlanResponse(_message.Message):
    __slots__ = ("account_id", "previous_plan", "plan")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_PLAN_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    previous_plan: str
    plan: str
    def __init__(self, account_id: _Optional[str] = ..., previous_plan: _Optional[str] = ..., plan: _Optional[str] = ...) -> None: ...

class GetAccountRequest(_message.Message):
    __slots__ = ("account_id",)
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    def __init__(self, account_id: _Optional[str] = ...) -> None: ...

class Account(_message.Message):
    __slots__ = ("account_id", "plan", "plan_display_name", "available", "held", "open_holds", "low_balance", "low_balance_threshold", "entitlements", "created_at", "allowance_left", "used_this_period", "debt")
    class EntitlementsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    PLAN_DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    OPEN_HOLDS_FIELD_NUMBER: _ClassVar[int]
    LOW_BALANCE_FIELD_NUMBER: _ClassVar[int]
    LOW_BALANCE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ENTITLEMENTS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ALLOWANCE_LEFT_FIELD_NUMBER: _ClassVar[int]
    USED_THIS_PERIOD_FIELD_NUMBER: _ClassVar[int]
    DEBT_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    plan: str
    plan_display_name: str
    available: int
    held: int
    open_holds: int
    low_balance: bool
    low_balance_threshold: int
    entitlements: _containers.ScalarMap[str, str]
    created_at: _timestamp_pb2.Timestamp
    allowance_left: int
    used_this_period: int
    debt: int
    def __init__(self, account_id: _Optional[str] = ..., plan: _Optional[str] = ..., plan_display_name: _Optional[str] = ..., available: _Optional[int] = ..., held: _Optional[int] = ..., open_holds: _Optional[int] = ..., low_balance: _Optional[bool] = ..., low_balance_threshold: _Optional[int] = ..., entitlements: _Optional[_Mapping[str, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., allowance_left: _Optional[int] = ..., used_this_period: _Optional[int] = ..., debt: _Optional[int] = ...) -> None: ...

class GetAccountResponse(_message.Message):
    __slots__ = ("account", "grants", "open_holds")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    OPEN_HOLDS_FIELD_NUMBER: _ClassVar[int]
    account: Account
    grants: _containers.RepeatedCompositeFieldContainer[CreditGrant]
    open_holds: _containers.RepeatedCompositeFieldContainer[Hold]
    def __init__(self, account: _Optional[_Union[Account, _Mapping]] = ..., grants: _Optional[_Iterable[_Union[CreditGrant, _Mapping]]] = ..., open_holds: _Optional[_Iterable[_Union[Hold, _Mapping]]] = ...) -> None: ...

class ListAccountsRequest(_message.Message):
    __slots__ = ("plan", "low_balance_only", "page_size", "page_token")
    PLAN_FIELD_NUMBER: _ClassVar[int]
    LOW_BALANCE_ONLY_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    plan: str
    low_balance_only: bool
    page_size: int
    page_token: str
    def __init__(self, plan: _Optional[str] = ..., low_balance_only: _Optional[bool] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class AccountListing(_message.Message):
    __slots__ = ("account_id", "plan", "available", "held", "low_balance", "debt")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    LOW_BALANCE_FIELD_NUMBER: _ClassVar[int]
    DEBT_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    plan: str
    available: int
    held: int
    low_balance: bool
    debt: int
    def __init__(self, account_id: _Optional[str] = ..., plan: _Optional[str] = ..., available: _Optional[int] = ..., held: _Optional[int] = ..., low_balance: _Optional[bool] = ..., debt: _Optional[int] = ...) -> None: ...

class ListAccountsResponse(_message.Message):
    __slots__ = ("accounts", "next_page_token")
    ACCOUNTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    accounts: _containers.RepeatedCompositeFieldContainer[AccountListing]
    next_page_token: str
    def __init__(self, accounts: _Optional[_Iterable[_Union[AccountListing, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class Entry(_message.Message):
    __slots__ = ("entry_id", "account_id", "hold_id", "kind", "available_delta", "held_delta", "reason", "created_at", "grant_id")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    HOLD_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_DELTA_FIELD_NUMBER: _ClassVar[int]
    HELD_DELTA_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    GRANT_ID_FIELD_NUMBER: _ClassVar[int]
    entry_id: int
    account_id: str
    hold_id: str
    kind: EntryKind
    available_delta: int
    held_delta: int
    reason: str
    created_at: _timestamp_pb2.Timestamp
    grant_id: str
    def __init__(self, entry_id: _Optional[int] = ..., account_id: _Optional[str] = ..., hold_id: _Optional[str] = ..., kind: _Optional[_Union[EntryKind, str]] = ..., available_delta: _Optional[int] = ..., held_delta: _Optional[int] = ..., reason: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., grant_id: _Optional[str] = ...) -> None: ...

class ListEntriesRequest(_message.Message):
    __slots__ = ("account_id", "kinds", "since", "until", "page_size", "page_token")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    kinds: _containers.RepeatedScalarFieldContainer[EntryKind]
    since: _timestamp_pb2.Timestamp
    until: _timestamp_pb2.Timestamp
    page_size: int
    page_token: str
    def __init__(self, account_id: _Optional[str] = ..., kinds: _Optional[_Iterable[_Union[EntryKind, str]]] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListEntriesResponse(_message.Message):
    __slots__ = ("entries", "next_page_token")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[Entry]
    next_page_token: str
    def __init__(self, entries: _Optional[_Iterable[_Union[Entry, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ExportUsageRequest(_message.Message):
    __slots__ = ("since", "until", "account_id")
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    since: _timestamp_pb2.Timestamp
    until: _timestamp_pb2.Timestamp
    account_id: str
    def __init__(self, since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., account_id: _Optional[str] = ...) -> None: ...

class ExportUsageResponse(_message.Message):
    __slots__ = ("csv",)
    CSV_FIELD_NUMBER: _ClassVar[int]
    csv: bytes
    def __init__(self, csv: _Optional[bytes] = ...) -> None: ...

class EventDelivery(_message.Message):
    __slots__ = ("event_id", "endpoint", "account_id", "type", "state", "attempts", "created_at", "next_attempt_at", "last_attempt_at", "last_status", "last_error", "delivered_at", "body")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    NEXT_ATTEMPT_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_ATTEMPT_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_STATUS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_AT_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    endpoint: str
    account_id: str
    type: str
    state: EventDeliveryState
    attempts: int
    created_at: _timestamp_pb2.Timestamp
    next_attempt_at: _timestamp_pb2.Timestamp
    last_attempt_at: _timestamp_pb2.Timestamp
    last_status: int
    last_error: str
    delivered_at: _timestamp_pb2.Timestamp
    body: str
    def __init__(self, event_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., account_id: _Optional[str] = ..., type: _Optional[str] = ..., state: _Optional[_Union[EventDeliveryState, str]] = ..., attempts: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., next_attempt_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_attempt_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_status: _Optional[int] = ..., last_error: _Optional[str] = ..., delivered_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., body: _Optional[str] = ...) -> None: ...

class ListEventDeliveriesRequest(_message.Message):
    __slots__ = ("account_id", "type", "state", "endpoint", "event_id", "page_size", "page_token")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    type: str
    state: EventDeliveryState
    endpoint: str
    event_id: str
    page_size: int
    page_token: str
    def __init__(self, account_id: _Optional[str] = ..., type: _Optional[str] = ..., state: _Optional[_Union[EventDeliveryState, str]] = ..., endpoint: _Optional[str] = ..., event_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListEventDeliveriesResponse(_message.Message):
    __slots__ = ("deliveries", "next_page_token")
    DELIVERIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    deliveries: _containers.RepeatedCompositeFieldContainer[EventDelivery]
    next_page_token: str
    def __init__(self, deliveries: _Optional[_Iterable[_Union[EventDelivery, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RedeliverEventRequest(_message.Message):
    __slots__ = ("event_id", "endpoint")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    endpoint: str
    def __init__(self, event_id: _Optional[str] = ..., endpoint: _Optional[str] = ...) -> None: ...

class RedeliverEventResponse(_message.Message):
    __slots__ = ("queued",)
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    queued: int
    def __init__(self, queued: _Optional[int] = ...) -> None: ...

class ListEventEndpointsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EventEndpoint(_message.Message):
    __slots__ = ("name", "origin", "types", "disabled", "disabled_at", "disabled_reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    TYPES_FIELD_NUMBER: _ClassVar[int]
    DISABLED_FIELD_NUMBER: _ClassVar[int]
    DISABLED_AT_FIELD_NUMBER: _ClassVar[int]
    DISABLED_REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    origin: str
    types: _containers.RepeatedScalarFieldContainer[str]
    disabled: bool
    disabled_at: _timestamp_pb2.Timestamp
    disabled_reason: str
    def __init__(self, name: _Optional[str] = ..., origin: _Optional[str] = ..., types: _Optional[_Iterable[str]] = ..., disabled: _Optional[bool] = ..., disabled_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., disabled_reason: _Optional[str] = ...) -> None: ...

class ListEventEndpointsResponse(_message.Message):
    __slots__ = ("endpoints",)
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    endpoints: _containers.RepeatedCompositeFieldContainer[EventEndpoint]
    def __init__(self, endpoints: _Optional[_Iterable[_Union[EventEndpoint, _Mapping]]] = ...) -> None: ...

class EnableEventEndpointRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class EnableEventEndpointResponse(_message.Message):
    __slots__ = ("was_disabled",)
    WAS_DISABLED_FIELD_NUMBER: _ClassVar[int]
    was_disabled: bool
    def __init__(self, was_disabled: _Optional[bool] = ...) -> None: ...
