-- The ledger: accounts with balance columns, holds, append-only entries, idempotency records.
-- Same numbers, tables and constraint names as migrations/postgres. Times are INTEGER
-- microseconds since the Unix epoch (UTC).

CREATE TABLE account (
    account_id  TEXT    PRIMARY KEY,
    available   INTEGER NOT NULL DEFAULT 0,
    held        INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    CONSTRAINT account_available_nonnegative CHECK (available >= 0),
    CONSTRAINT account_held_nonnegative CHECK (held >= 0),
    CONSTRAINT account_balance_limit CHECK (available + held <= 1000000000000000)
) STRICT;

CREATE TABLE hold (
    hold_id          TEXT    PRIMARY KEY,
    account_id       TEXT    NOT NULL REFERENCES account (account_id),
    amount           INTEGER NOT NULL,
    state            TEXT    NOT NULL DEFAULT 'open',
    committed_amount INTEGER NOT NULL DEFAULT 0,
    refunded_amount  INTEGER NOT NULL DEFAULT 0,
    metadata         TEXT    NOT NULL DEFAULT '{}',
    created_at       INTEGER NOT NULL,
    expires_at       INTEGER NOT NULL,
    resolved_at      INTEGER,
    CONSTRAINT hold_amount_positive CHECK (amount > 0),
    CONSTRAINT hold_state_known CHECK (state IN ('open', 'committed', 'released', 'expired')),
    CONSTRAINT hold_committed_amount CHECK (committed_amount >= 0 AND (state = 'committed' OR committed_amount = 0)),
    CONSTRAINT hold_refund_within_charge CHECK (refunded_amount >= 0 AND refunded_amount <= committed_amount),
    CONSTRAINT hold_resolved_when_closed CHECK ((state = 'open') = (resolved_at IS NULL))
) STRICT;
CREATE INDEX hold_open_by_expiry ON hold (expires_at) WHERE state = 'open';
CREATE INDEX hold_open_by_account ON hold (account_id, expires_at) WHERE state = 'open';
CREATE INDEX hold_by_account ON hold (account_id, hold_id);

CREATE TABLE entry (
    entry_id        INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id      TEXT    NOT NULL REFERENCES account (account_id),
    hold_id         TEXT    REFERENCES hold (hold_id),
    kind            TEXT    NOT NULL,
    available_delta INTEGER NOT NULL,
    held_delta      INTEGER NOT NULL,
    reason          TEXT    NOT NULL DEFAULT '',
    created_at      INTEGER NOT NULL,
    CONSTRAINT entry_kind_known CHECK (kind IN ('grant', 'reserve', 'commit', 'release', 'expire', 'refund')),
    CONSTRAINT entry_changes_something CHECK (available_delta <> 0 OR held_delta <> 0)
) STRICT;
CREATE INDEX entry_by_account ON entry (account_id, entry_id);

CREATE TRIGGER entry_no_update BEFORE UPDATE ON entry
BEGIN
    SELECT RAISE(ABORT, 'entry is append-only');
END;
CREATE TRIGGER entry_no_delete BEFORE DELETE ON entry
BEGIN
    SELECT RAISE(ABORT, 'entry is append-only');
END;

CREATE TABLE idempotency_record (
    caller          TEXT    NOT NULL,
    idempotency_key TEXT    NOT NULL,
    fingerprint     BLOB    NOT NULL,
    response        TEXT,
    created_at      INTEGER NOT NULL,
    CONSTRAINT idempotency_record_pkey PRIMARY KEY (caller, idempotency_key)
) STRICT;
CREATE INDEX idempotency_record_by_age ON idempotency_record (created_at);
