-- fencepost_guard 1.0: `fencepost.advance_fast`, guard mode's guard call
-- with the same-token check in C (README.md here). Install the guard
-- first (`fencepost migrate --guard URL`, which also creates this
-- extension when the server has it), so that schema `fencepost`, its
-- marks and `fencepost.advance` exist: every case but the same-token one
-- is `fencepost.advance`'s.
\echo Use "CREATE EXTENSION fencepost_guard" to load this file. \quit

CREATE FUNCTION advance_fast(p_resource text, p_token text, p_wait_ms integer)
RETURNS void
LANGUAGE c
VOLATILE
PARALLEL UNSAFE
AS 'MODULE_PATHNAME', 'fencepost_advance_fast';

COMMENT ON FUNCTION advance_fast(text, text, integer) IS
    'fencepost.advance with its same-token check in C: same arguments, results and errors';
