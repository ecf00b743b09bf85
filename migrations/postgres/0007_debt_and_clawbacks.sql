-- Claw-backs (refunds and disputes of purchases) may take more than an account has: the rest
-- is debt, paid off first by incoming credits. Reported available = available - debt.
ALTER TABLE account ADD COLUMN debt BIGINT NOT NULL DEFAULT 0;
ALTER TABLE account ADD CONSTRAINT account_debt_nonnegative CHECK (debt >= 0);
ALTER TABLE entry ADD COLUMN debt_delta BIGINT NOT NULL DEFAULT 0;
ALTER TABLE entry DROP CONSTRAINT entry_kind_known;
ALTER TABLE entry ADD CONSTRAINT entry_kind_known CHECK (kind IN ('grant', 'reserve', 'commit', 'release', 'expire',
    'refund', 'expiration', 'adjustment', 'transfer_out', 'transfer_in', 'clawback', 'debt_payment'));
ALTER TABLE entry DROP CONSTRAINT entry_changes_something;
ALTER TABLE entry ADD CONSTRAINT entry_changes_something CHECK (available_delta <> 0 OR held_delta <> 0 OR debt_delta <> 0);
-- What a purchase was paid with, so refunds and disputes of its charge find it.
ALTER TABLE stripe_fact ADD COLUMN payment_intent TEXT;
ALTER TABLE stripe_fact ADD COLUMN amount_paid BIGINT;
CREATE INDEX stripe_fact_by_payment_intent ON stripe_fact (payment_intent) WHERE payment_intent IS NOT NULL;
-- Facts of refunds and disputes: `clawed` (credits = clawed so far), `restored` (a won dispute).
ALTER TABLE stripe_fact DROP CONSTRAINT stripe_fact_state_known;
ALTER TABLE stripe_fact ADD CONSTRAINT stripe_fact_state_known CHECK (state IN ('pending', 'failed', 'granted', 'clawed', 'restored'));
