-- The guard as a shared/exclusive gate (issue 11). Upgrades a guard
-- installed by 0001 in place: `fencepost.marks` and its rows are kept, and
-- `fencepost.advance(resource, token)` keeps its name and signature, so an
-- older proxy's calls get the new semantics too.
--
-- Why: 0001 upserted the resource's marks row in every write transaction,
-- so its row lock serialized every transaction of a resource, even when
-- all carried the same token, and wrote a row version each time.
--
-- The gate is a transaction-level advisory lock per resource; the marks
-- row holds the value. Per call, in the write's own transaction:
--   * same token as the mark: take the gate SHARED, then read the mark
--     again. Transactions of one token run concurrently and write nothing.
--   * newer token: take the gate EXCLUSIVE. Postgres grants it only once
--     every transaction holding it shared (in flight with the older token,
--     through any proxy) has ended: the drain. Then advance the mark.
--   * older token: SQLSTATE ZF001, as before.
-- Postgres's lock manager is FIFO: a shared request queues behind a
-- waiting exclusive one, so a stream of same-token writers cannot starve
-- an advance, and a writer queued behind it re-reads the mark after it.
--
-- Visibility after the wait. Under READ COMMITTED every statement of this
-- VOLATILE function takes a new snapshot, so the read after the lock sees
-- an advance committed before the lock was granted (a commit is visible
-- before its locks are released). Under REPEATABLE READ and SERIALIZABLE
-- the snapshot may predate the wait, so the mark is read FOR SHARE there:
-- a row changed by a transaction that committed after the snapshot fails
-- with SQLSTATE 40001, and the transaction never commits. That branch
-- locks the row (a tuple-header write, and a multixact when several hold
-- it): the price of those isolation levels.
--
-- Gate key: the two-int4 advisory key (1717920355 = 'fenc', hashtext of
-- the resource). Two resources whose names hash alike share one gate: an
-- advance of one then also waits for the other's transactions. Correctness
-- never depends on the hash, only on the mark. An application's own
-- two-int4 advisory locks should not use the first key 1717920355.
--
-- Once per transaction. The call remembers (resource, token) in a
-- transaction-local setting, `fencepost.gate_<hex key>`, which Postgres
-- undoes exactly when it releases the lock: at transaction end, and when a
-- savepoint that took it rolls back (a lock taken in a subtransaction is
-- released by its rollback). So a later call with the same token in the
-- same transaction returns at once while the gate is held, and calls
-- after `ROLLBACK TO` take the gate again. A different token for the same
-- resource within one transaction is refused (ZF001): the transaction has
-- written under the gate with one token, and taking it exclusive for
-- another would be a lock upgrade (two of them deadlock).
--
-- Bounded drain. With `p_wait_ms` the exclusive wait is bounded by
-- lock_timeout; past it the call fails with SQLSTATE ZF005 (retriable:
-- nothing was advanced) naming the backends that held the gate. With
-- NULL (and for the two-argument form an older proxy calls) the session's
-- own lock_timeout applies, as before.
--
-- Deadlocks: none between the gate and the client's own locks when the
-- gate is the transaction's first lock, which is where the proxy puts it
-- (before the transaction's first write). A transaction that locked rows
-- before its first write can deadlock with an advance; Postgres detects
-- it and aborts one of them.
--
-- Idempotent: CREATE OR REPLACE only.

CREATE OR REPLACE FUNCTION fencepost.advance(p_resource text, p_token text, p_wait_ms integer)
RETURNS void
LANGUAGE plpgsql
VOLATILE
AS $$
DECLARE
    gate_ns  CONSTANT integer := 1717920355;
    gate_key CONSTANT integer := hashtext(p_resource);
    held_at  CONSTANT text := 'fencepost.gate_' || to_hex(hashtext(p_resource));
    mine     CONSTANT text := p_resource || ' ' || p_token;
    held     text;
    mark     text COLLATE "C";
    prior_timeout text;
    holders  text;
BEGIN
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

    SELECT m.token INTO mark FROM fencepost.marks AS m WHERE m.resource = p_resource;
    IF mark > (p_token COLLATE "C") THEN
        RAISE EXCEPTION USING ERRCODE = 'ZF001',
            MESSAGE = format(
                'stale fencing token for resource %s: presented %s, current %s (refused by the database guard)',
                p_resource, p_token::numeric, mark::numeric),
            HINT = 'a newer leader holds this resource; stop writing and re-acquire the lease';
    END IF;

    IF mark = (p_token COLLATE "C") THEN
        -- Same token: the shared gate, then the mark again.
        PERFORM pg_advisory_xact_lock_shared(gate_ns, gate_key);
        IF current_setting('transaction_isolation') = 'read committed' THEN
            SELECT m.token INTO mark FROM fencepost.marks AS m WHERE m.resource = p_resource;
        ELSE
            SELECT m.token INTO mark FROM fencepost.marks AS m WHERE m.resource = p_resource FOR SHARE;
        END IF;
    ELSE
        -- Newer token (or no mark yet): the exclusive gate, the drain.
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

-- The two-argument form, called by proxies older than this migration and
-- by hand: the session's lock_timeout bounds the drain.
CREATE OR REPLACE FUNCTION fencepost.advance(p_resource text, p_token text)
RETURNS void
LANGUAGE sql
VOLATILE
AS $$ SELECT fencepost.advance(p_resource, p_token, NULL::integer) $$;
