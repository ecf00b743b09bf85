-- Grants (buckets): see migrations/postgres/0003_grants.sql for the why of each part.
CREATE TABLE bucket (
    bucket_id  TEXT    PRIMARY KEY,
    account_id TEXT    NOT NULL REFERENCES account (account_id),
    source     TEXT    NOT NULL,
    granted    INTEGER NOT NULL,
    remaining  INTEGER NOT NULL,
    held       INTEGER NOT NULL DEFAULT 0,
    expired    INTEGER NOT NULL DEFAULT 0,
    expires_at INTEGER,
    priority   INTEGER NOT NULL DEFAULT 50,
    period     TEXT,
    reason     TEXT    NOT NULL DEFAULT '',
    created_at INTEGER NOT NULL,
    CONSTRAINT bucket_source_known CHECK (source IN ('purchase', 'subscription', 'allowance', 'signup_bonus',
                                                     'promotion', 'adjustment', 'refund', 'transfer')),
    CONSTRAINT bucket_amounts_nonnegative CHECK (granted >= 0 AND remaining >= 0 AND held >= 0 AND expired >= 0),
    CONSTRAINT bucket_priority_range CHECK (priority BETWEEN 0 AND 100)
) STRICT;
CREATE UNIQUE INDEX bucket_one_allowance_per_period ON bucket (account_id, period) WHERE period IS NOT NULL;
CREATE INDEX bucket_live_by_account ON bucket (account_id) WHERE remaining > 0 OR held > 0;
CREATE INDEX bucket_expiring ON bucket (expires_at) WHERE remaining > 0 AND expires_at IS NOT NULL;

CREATE TABLE draw (
    hold_id   TEXT    NOT NULL REFERENCES hold (hold_id),
    seq       INTEGER NOT NULL,
    bucket_id TEXT    NOT NULL REFERENCES bucket (bucket_id),
    held      INTEGER NOT NULL,
    consumed  INTEGER NOT NULL DEFAULT 0,
    refunded  INTEGER NOT NULL DEFAULT 0,
    CONSTRAINT draw_pkey PRIMARY KEY (hold_id, seq),
    CONSTRAINT draw_amounts CHECK (held >= 0 AND consumed >= 0 AND refunded >= 0 AND refunded <= consumed)
) STRICT;

ALTER TABLE account ADD COLUMN allowance_period TEXT;

-- SQLite cannot alter a CHECK constraint: rebuild `entry` with the new kinds and bucket_id.
CREATE TABLE entry_new (
    entry_id        INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id      TEXT    NOT NULL REFERENCES account (account_id),
    hold_id         TEXT    REFERENCES hold (hold_id),
    kind            TEXT    NOT NULL,
    available_delta INTEGER NOT NULL,
    held_delta      INTEGER NOT NULL,
    reason          TEXT    NOT NULL DEFAULT '',
    created_at      INTEGER NOT NULL,
    bucket_id       TEXT    REFERENCES bucket (bucket_id),
    CONSTRAINT entry_kind_known CHECK (kind IN ('grant', 'reserve', 'commit', 'release', 'expire', 'refund',
        'expiration', 'adjustment', 'transfer_out', 'transfer_in')),
    CONSTRAINT entry_changes_something CHECK (available_delta <> 0 OR held_delta <> 0)
) STRICT;
INSERT INTO entry_new (entry_id, account_id, hold_id, kind, available_delta, held_delta, reason, created_at)
SELECT entry_id, account_id, hold_id, kind, available_delta, held_delta, reason, created_at FROM entry;
DROP TRIGGER entry_no_update;
DROP TRIGGER entry_no_delete;
DROP TABLE entry;
ALTER TABLE entry_new RENAME TO entry;
CREATE INDEX entry_by_account ON entry (account_id, entry_id);
CREATE INDEX entry_by_time ON entry (created_at, entry_id);
CREATE TRIGGER entry_no_update BEFORE UPDATE ON entry
BEGIN
    SELECT RAISE(ABORT, 'entry is append-only');
END;
CREATE TRIGGER entry_no_delete BEFORE DELETE ON entry
BEGIN
    SELECT RAISE(ABORT, 'entry is append-only');
END;

INSERT INTO bucket (bucket_id, account_id, source, granted, remaining, held, reason, created_at)
SELECT 'grt_before_grants_' || account_id, account_id, 'adjustment', available + held, available, held,
       'balance before grants existed', CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER)
FROM account;
INSERT INTO draw (hold_id, seq, bucket_id, held, consumed, refunded)
SELECT hold_id, 0, 'grt_before_grants_' || account_id, amount, committed_amount, refunded_amount
FROM hold WHERE committed_amount <= amount;
