-- fencepost store, Postgres. Runs with search_path = fencepost_store, so
-- every table (and sqlx's own _sqlx_migrations) lives in that schema and
-- never clashes with the user's tables.
-- Tokens are u64, which Postgres cannot hold (BIGINT is i64), so they are
-- 20-digit zero-padded TEXT in the "C" collation: byte order equals numeric
-- order, so GREATEST() and comparisons work on the text directly, whatever
-- the database's default collation. The CHECKs keep a hand edit from
-- slipping in a value that would compare wrongly.

CREATE TABLE fences (
    resource      TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    token         TEXT COLLATE "C" NOT NULL CHECK (token ~ '^[0-9]{20}$'),
    updated_at_ms BIGINT           NOT NULL
);

-- One row per resource ever leased; it outlives its holders so the last
-- token issued is never forgotten (holder NULL once released).
CREATE TABLE leases (
    resource      TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    holder        TEXT,
    token         TEXT COLLATE "C" NOT NULL CHECK (token ~ '^[0-9]{20}$'),
    granted_at_ms BIGINT           NOT NULL,
    expires_at_ms BIGINT           NOT NULL,
    ttl_ms        BIGINT           NOT NULL,
    free_after_ms BIGINT           NOT NULL DEFAULT 0
);

CREATE TABLE audit (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at_ms           BIGINT           NOT NULL,
    resource        TEXT COLLATE "C",
    protocol        TEXT             NOT NULL,
    reason          TEXT             NOT NULL,
    presented_token TEXT COLLATE "C" CHECK (presented_token ~ '^[0-9]{20}$'),
    current_token   TEXT COLLATE "C" CHECK (current_token ~ '^[0-9]{20}$'),
    client_addr     TEXT             NOT NULL,
    detail          TEXT             NOT NULL
);

CREATE INDEX audit_resource_id ON audit (resource, id);
CREATE INDEX audit_at_ms ON audit (at_ms);
