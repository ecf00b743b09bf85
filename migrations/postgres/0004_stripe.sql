-- Every verified Stripe event, recorded in the same transaction as its effects: a redelivered
-- event finds its row and changes nothing.
CREATE TABLE stripe_event (
    event_id    TEXT        PRIMARY KEY,
    type        TEXT        NOT NULL,
    livemode    BOOLEAN     NOT NULL,
    created     BIGINT,
    effect      TEXT        NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One business fact (a paid Checkout Session, an invoice, a refund) arrives through several
-- events and through the success-page sync: its key makes the grant happen once.
CREATE TABLE stripe_fact (
    business_key TEXT        PRIMARY KEY,
    account_id   TEXT,
    state        TEXT        NOT NULL,
    credits      BIGINT      NOT NULL DEFAULT 0,
    grant_id     TEXT,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT stripe_fact_state_known CHECK (state IN ('pending', 'failed', 'granted'))
);
