-- The live balance stream (CreditService.WatchBalance, GET /v1/accounts/{id}/balance/stream).
--
-- Every committed change of an account row sends one notification on channel `tally_balance`
-- whose payload is only `<version> <account_id>` (the version moved by 0010's trigger). A
-- trigger, so no writer can forget it: the job path, group commit, the sweeper, Stripe effects
-- and raw SQL alike. PostgreSQL delivers it when (and only if) the transaction commits, to
-- every replica's one listening connection, which then re-reads the balance of the accounts
-- its callers watch. Payloads stay far under NOTIFY's 8000-byte limit (an account id is at
-- most 128 bytes); identical notifications of one transaction are sent once.
CREATE FUNCTION tally_balance_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tally_balance', NEW.version::text || ' ' || NEW.account_id);
    RETURN NULL;
END
$$;

CREATE TRIGGER balance_notify AFTER INSERT OR UPDATE ON account
    FOR EACH ROW EXECUTE FUNCTION tally_balance_notify();
