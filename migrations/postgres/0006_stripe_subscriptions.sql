-- The account's Stripe subscription, mirrored from subscription events (newest state wins).
ALTER TABLE stripe_customer ADD COLUMN subscription_id TEXT;
ALTER TABLE stripe_customer ADD COLUMN status TEXT;
ALTER TABLE stripe_customer ADD COLUMN plan TEXT;
ALTER TABLE stripe_customer ADD COLUMN current_period_end BIGINT;
ALTER TABLE stripe_customer ADD COLUMN cancel_at_period_end BOOLEAN NOT NULL DEFAULT false;
-- `created` of the event that set the state: an older event never overwrites a newer one.
ALTER TABLE stripe_customer ADD COLUMN state_as_of BIGINT NOT NULL DEFAULT 0;
