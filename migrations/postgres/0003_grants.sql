-- Grants (buckets): a balance is the sum of grants, each with a source, an optional expiry and
-- a priority. `remaining` is the available part, `held` the part reserved by open holds.
-- Invariants (checked by the audit): account.available = sum(remaining), account.held = sum(held).
CREATE TABLE bucket (
    bucket_id  TEXT        PRIMARY KEY,
    account_id TEXT        NOT NULL REFERENCES account (account_id),
    source     TEXT        NOT NULL,
    granted    BIGINT      NOT NULL,
    remaining  BIGINT      NOT NULL,
    held       BIGINT      NOT NULL DEFAULT 0,
    expired    BIGINT      NOT NULL DEFAULT 0,
    expires_at TIMESTAMPTZ,
    priority   INTEGER     NOT NULL DEFAULT 50,
    period     TEXT,
    reason     TEXT        NOT NULL DEFAULT '',
    created_at TIMESTAMPTZ NOT NULL,
    CONSTRAINT bucket_source_known CHECK (source IN ('purchase', 'subscription', 'allowance', 'signup_bonus',
                                                     'promotion', 'adjustment', 'refund', 'transfer')),
    CONSTRAINT bucket_amounts_nonnegative CHECK (granted >= 0 AND remaining >= 0 AND held >= 0 AND expired >= 0),
    CONSTRAINT bucket_priority_range CHECK (priority BETWEEN 0 AND 100)
);
-- An allowance is granted once per account and period, even under concurrent first calls.
CREATE UNIQUE INDEX bucket_one_allowance_per_period ON bucket (account_id, period) WHERE period IS NOT NULL;
-- What an operation loads: the account's buckets that still hold credits.
CREATE INDEX bucket_live_by_account ON bucket (account_id) WHERE remaining > 0 OR held > 0;
-- The sweeper's queue of grants to expire.
CREATE INDEX bucket_expiring ON bucket (expires_at) WHERE remaining > 0 AND expires_at IS NOT NULL;

-- What each hold took from each bucket, so commits, releases and refunds return credits to
-- the buckets they came from.
CREATE TABLE draw (
    hold_id   TEXT    NOT NULL REFERENCES hold (hold_id),
    seq       INTEGER NOT NULL,
    bucket_id TEXT    NOT NULL REFERENCES bucket (bucket_id),
    held      BIGINT  NOT NULL,
    consumed  BIGINT  NOT NULL DEFAULT 0,
    refunded  BIGINT  NOT NULL DEFAULT 0,
    CONSTRAINT draw_pkey PRIMARY KEY (hold_id, seq),
    CONSTRAINT draw_amounts CHECK (held >= 0 AND consumed >= 0 AND refunded >= 0 AND refunded <= consumed)
);

ALTER TABLE account ADD COLUMN allowance_period TEXT;

ALTER TABLE entry ADD COLUMN bucket_id TEXT REFERENCES bucket (bucket_id);
ALTER TABLE entry DROP CONSTRAINT entry_kind_known;
ALTER TABLE entry ADD CONSTRAINT entry_kind_known CHECK (kind IN ('grant', 'reserve', 'commit', 'release', 'expire',
    'refund', 'expiration', 'adjustment', 'transfer_out', 'transfer_in'));

-- Existing balances become one grant per account, and existing holds draw from it.
INSERT INTO bucket (bucket_id, account_id, source, granted, remaining, held, reason, created_at)
SELECT 'grt_before_grants_' || account_id, account_id, 'adjustment', available + held, available, held,
       'balance before grants existed', now()
FROM account;
INSERT INTO draw (hold_id, seq, bucket_id, held, consumed, refunded)
SELECT hold_id, 0, 'grt_before_grants_' || account_id, amount, committed_amount, refunded_amount
FROM hold WHERE committed_amount <= amount;
