-- A transition is sent to PostgreSQL as one statement: its writes as data-modifying CTEs and
-- a final SELECT that checks what each had to achieve (storage/one_statement.rs). When one
-- did not (a compare-and-set that lost, an event seen before, an idempotency key answered by
-- another request), the SELECT calls this function, whose error aborts the statement and
-- with it every write of the transition. The message names the outcome for payretry.
CREATE FUNCTION payretry_stop(outcome TEXT) RETURNS INTEGER
    LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'payretry_stop:' || outcome;
END
$$;
