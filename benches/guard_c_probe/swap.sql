-- For `benches/guard_cost.sh --guard-sql benches/guard_c_probe/swap.sql`:
-- replaces the throwaway cluster's `fencepost.advance` with the C cost
-- probe (built and installed first: `make -C benches/guard_c_probe
-- install`, with postgresql-server-dev-15). The mark already exists
-- (guard_cost.sh advances it before), so the probe's same-token path is
-- the only one the run takes.
CREATE OR REPLACE FUNCTION fencepost.advance(p_resource text, p_token text, p_wait_ms integer)
RETURNS void LANGUAGE c VOLATILE AS '$libdir/fp_guard_probe', 'fp_guard_probe';
