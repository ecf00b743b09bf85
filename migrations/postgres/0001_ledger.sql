-- The ledger: accounts with balance columns, holds, append-only entries, idempotency records.
-- Constraint names are stable: the storage layer maps them to typed errors on both backends.

CREATE TABLE account (
    account_id  TEXT        PRIMARY KEY,
    -- Credits a reserve can take. Only a claw-back may ever take it below zero (not yet).
    available   BIGINT      NOT NULL DEFAULT 0,
    -- Credits held by holds stored as open.
    held        BIGINT      NOT NULL DEFAULT 0,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT account_available_nonnegative CHECK (available >= 0),
    CONSTRAINT account_held_nonnegative CHECK (held >= 0),
    -- 10^15: see domain::MAX_BALANCE.
    CONSTRAINT account_balance_limit CHECK (available + held <= 1000000000000000)
);

CREATE TABLE hold (
    hold_id          TEXT        PRIMARY KEY,
    account_id       TEXT        NOT NULL REFERENCES account (account_id),
    amount           BIGINT      NOT NULL,
    state            TEXT        NOT NULL DEFAULT 'open',
    committed_amount BIGINT      NOT NULL DEFAULT 0,
    refunded_amount  BIGINT      NOT NULL DEFAULT 0,
    metadata         TEXT        NOT NULL DEFAULT '{}',
    created_at       TIMESTAMPTZ NOT NULL,
    expires_at       TIMESTAMPTZ NOT NULL,
    resolved_at      TIMESTAMPTZ,
    CONSTRAINT hold_amount_positive CHECK (amount > 0),
    CONSTRAINT hold_state_known CHECK (state IN ('open', 'committed', 'released', 'expired')),
    -- Only a committed hold has a charge, and refunds never exceed it.
    CONSTRAINT hold_committed_amount CHECK (committed_amount >= 0 AND (state = 'committed' OR committed_amount = 0)),
    CONSTRAINT hold_refund_within_charge CHECK (refunded_amount >= 0 AND refunded_amount <= committed_amount),
    CONSTRAINT hold_resolved_when_closed CHECK ((state = 'open') = (resolved_at IS NULL))
);
-- The sweeper's queue and each account's lazy expiry: only open holds, by expiry.
CREATE INDEX hold_open_by_expiry ON hold (expires_at) WHERE state = 'open';
CREATE INDEX hold_open_by_account ON hold (account_id, expires_at) WHERE state = 'open';
-- ListHolds: an account's holds newest first (hold ids are time-ordered UUIDv7).
CREATE INDEX hold_by_account ON hold (account_id, hold_id);

-- Every balance change is one entry, written in the same transaction as the change:
-- per account, sum(available_delta) = available and sum(held_delta) = held.
CREATE TABLE entry (
    entry_id        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id      TEXT        NOT NULL REFERENCES account (account_id),
    hold_id         TEXT        REFERENCES hold (hold_id),
    kind            TEXT        NOT NULL,
    available_delta BIGINT      NOT NULL,
    held_delta      BIGINT      NOT NULL,
    reason          TEXT        NOT NULL DEFAULT '',
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT entry_kind_known CHECK (kind IN ('grant', 'reserve', 'commit', 'release', 'expire', 'refund')),
    CONSTRAINT entry_changes_something CHECK (available_delta <> 0 OR held_delta <> 0)
);
CREATE INDEX entry_by_account ON entry (account_id, entry_id);

-- Entries are append-only: corrections are new entries.
CREATE FUNCTION entry_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'entry is append-only' USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER entry_append_only BEFORE UPDATE OR DELETE ON entry
    FOR EACH ROW EXECUTE FUNCTION entry_append_only();

-- One row per (caller, key), written in the same transaction as the effects it records.
-- `response` is the JSON outcome replayed to a retry with the same fingerprint.
CREATE TABLE idempotency_record (
    caller          TEXT        NOT NULL,
    idempotency_key TEXT        NOT NULL,
    fingerprint     BYTEA       NOT NULL,
    response        TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT idempotency_record_pkey PRIMARY KEY (caller, idempotency_key)
);
-- Retention purge walks records by age.
CREATE INDEX idempotency_record_by_age ON idempotency_record (created_at);
