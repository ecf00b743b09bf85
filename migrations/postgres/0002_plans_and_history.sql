-- Plans: every account has one (the catalog defines them; "free" is the default).
ALTER TABLE account ADD COLUMN plan TEXT NOT NULL DEFAULT 'free';
CREATE INDEX account_by_plan ON account (plan, account_id);
-- ExportUsage walks entries by time.
CREATE INDEX entry_by_time ON entry (created_at, entry_id);
