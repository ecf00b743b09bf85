-- Seeds a database that `tally migrate` created for tally_pair.sql: :naccounts accounts
-- "raw-1".."raw-N", each funded by one grant of 10^9 credits (its bucket and its grant entry),
-- as Tally's Grant would leave them. Runs once per database; the ids never collide with
-- tally bench's "uni-"/"hot-" accounts.
INSERT INTO account (account_id, available, created_at, updated_at)
SELECT 'raw-' || g, 1000000000, now(), now() FROM generate_series(1, :naccounts) g;
INSERT INTO bucket (bucket_id, account_id, source, granted, remaining, reason, created_at)
SELECT 'grt_raw_' || lpad(g::text, 8, '0'), 'raw-' || g, 'adjustment', 1000000000, 1000000000,
       'raw seed', now()
FROM generate_series(1, :naccounts) g;
INSERT INTO entry (account_id, bucket_id, kind, available_delta, held_delta, reason)
SELECT 'raw-' || g, 'grt_raw_' || lpad(g::text, 8, '0'), 'grant', 1000000000, 0, 'raw seed'
FROM generate_series(1, :naccounts) g;
VACUUM ANALYZE account, bucket, entry;
