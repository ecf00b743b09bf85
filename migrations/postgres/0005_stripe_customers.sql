-- Account ↔ Stripe customer (created by Tally with metadata.account_id before the first
-- Checkout). One customer per account.
CREATE TABLE stripe_customer (
    account_id  TEXT        PRIMARY KEY REFERENCES account (account_id),
    customer_id TEXT        NOT NULL UNIQUE,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX stripe_fact_by_account ON stripe_fact (account_id, created_at);
