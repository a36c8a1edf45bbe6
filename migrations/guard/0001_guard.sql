-- The in-database guard of `enforce = "database"` (guarantee 3), installed
-- by `fencepost migrate --guard URL` into the protected database.
--
-- The proxy calls fencepost.advance(resource, token) inside the write's own
-- transaction before its first write. The upsert takes the resource's row
-- lock and keeps it until that transaction ends, so the transactions of one
-- resource are serialized by Postgres itself, across any number of proxies:
-- one whose token is below the stored mark fails with SQLSTATE ZF001 and
-- can never commit after a newer one.
--
-- Idempotent: every statement may run again on an installed guard.

CREATE SCHEMA IF NOT EXISTS fencepost;

-- Tokens are 20-digit zero-padded text compared in the "C" collation, as
-- in fencepost's own store, so GREATEST and > order them as u64.
CREATE TABLE IF NOT EXISTS fencepost.marks (
    resource   text PRIMARY KEY,
    token      text COLLATE "C" NOT NULL CHECK (token ~ '^[0-9]{20}$'),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION fencepost.advance(p_resource text, p_token text)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    current_mark text COLLATE "C";
BEGIN
    IF p_token !~ '^[0-9]{20}$' THEN
        RAISE EXCEPTION USING ERRCODE = 'ZF003',
            MESSAGE = format('fencepost guard: invalid token %L for resource %s', p_token, p_resource);
    END IF;
    INSERT INTO fencepost.marks AS m (resource, token)
    VALUES (p_resource, p_token)
    ON CONFLICT (resource) DO UPDATE
        SET token = GREATEST(m.token, EXCLUDED.token), updated_at = now()
    RETURNING m.token INTO current_mark;
    IF current_mark > (p_token COLLATE "C") THEN
        RAISE EXCEPTION USING ERRCODE = 'ZF001',
            MESSAGE = format(
                'stale fencing token for resource %s: presented %s, current %s (refused by the database guard)',
                p_resource, p_token::numeric, current_mark::numeric),
            HINT = 'a newer leader holds this resource; stop writing and re-acquire the lease';
    END IF;
END
$$;
