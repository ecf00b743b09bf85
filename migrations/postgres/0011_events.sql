-- Outbound events (issue 28): the transactional outbox. One row per event and endpoint,
-- inserted in the same transaction as the change that causes it; the dispatcher delivers each
-- account's rows in `seq` order per endpoint (an account's next row waits while an earlier
-- one is pending), leasing a row before it posts it so that replicas never post one row
-- twice at once. `event_id` is the `webhook-id`: the same on every attempt and endpoint.
CREATE TABLE event (
    seq             BIGSERIAL   PRIMARY KEY,
    event_id        TEXT        NOT NULL,
    endpoint        TEXT        NOT NULL,
    account_id      TEXT        NOT NULL,
    type            TEXT        NOT NULL,
    body            TEXT        NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL,
    dedupe_key      TEXT,
    state           TEXT        NOT NULL DEFAULT 'pending',
    attempts        INTEGER     NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL,
    lease_until     TIMESTAMPTZ,
    last_attempt_at TIMESTAMPTZ,
    last_status     INTEGER,
    last_error      TEXT,
    delivered_at    TIMESTAMPTZ,
    CONSTRAINT event_state_known CHECK (state IN ('pending', 'delivered', 'failed')),
    CONSTRAINT event_once_per_endpoint UNIQUE (endpoint, event_id),
    CONSTRAINT event_dedupe_once UNIQUE (endpoint, dedupe_key)
);
-- A queue: rows come and go quickly, so statistics and cleanup follow it closely (the default
-- 10 % / 20 % thresholds let a fresh backlog run on plans made for an empty table).
ALTER TABLE event SET (autovacuum_analyze_scale_factor = 0.01, autovacuum_vacuum_scale_factor = 0.02);
CREATE INDEX event_pending_by_account ON event (endpoint, account_id, seq) WHERE state = 'pending';
CREATE INDEX event_pending_seq ON event (seq) WHERE state = 'pending';
CREATE INDEX event_pending_due ON event (next_attempt_at) WHERE state = 'pending';
CREATE INDEX event_by_account ON event (account_id, seq);
CREATE INDEX event_by_event_id ON event (event_id);
CREATE INDEX event_by_dedupe_key ON event (dedupe_key) WHERE dedupe_key IS NOT NULL;
CREATE INDEX event_by_created ON event (created_at);

-- Endpoints a receiver turned off (410 Gone): no delivery until an operator enables them.
CREATE TABLE event_endpoint (
    name            TEXT        PRIMARY KEY,
    disabled_at     TIMESTAMPTZ NOT NULL,
    disabled_reason TEXT        NOT NULL
);
