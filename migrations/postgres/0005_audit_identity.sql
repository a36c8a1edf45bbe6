-- Who made an elector call, when the elector has identities
-- ([[elector.clients]], client certificates named by [[elector.grants]]).
-- NULL on refused writes, on calls without identities and on rows written
-- before this column. A record with an identity is hashed with it (the v2
-- encoding, fencing/src/audit_chain.rs); one without is hashed as before,
-- so `fencepost audit verify` keeps verifying older rows.
ALTER TABLE audit ADD COLUMN identity TEXT;
