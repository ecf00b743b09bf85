-- See migrations/postgres/0004_stripe.sql.
CREATE TABLE stripe_event (
    event_id    TEXT    PRIMARY KEY,
    type        TEXT    NOT NULL,
    livemode    INTEGER NOT NULL,
    created     INTEGER,
    effect      TEXT    NOT NULL,
    received_at INTEGER NOT NULL
) STRICT;

CREATE TABLE stripe_fact (
    business_key TEXT    PRIMARY KEY,
    account_id   TEXT,
    state        TEXT    NOT NULL,
    credits      INTEGER NOT NULL DEFAULT 0,
    grant_id     TEXT,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    CONSTRAINT stripe_fact_state_known CHECK (state IN ('pending', 'failed', 'granted'))
) STRICT;
