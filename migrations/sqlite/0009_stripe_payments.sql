-- See migrations/postgres/0009_stripe_payments.sql.
ALTER TABLE stripe_fact ADD COLUMN clawed INTEGER NOT NULL DEFAULT 0;

CREATE TABLE stripe_charge (
    charge_id       TEXT    PRIMARY KEY,
    payment_intent  TEXT,
    amount          INTEGER NOT NULL,
    amount_refunded INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL DEFAULT 0,
    CONSTRAINT stripe_charge_amounts CHECK (amount >= 0 AND amount_refunded >= 0)
) STRICT;
CREATE INDEX stripe_charge_by_payment_intent ON stripe_charge (payment_intent) WHERE payment_intent IS NOT NULL;

CREATE TABLE stripe_dispute (
    dispute_id     TEXT    PRIMARY KEY,
    charge_id      TEXT    NOT NULL,
    payment_intent TEXT,
    amount         INTEGER,
    status         TEXT    NOT NULL,
    updated_at     INTEGER NOT NULL DEFAULT 0,
    CONSTRAINT stripe_dispute_status_known CHECK (status IN ('open', 'lost', 'won'))
) STRICT;
CREATE INDEX stripe_dispute_by_charge ON stripe_dispute (charge_id);
CREATE INDEX stripe_dispute_by_payment_intent ON stripe_dispute (payment_intent) WHERE payment_intent IS NOT NULL;

CREATE TABLE stripe_subscription (
    subscription_id      TEXT    PRIMARY KEY,
    account_id           TEXT    NOT NULL REFERENCES account (account_id),
    customer_id          TEXT    NOT NULL,
    status               TEXT    NOT NULL,
    plan                 TEXT    NOT NULL,
    current_period_end   INTEGER,
    cancel_at_period_end INTEGER NOT NULL DEFAULT 0,
    state_as_of          INTEGER NOT NULL,
    started              INTEGER NOT NULL
) STRICT;
CREATE INDEX stripe_subscription_by_account ON stripe_subscription (account_id);
INSERT INTO stripe_subscription (subscription_id, account_id, customer_id, status, plan, current_period_end,
                                 cancel_at_period_end, state_as_of, started)
SELECT subscription_id, account_id, customer_id, COALESCE(status, 'unknown'), COALESCE(plan, 'free'),
       current_period_end, cancel_at_period_end, state_as_of, state_as_of
FROM stripe_customer WHERE subscription_id IS NOT NULL;

ALTER TABLE bucket ADD COLUMN business_key TEXT;
UPDATE bucket SET business_key = (SELECT f.business_key FROM stripe_fact f
                                  WHERE f.grant_id = bucket.bucket_id AND f.state = 'granted')
WHERE bucket_id IN (SELECT grant_id FROM stripe_fact WHERE state = 'granted' AND grant_id IS NOT NULL);
CREATE UNIQUE INDEX bucket_one_grant_per_business_key ON bucket (business_key) WHERE business_key IS NOT NULL;
