-- fencepost store, SQLite.
-- Tokens are u64, which SQLite cannot hold (INTEGER is i64), so they are
-- 20-digit zero-padded TEXT: byte order equals numeric order, so max() and
-- comparisons work on the text directly. The CHECKs keep a hand edit from
-- slipping in a short or non-numeric value that would compare wrongly.

CREATE TABLE fences (
    resource      TEXT    NOT NULL PRIMARY KEY,
    token         TEXT    NOT NULL
                  CHECK (length(token) = 20 AND token NOT GLOB '*[^0-9]*'),
    updated_at_ms INTEGER NOT NULL
);

-- One row per resource ever leased; it outlives its holders so the last
-- token issued is never forgotten (holder NULL once released).
CREATE TABLE leases (
    resource      TEXT    NOT NULL PRIMARY KEY,
    holder        TEXT,
    token         TEXT    NOT NULL
                  CHECK (length(token) = 20 AND token NOT GLOB '*[^0-9]*'),
    granted_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    ttl_ms        INTEGER NOT NULL,
    free_after_ms INTEGER NOT NULL DEFAULT 0
);

-- AUTOINCREMENT so an id is never reused after the newest rows are pruned:
-- ids order the log.
CREATE TABLE audit (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms           INTEGER NOT NULL,
    resource        TEXT,
    protocol        TEXT    NOT NULL,
    reason          TEXT    NOT NULL,
    presented_token TEXT
                    CHECK (presented_token IS NULL OR
                           (length(presented_token) = 20 AND presented_token NOT GLOB '*[^0-9]*')),
    current_token   TEXT
                    CHECK (current_token IS NULL OR
                           (length(current_token) = 20 AND current_token NOT GLOB '*[^0-9]*')),
    client_addr     TEXT    NOT NULL,
    detail          TEXT    NOT NULL
);

CREATE INDEX audit_resource_id ON audit (resource, id);
CREATE INDEX audit_at_ms ON audit (at_ms);
