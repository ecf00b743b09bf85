-- See migrations/postgres/0006_stripe_subscriptions.sql.
ALTER TABLE stripe_customer ADD COLUMN subscription_id TEXT;
ALTER TABLE stripe_customer ADD COLUMN status TEXT;
ALTER TABLE stripe_customer ADD COLUMN plan TEXT;
ALTER TABLE stripe_customer ADD COLUMN current_period_end INTEGER;
ALTER TABLE stripe_customer ADD COLUMN cancel_at_period_end INTEGER NOT NULL DEFAULT 0;
ALTER TABLE stripe_customer ADD COLUMN state_as_of INTEGER NOT NULL DEFAULT 0;
