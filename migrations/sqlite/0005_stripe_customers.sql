-- See migrations/postgres/0005_stripe_customers.sql.
CREATE TABLE stripe_customer (
    account_id  TEXT    PRIMARY KEY REFERENCES account (account_id),
    customer_id TEXT    NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL
) STRICT;
CREATE INDEX stripe_fact_by_account ON stripe_fact (account_id, created_at);
