-- See migrations/postgres/0010_account_version.sql and 0012_balance_notify.sql. On SQLite the
-- one statement that writes an account's balance (storage/sqlite.rs, `Tx::write`) moves the
-- version itself, and the store tells the process's watchers after each commit: one process
-- owns the file, so there is no other replica to notify.
ALTER TABLE account ADD COLUMN version INTEGER NOT NULL DEFAULT 0;
