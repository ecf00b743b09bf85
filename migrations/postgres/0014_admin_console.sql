-- The admin console (issue 30): what its lists and charts read, through indexes.
-- The Stripe events log shows each event's business key (checkout_session:…, invoice:…), newest
-- first.
ALTER TABLE stripe_event ADD COLUMN business_key TEXT;
CREATE INDEX stripe_event_by_received ON stripe_event (received_at, event_id);
-- Purchases per day.
CREATE INDEX stripe_fact_by_created ON stripe_fact (created_at);
-- Usage per day, per operation and per account: commits and refunds only, covering the columns
-- the dashboard sums (an index-only range scan, not a walk over every reserve and grant).
CREATE INDEX entry_usage_by_time ON entry (created_at)
    INCLUDE (account_id, hold_id, kind, available_delta, held_delta)
    WHERE kind IN ('commit', 'refund');
-- Accounts by last activity.
CREATE INDEX account_by_updated ON account (updated_at);
