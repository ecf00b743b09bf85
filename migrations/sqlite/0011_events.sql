-- See migrations/postgres/0011_events.sql (0010 is PostgreSQL's only). Times are Unix
-- microseconds, as everywhere in this schema.
CREATE TABLE event (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id        TEXT    NOT NULL,
    endpoint        TEXT    NOT NULL,
    account_id      TEXT    NOT NULL,
    type            TEXT    NOT NULL,
    body            TEXT    NOT NULL,
    created_at      INTEGER NOT NULL,
    dedupe_key      TEXT,
    state           TEXT    NOT NULL DEFAULT 'pending',
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    lease_until     INTEGER,
    last_attempt_at INTEGER,
    last_status     INTEGER,
    last_error      TEXT,
    delivered_at    INTEGER,
    CONSTRAINT event_state_known CHECK (state IN ('pending', 'delivered', 'failed')),
    CONSTRAINT event_once_per_endpoint UNIQUE (endpoint, event_id),
    CONSTRAINT event_dedupe_once UNIQUE (endpoint, dedupe_key)
) STRICT;
CREATE INDEX event_pending_by_account ON event (endpoint, account_id, seq) WHERE state = 'pending';
CREATE INDEX event_pending_seq ON event (seq) WHERE state = 'pending';
CREATE INDEX event_pending_due ON event (next_attempt_at) WHERE state = 'pending';
CREATE INDEX event_by_account ON event (account_id, seq);
CREATE INDEX event_by_event_id ON event (event_id);
CREATE INDEX event_by_dedupe_key ON event (dedupe_key) WHERE dedupe_key IS NOT NULL;
CREATE INDEX event_by_created ON event (created_at);

CREATE TABLE event_endpoint (
    name            TEXT    PRIMARY KEY,
    disabled_at     INTEGER NOT NULL,
    disabled_reason TEXT    NOT NULL
) STRICT;
