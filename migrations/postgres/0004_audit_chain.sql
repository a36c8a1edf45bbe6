-- Tamper evidence: each record's place in its writer's hash chain (see
-- fencing/src/audit_chain.rs). Rows written before chains keep NULLs and
-- are reported as unchained by `fencepost audit verify`. The unique index
-- is what verify walks, and what makes a spooled batch shipped twice (a
-- crash between its commit and the spool's cut) land once: NULLs never
-- conflict, so unchained rows are unaffected.
ALTER TABLE audit ADD COLUMN chain_id TEXT COLLATE "C";
ALTER TABLE audit ADD COLUMN seq BIGINT;
ALTER TABLE audit ADD COLUMN prev_hash TEXT COLLATE "C";
ALTER TABLE audit ADD COLUMN hash TEXT COLLATE "C";

CREATE UNIQUE INDEX audit_chain_seq ON audit (chain_id, seq);
