-- The Stripe fact machine (src/domain/payment.rs): every fact about a payment is kept, whatever
-- order its events come in, and a purchase's claw-backs are a function of those facts.

-- Credits a purchase (a `checkout_session:` fact) has lost to refunds and disputes so far, net
-- of give-backs. Never more than `credits` (checked by the audit).
ALTER TABLE stripe_fact ADD COLUMN clawed BIGINT NOT NULL DEFAULT 0;

-- A charge as its refund events describe it; kept even when its purchase has not arrived yet.
CREATE TABLE stripe_charge (
    charge_id       TEXT        PRIMARY KEY,
    payment_intent  TEXT,
    amount          BIGINT      NOT NULL,
    amount_refunded BIGINT      NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT stripe_charge_amounts CHECK (amount >= 0 AND amount_refunded >= 0)
);
CREATE INDEX stripe_charge_by_payment_intent ON stripe_charge (payment_intent) WHERE payment_intent IS NOT NULL;

-- Disputes and inquiries, by charge (older API versions do not name the PaymentIntent).
CREATE TABLE stripe_dispute (
    dispute_id     TEXT        PRIMARY KEY,
    charge_id      TEXT        NOT NULL,
    payment_intent TEXT,
    amount         BIGINT,
    status         TEXT        NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT stripe_dispute_status_known CHECK (status IN ('open', 'lost', 'won'))
);
CREATE INDEX stripe_dispute_by_charge ON stripe_dispute (charge_id);
CREATE INDEX stripe_dispute_by_payment_intent ON stripe_dispute (payment_intent) WHERE payment_intent IS NOT NULL;

-- Subscriptions by id, each with its own newest-state guard; an account's plan is its newest
-- live subscription's. The one-per-customer columns of 0006 are carried over and left unused.
CREATE TABLE stripe_subscription (
    subscription_id      TEXT    PRIMARY KEY,
    account_id           TEXT    NOT NULL REFERENCES account (account_id),
    customer_id          TEXT    NOT NULL,
    status               TEXT    NOT NULL,
    plan                 TEXT    NOT NULL,
    current_period_end   BIGINT,
    cancel_at_period_end BOOLEAN NOT NULL DEFAULT false,
    state_as_of          BIGINT  NOT NULL,
    started              BIGINT  NOT NULL
);
CREATE INDEX stripe_subscription_by_account ON stripe_subscription (account_id);
INSERT INTO stripe_subscription (subscription_id, account_id, customer_id, status, plan, current_period_end,
                                 cancel_at_period_end, state_as_of, started)
SELECT subscription_id, account_id, customer_id, COALESCE(status, 'unknown'), COALESCE(plan, 'free'),
       current_period_end, cancel_at_period_end, state_as_of, state_as_of
FROM stripe_customer WHERE subscription_id IS NOT NULL;

-- The grant a business fact made, named on the grant: a second grant for one purchase, invoice
-- or give-back is refused by the database itself, whatever the code above it does.
ALTER TABLE bucket ADD COLUMN business_key TEXT;
UPDATE bucket SET business_key = f.business_key
FROM stripe_fact f WHERE f.grant_id = bucket.bucket_id AND f.state = 'granted';
CREATE UNIQUE INDEX bucket_one_grant_per_business_key ON bucket (business_key) WHERE business_key IS NOT NULL;
