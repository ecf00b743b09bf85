-- See migrations/postgres/0007_debt_and_clawbacks.sql. SQLite cannot alter CHECK constraints:
-- `entry` is rebuilt with the new kinds and debt_delta.
ALTER TABLE account ADD COLUMN debt INTEGER NOT NULL DEFAULT 0 CONSTRAINT account_debt_nonnegative CHECK (debt >= 0);
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
    debt_delta      INTEGER NOT NULL DEFAULT 0,
    CONSTRAINT entry_kind_known CHECK (kind IN ('grant', 'reserve', 'commit', 'release', 'expire', 'refund',
        'expiration', 'adjustment', 'transfer_out', 'transfer_in', 'clawback', 'debt_payment')),
    CONSTRAINT entry_changes_something CHECK (available_delta <> 0 OR held_delta <> 0 OR debt_delta <> 0)
) STRICT;
INSERT INTO entry_new (entry_id, account_id, hold_id, kind, available_delta, held_delta, reason, created_at, bucket_id)
SELECT entry_id, account_id, hold_id, kind, available_delta, held_delta, reason, created_at, bucket_id FROM entry;
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
-- stripe_fact: new states (`clawed`, `restored`) and what a purchase was paid with.
CREATE TABLE stripe_fact_new (
    business_key   TEXT    PRIMARY KEY,
    account_id     TEXT,
    state          TEXT    NOT NULL,
    credits        INTEGER NOT NULL DEFAULT 0,
    grant_id       TEXT,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL,
    payment_intent TEXT,
    amount_paid    INTEGER,
    CONSTRAINT stripe_fact_state_known CHECK (state IN ('pending', 'failed', 'granted', 'clawed', 'restored'))
) STRICT;
INSERT INTO stripe_fact_new (business_key, account_id, state, credits, grant_id, created_at, updated_at)
SELECT business_key, account_id, state, credits, grant_id, created_at, updated_at FROM stripe_fact;
DROP TABLE stripe_fact;
ALTER TABLE stripe_fact_new RENAME TO stripe_fact;
CREATE INDEX stripe_fact_by_account ON stripe_fact (account_id, created_at);
CREATE INDEX stripe_fact_by_payment_intent ON stripe_fact (payment_intent) WHERE payment_intent IS NOT NULL;
