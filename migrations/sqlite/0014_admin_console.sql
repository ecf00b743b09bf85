-- See migrations/postgres/0014_admin_console.sql.
ALTER TABLE stripe_event ADD COLUMN business_key TEXT;
CREATE INDEX stripe_event_by_received ON stripe_event (received_at, event_id);
CREATE INDEX stripe_fact_by_created ON stripe_fact (created_at);
CREATE INDEX entry_usage_by_time ON entry (created_at, kind, account_id, hold_id, available_delta, held_delta)
    WHERE kind IN ('commit', 'refund');
CREATE INDEX account_by_updated ON account (updated_at);
