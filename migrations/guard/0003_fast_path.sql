-- The gate's steady state made cheaper (issue 11). Replaces the
-- three-argument `fencepost.advance` of 0002 in place: same name,
-- signature and semantics; the two-argument form calls it.
--
-- Why: on a quiet machine guard mode ran at 0.80-0.87 of proxy mode on
-- pgbench's TPC-B-like script, fsync on and off alike, so the cost is the
-- guard's CPU, not commit latency. Timed inside Postgres (20,000 calls in
-- a loop, the memo cleared each time, three runs): 0002's same-token call
-- cost 19-22 us over an empty loop; a call that only reads the mark, takes
-- the gate shared and reads again costs 12-15 us. The difference was the
-- format check, the transaction-local memo (`set_config` and the strings
-- it is keyed by) and the hashing behind them, none of which the
-- same-token case needs.
--
-- So the function first reads the mark. When the token is the mark, it
-- takes the gate shared and reads the mark again, and returns: exactly
-- 0002's same-token branch without the memo. Every other case (a newer
-- token, no mark yet, a stale token, a second token in one transaction)
-- runs 0002's code.
--
-- Without the memo on the fast path, 0002's "one token per resource per
-- transaction" check could no longer see a gate the fast path took; the
-- newer-token branch now asks Postgres instead (`pg_locks`, this backend,
-- the gate's key, ShareLock): a transaction that holds the gate shared is
-- refused a second token with ZF001 before it could ask for the gate
-- exclusive (no lock upgrade, no deadlock). That lookup costs, but only
-- on the path that advances, once per leader change.
--
-- Idempotent: CREATE OR REPLACE only.

CREATE OR REPLACE FUNCTION fencepost.advance(p_resource text, p_token text, p_wait_ms integer)
RETURNS void
LANGUAGE plpgsql
VOLATILE
AS $$
DECLARE
    gate_ns  CONSTANT integer := 1717920355;
    gate_key integer;
    held_at  text;
    mine     text;
    held     text;
    mark     text COLLATE "C";
    prior_timeout text;
    holders  text;
BEGIN
    -- The fast path: the token is the mark (the steady state of a
    -- leader). Read, take the gate shared, read again (FOR SHARE under
    -- REPEATABLE READ / SERIALIZABLE), as the same-token branch below
    -- does, but with nothing else: no format check (a token equal to a
    -- stored mark has the mark's format) and no memo.
    SELECT m.token INTO mark FROM fencepost.marks AS m WHERE m.resource = p_resource;
    IF mark = (p_token COLLATE "C") THEN
        PERFORM pg_advisory_xact_lock_shared(gate_ns, hashtext(p_resource));
        IF current_setting('transaction_isolation') = 'read committed' THEN
            SELECT m.token INTO mark FROM fencepost.marks AS m WHERE m.resource = p_resource;
        ELSE
            SELECT m.token INTO mark FROM fencepost.marks AS m WHERE m.resource = p_resource FOR SHARE;
        END IF;
        IF mark IS DISTINCT FROM (p_token COLLATE "C") THEN
            RAISE EXCEPTION USING ERRCODE = 'ZF001',
                MESSAGE = format(
                    'stale fencing token for resource %s: presented %s, current %s (refused by the database guard)',
                    p_resource, p_token::numeric, coalesce(mark::numeric, 0)),
                HINT = 'a newer leader holds this resource; stop writing and re-acquire the lease';
        END IF;
        RETURN;
    END IF;

    -- Every other case: as 0002, plus the upgrade check below.
    gate_key := hashtext(p_resource);
    held_at := 'fencepost.gate_' || to_hex(gate_key);
    mine := p_resource || ' ' || p_token;
    held := current_setting(held_at, true);
    IF held = mine THEN
        -- This transaction already holds the gate with this token.
        RETURN;
    END IF;
    IF p_token !~ '^[0-9]{20}$' THEN
        RAISE EXCEPTION USING ERRCODE = 'ZF003',
            MESSAGE = format('fencepost guard: invalid token %L for resource %s', p_token, p_resource);
    END IF;
    IF held IS NOT NULL AND split_part(held, ' ', 1) = p_resource THEN
        RAISE EXCEPTION USING ERRCODE = 'ZF001',
            MESSAGE = format(
                'fencing token changed within a transaction for resource %s: presented %s, the transaction holds %s (refused by the database guard)',
                p_resource, p_token::numeric, split_part(held, ' ', 2)::numeric),
            HINT = 'a transaction keeps one token per resource; roll back and start a new one';
    END IF;

    -- `mark` is the fast path's read.
    IF mark > (p_token COLLATE "C") THEN
        RAISE EXCEPTION USING ERRCODE = 'ZF001',
            MESSAGE = format(
                'stale fencing token for resource %s: presented %s, current %s (refused by the database guard)',
                p_resource, p_token::numeric, mark::numeric),
            HINT = 'a newer leader holds this resource; stop writing and re-acquire the lease';
    END IF;

    -- A newer token (or no mark yet): the exclusive gate, the drain.
    -- A transaction that already holds the gate shared (the fast path
    -- keeps no memo) must not ask for it exclusive: that is a lock
    -- upgrade, and two such transactions deadlock. It holds the gate
    -- with the mark's token, which cannot have moved since (an advance
    -- needs the gate exclusive).
    IF EXISTS (SELECT 1 FROM pg_locks AS l
                WHERE l.pid = pg_backend_pid() AND l.locktype = 'advisory'
                  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                  AND l.classid = gate_ns::oid AND l.objid = (gate_key::bigint & 4294967295)::oid
                  AND l.objsubid = 2 AND l.mode = 'ShareLock' AND l.granted) THEN
        RAISE EXCEPTION USING ERRCODE = 'ZF001',
            MESSAGE = format(
                'fencing token changed within a transaction for resource %s: presented %s, the transaction holds %s (refused by the database guard)',
                p_resource, p_token::numeric, coalesce(mark::numeric, 0)),
            HINT = 'a transaction keeps one token per resource; roll back and start a new one';
    END IF;
    IF p_wait_ms IS NOT NULL THEN
        prior_timeout := current_setting('lock_timeout');
        PERFORM set_config('lock_timeout', greatest(p_wait_ms, 1) || 'ms', true);
    END IF;
    BEGIN
        PERFORM pg_advisory_xact_lock(gate_ns, gate_key);
    EXCEPTION WHEN lock_not_available THEN
        SELECT string_agg(format('pid %s (application_name %L, state %s, transaction started %s)',
                                 a.pid, a.application_name, a.state, a.xact_start), '; ' ORDER BY a.xact_start)
          INTO holders
          FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid
         WHERE l.locktype = 'advisory' AND l.granted AND l.pid <> pg_backend_pid()
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND l.classid = gate_ns::oid AND l.objid = (gate_key::bigint & 4294967295)::oid
           AND l.objsubid = 2;
        RAISE EXCEPTION USING ERRCODE = 'ZF005',
            MESSAGE = format(
                'fencepost guard: token %s for resource %s waited %s for older transactions to end; held by: %s',
                p_token::numeric, p_resource, coalesce(p_wait_ms || ' ms', 'lock_timeout'),
                coalesce(holders, 'none left')),
            HINT = 'retry; nothing was advanced. Older-token transactions still open hold up the new token (see idle_in_transaction_session_timeout)';
    END;
    IF prior_timeout IS NOT NULL THEN
        PERFORM set_config('lock_timeout', prior_timeout, true);
    END IF;
    IF current_setting('transaction_isolation') = 'read committed' THEN
        SELECT m.token INTO mark FROM fencepost.marks AS m WHERE m.resource = p_resource;
    END IF;
    IF mark IS NULL OR mark < (p_token COLLATE "C") THEN
        -- Under REPEATABLE READ / SERIALIZABLE a row changed after the
        -- snapshot fails here with 40001.
        INSERT INTO fencepost.marks AS m (resource, token)
        VALUES (p_resource, p_token)
        ON CONFLICT (resource) DO UPDATE
            SET token = GREATEST(m.token, EXCLUDED.token), updated_at = now()
        RETURNING m.token INTO mark;
    END IF;

    IF mark IS DISTINCT FROM (p_token COLLATE "C") THEN
        RAISE EXCEPTION USING ERRCODE = 'ZF001',
            MESSAGE = format(
                'stale fencing token for resource %s: presented %s, current %s (refused by the database guard)',
                p_resource, p_token::numeric, coalesce(mark::numeric, 0)),
            HINT = 'a newer leader holds this resource; stop writing and re-acquire the lease';
    END IF;
    PERFORM set_config(held_at, mine, true);
END
$$;

