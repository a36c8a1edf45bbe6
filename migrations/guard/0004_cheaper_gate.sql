-- The gate's same-token path made cheaper again (issue 11). Replaces the
-- three-argument `fencepost.advance` of 0003 in place: same name,
-- signature, results and errors; the two-argument form (0002) calls it.
--
-- Why: in `-M simple` the guard call is the only thing guard mode adds
-- to a TPC-B-like transaction, and it cost the backend 117,000
-- instructions per transaction over proxy mode (callgrind, one pgbench
-- client; `benches/guard_cost.sh`). Counted by part
-- (`benches/guard_sql_cost.sh`: Postgres 15 under callgrind, `BEGIN;
-- SELECT advance(...) \; SELECT 1; END;` against `BEGIN; SELECT 1;
-- END;`, 2,000 transactions): the extra statement itself about 27,000,
-- the PL/pgSQL call about 21,000, each read of the mark about 24,000.
-- 0003's same-token path read the mark, took the gate shared, read it
-- again; the first read only chose the path, so that a newer token never
-- holds the gate shared before it asks for it exclusive.
--
-- This file takes the gate first and reads once, inside a block with an
-- exception handler (a subtransaction): when the token is not the mark,
-- the block is left by an exception, which releases the gate it took, and
-- the rest is 0003's code unchanged, with that read as its `mark`. The
-- guarantees stay: the read that decides is made after the gate is held
-- (under READ COMMITTED a fresh snapshot; under REPEATABLE READ /
-- SERIALIZABLE `FOR SHARE`, a serialization failure for a row changed
-- after the snapshot); a newer token never holds the gate shared when it
-- asks for it exclusive; the same errors for the same cases in the same
-- order, but one: under REPEATABLE READ / SERIALIZABLE a mark changed
-- after the snapshot now meets the FOR SHARE read whatever the token, so
-- a stale token there fails with 40001 where 0003 answered ZF001 (both
-- refusals; the issue allows either). The subtransaction starts and ends without a transaction id
-- under READ COMMITTED (nothing is written). Two smaller cuts: the gate
-- is taken in an IF condition, a simple expression PL/pgSQL evaluates
-- itself, not in a PERFORM, a whole SELECT run through SPI (plan-cache
-- check, executor start, run and end: about 5,800 more); and the gate's
-- key is a literal, not a `CONSTANT`, whose initializer runs on every
-- call (about 1,300).
--
-- Same count: 0003's same-token call 119,600 instructions over the plain
-- transaction, 0003 with only the two smaller cuts 112,600, this file
-- 92,600 (per part, the block costs about 6,000 and saves a read and a
-- comparison).
--
-- One thing waits where it did not: a stale token's call now asks for
-- the gate shared before it reads, so while a newer leader's advance
-- holds the gate exclusive, the stale call waits for it (as every call
-- arriving during an advance already did) and is then refused ZF001 as
-- before.
--
-- Idempotent: CREATE OR REPLACE only.

CREATE OR REPLACE FUNCTION fencepost.advance(p_resource text, p_token text, p_wait_ms integer)
RETURNS void
LANGUAGE plpgsql
VOLATILE
AS $$
DECLARE
    gate_ns  integer;  -- the gate's key space, 1717920355 (set below)
    gate_key integer;
    held_at  text;
    mine     text;
    held     text;
    mark     text COLLATE "C";
    prior_timeout text;
    holders  text;
BEGIN
    -- The fast path: the token is the mark (the steady state of a
    -- leader). Take the gate shared, then read the mark (FOR SHARE under
    -- REPEATABLE READ / SERIALIZABLE): the read after the gate, as in
    -- 0003. When the token is the mark, return, holding the gate until
    -- the transaction ends. Otherwise leave the block by its own
    -- exception: the block is a subtransaction, and rolling it back
    -- releases the gate it took (and a FOR SHARE row lock), so the code
    -- below never asks for the gate exclusive while this call holds it
    -- shared (no lock upgrade). A gate this transaction took in an
    -- earlier call is not released: it belongs to the enclosing
    -- transaction, and the `pg_locks` check below refuses a second token.
    -- The gate is taken in an IF, not a PERFORM (see the top of the
    -- file); `IS NULL` of its void result is never true, the call is
    -- what matters, and a volatile call is never folded away.
    BEGIN
        IF pg_advisory_xact_lock_shared(1717920355, hashtext(p_resource)) IS NULL THEN
            NULL;
        END IF;
        IF current_setting('transaction_isolation') = 'read committed' THEN
            SELECT m.token INTO mark FROM fencepost.marks AS m WHERE m.resource = p_resource;
        ELSE
            SELECT m.token INTO mark FROM fencepost.marks AS m WHERE m.resource = p_resource FOR SHARE;
        END IF;
        IF mark = (p_token COLLATE "C") THEN
            RETURN;
        END IF;
        -- Internal (PL/pgSQL's class P0, a code Postgres does not use):
        -- caught just below, never leaves the function.
        RAISE EXCEPTION USING ERRCODE = 'P0F00';
    EXCEPTION WHEN SQLSTATE 'P0F00' THEN
        -- PL/pgSQL variables keep what they were given in the block:
        -- `mark` is the read above.
        NULL;
    END;

    -- Every other case (a newer token, no mark yet, a stale token, a
    -- second token in one transaction): 0003's code, without the gate.
    gate_ns := 1717920355;
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

    -- `mark` is the fast path's read (made under the gate, since released).
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

