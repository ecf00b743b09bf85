-- Tally's own Reserve+Commit writes in raw SQL: the ceiling of Tally's data model, as a
-- hand-rolled service would reach it with one single-statement transaction per operation
-- (the shape of ../shared/bench/pgbench/pair_cte.sql), on the schema `tally migrate` creates
-- (its constraints, indexes, foreign keys and triggers), seeded by tally_seed.sql.
-- Per pair, the rows Tally writes (see src/storage/postgres/group.rs): per operation an
-- idempotency record (claimed first: a replayed key changes nothing), the account, the grant
-- drawn from, a ledger entry; the hold and its draw (inserted by Reserve, updated by Commit).
-- Reads are the fewest such a service could do: no expiry sweep of the account's holds, no
-- load of its other grants (Tally's group loads both). Keys, ids and responses have the
-- sizes Tally's have (33- and 37-character ids, ~330-byte JSON), and ids grow with time as
-- Tally's UUIDv7 ids do. One pgbench "transaction" = one Reserve+Commit pair.
-- vars: naccounts, n, run (a tag under 1000 that keeps ids unique across runs on one database)
\set aid random(1, :naccounts)
\set amt 5
\set cost 4
\set n :n + 1
\set id (:n * 1000 + :client_id) * 1000 + :run
WITH c AS (
    INSERT INTO idempotency_record (caller, idempotency_key, fingerprint, response)
    VALUES ('default', 'r' || lpad(:id::text, 32, '0'),
            '\x000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f'::bytea,
            json_build_object('op', 'reserve', 'hold', json_build_object(
                'hold_id', 'hold_' || lpad(:id::text, 32, '0'),
                'account_id', 'raw-' || :aid::text, 'amount', :amt::bigint, 'state', 'open',
                'committed_amount', 0, 'refunded_amount', 0, 'created_at', now(),
                'expires_at', now() + interval '1 minute', 'resolved_at', NULL,
                'metadata', json_build_object()), 'available', 0)::text)
    ON CONFLICT DO NOTHING RETURNING 1),
a AS (
    UPDATE account
    SET available = available - :amt::bigint, held = held + :amt::bigint, updated_at = now()
    WHERE account_id = 'raw-' || :aid::text AND available >= :amt::bigint
      AND EXISTS (SELECT 1 FROM c)
    RETURNING account_id),
b AS (
    UPDATE bucket SET remaining = remaining - :amt::bigint, held = held + :amt::bigint
    WHERE bucket_id = (SELECT bucket_id FROM bucket WHERE account_id = 'raw-' || :aid::text
                       AND live ORDER BY priority, expires_at, created_at, bucket_id LIMIT 1)
      AND remaining >= :amt::bigint AND EXISTS (SELECT 1 FROM a)
    RETURNING bucket_id),
h AS (
    INSERT INTO hold (hold_id, account_id, amount, metadata, created_at, expires_at)
    SELECT 'hold_' || lpad(:id::text, 32, '0'), a.account_id, :amt::bigint, '{}', now(),
           now() + interval '1 minute'
    FROM a, b
    RETURNING hold_id, account_id),
d AS (
    INSERT INTO draw (hold_id, seq, bucket_id, held)
    SELECT h.hold_id, 0, b.bucket_id, :amt::bigint FROM h, b),
e AS (
    INSERT INTO entry (account_id, hold_id, kind, available_delta, held_delta)
    SELECT h.account_id, h.hold_id, 'reserve', -:amt::bigint, :amt::bigint FROM h)
SELECT hold_id FROM h \gset
WITH c AS (
    INSERT INTO idempotency_record (caller, idempotency_key, fingerprint, response)
    VALUES ('default', 'c' || lpad(:id::text, 32, '0'),
            '\x000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f'::bytea,
            json_build_object('op', 'commit', 'hold', json_build_object(
                'hold_id', :hold_id::text, 'account_id', 'raw-' || :aid::text,
                'amount', :amt::bigint, 'state', 'committed', 'committed_amount', :cost::bigint,
                'refunded_amount', 0, 'created_at', now(),
                'expires_at', now() + interval '1 minute', 'resolved_at', now(),
                'metadata', json_build_object()),
                'released', :amt::bigint - :cost::bigint, 'extra_drawn', 0, 'available', 0)::text)
    ON CONFLICT DO NOTHING RETURNING 1),
h AS (
    UPDATE hold SET state = 'committed', committed_amount = :cost::bigint, resolved_at = now()
    WHERE hold_id = :hold_id::text AND state = 'open' AND amount >= :cost::bigint
      AND EXISTS (SELECT 1 FROM c)
    RETURNING hold_id, account_id, amount),
d AS (
    UPDATE draw SET consumed = :cost::bigint
    FROM h WHERE draw.hold_id = h.hold_id AND draw.seq = 0
    RETURNING draw.bucket_id),
b AS (
    UPDATE bucket
    SET held = bucket.held - h.amount, remaining = bucket.remaining + (h.amount - :cost::bigint)
    FROM d, h WHERE bucket.bucket_id = d.bucket_id),
a AS (
    UPDATE account SET available = account.available + (h.amount - :cost::bigint),
           held = account.held - h.amount, updated_at = now()
    FROM h WHERE account.account_id = h.account_id
    RETURNING account.account_id),
e AS (
    INSERT INTO entry (account_id, hold_id, kind, available_delta, held_delta)
    SELECT h.account_id, h.hold_id, 'commit', h.amount - :cost::bigint, -h.amount FROM h)
SELECT account_id AS charged FROM a \gset
