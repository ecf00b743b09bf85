-- 0012's trigger notified inside each writing transaction, and PostgreSQL serializes the
-- commits of notifying transactions (PreCommit_Notify holds a database-wide lock through the
-- commit's WAL flush). Measured with pgbench on one account table: 64 concurrent one-row
-- updates fell from ~4,570 to 890-1,370 transactions/s, two concurrent 32-row updates by
-- 18-29 %. The writers now announce the accounts they changed after COMMIT, batched, on a
-- connection with synchronous_commit = off (storage/postgres/listen.rs, `Announcer`): same
-- channel, same payload (`<version> <account>`, or `- <account>` when the writer does not
-- know the version), off every caller's commit path.
DROP TRIGGER balance_notify ON account;
DROP FUNCTION tally_balance_notify();
