-- Every account row carries a version that every change of the row moves (a trigger, so no
-- writer can forget it, raw SQL included). Every writer of an account's grants, holds or draws
-- also writes its account row, so an unchanged version means an unchanged book.
--
-- Group commit keeps the books it wrote in memory with their version and writes the next
-- commands on them in one statement, in autocommit, that updates each account only at the
-- version it read (one round trip instead of BEGIN, lock-and-load, write, COMMIT). When another
-- writer (another replica, the sweeper, a Stripe grant) moved an account meanwhile, the
-- statement's version check raises a serialization failure, nothing of it stays, and the group
-- runs again under row locks. The live balance stream can number its events by this version.
ALTER TABLE account ADD COLUMN version BIGINT NOT NULL DEFAULT 0;

CREATE FUNCTION tally_account_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.version := OLD.version + 1;
    RETURN NEW;
END
$$;

CREATE TRIGGER account_version BEFORE UPDATE ON account
    FOR EACH ROW EXECUTE FUNCTION tally_account_version();

-- Raises a serialization failure (SQLSTATE 40001) unless `got` = `expected`: called by the
-- optimistic write with the number of accounts it updated at the version it read, so a
-- stale read aborts the whole statement.
CREATE FUNCTION tally_expect_accounts(expected BIGINT, got BIGINT) RETURNS BOOLEAN
    LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF got IS DISTINCT FROM expected THEN
        RAISE EXCEPTION 'an account moved since it was read (% of % at their version)', got, expected
            USING ERRCODE = '40001';
    END IF;
    RETURN true;
END
$$;
