#!/usr/bin/env bash
# What each part of the database guard's same-token call costs the
# backend, in instructions (issue 11): the guard's statement, the
# PL/pgSQL call, a read of the mark, and the whole `fencepost.advance`,
# sent as guard mode sends it in `-M simple` (prepended to the client's
# statement, in the same Query) and as SQL EXECUTE of a prepared statement:
#
#   bash benches/guard_sql_cost.sh [--transactions N] [--alternatives] [--keep-tmp]
#
# No proxy: pgbench talks to a throwaway Postgres cluster (initdb, fsync
# off, autovacuum off) run under `valgrind --tool=callgrind
# --trace-children=yes`, the guard installed from migrations/guard/ with
# psql. Each script is `BEGIN; <guard> \; SELECT 1; END;` and runs N/4
# and then N transactions on one connection; instructions per transaction
# are (Ir(N) - Ir(N/4)) / (3N/4), so connection set-up cancels out. The
# rows below "plain" are over plain's count. Counts repeat to within a
# few hundred instructions (fixed --random-seed, nothing random in the
# scripts); benches/guard_cost.sh gives the end-to-end figures per -M
# mode through fencepost.
#
# --alternatives also measures candidate cheaper same-token guards (the
# mark already the token), in -M simple and in -M prepared, each over
# plain in the same mode: the current `fencepost.advance`; two plain
# statements, the gate shared and then `SELECT 1/(SELECT count(*) ...
# token = ...)::int` (division by zero when the token is not the mark;
# under READ COMMITTED a new statement takes a new snapshot, after the
# gate); `guard_sql_hold`, a VOLATILE LANGUAGE sql function of those two
# statements (each statement of a volatile SQL function takes a new
# snapshot); `guard_plpgsql_hold`, PL/pgSQL, the gate in an IF, one read,
# RAISE ZF001 when it differs, no exception block; and two cost probes of
# a mark kept in a sequence (a sequence is read without a snapshot, so the
# value after the gate is the latest), not checked candidates (their slow
# path only raises): `guard_seq`, PL/pgSQL reading the resource's sequence
# (`fencepost.m_<md5 of the resource>`) with `pg_sequence_last_value`,
# then the gate, then the sequence again; and `seq_case`, the same as one
# plain SQL CASE expression, no function of ours. -M simple sends the
# guard as 0004 is sent, `BEGIN; <guard> \; SELECT 1; END;`; -M prepared
# cannot prepare a `\;` compound, so its scripts are separate statements,
# `BEGIN; <guard statement(s)>; SELECT 1; END;`, with the resource and
# token as parameters as guard mode's prepared guard has them, against
# plain's `BEGIN; SELECT 1; END;`. Before the counts it checks with psql
# (not under callgrind) that each candidate returns when the token is
# the mark, fails when the mark is newer or older, and, against a transaction
# that holds the gate exclusive while it raises the mark, waits and then
# fails; and shows what each does under REPEATABLE READ.
#
# Needs the machine's Postgres binaries (PG_BIN, default the newest
# /usr/lib/postgresql/*/bin), pgbench, psql and valgrind. Runs as root
# (the cluster runs as user postgres).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
. "$HERE/lib.sh"

N=2000
KEEP_TMP=0
ALTERNATIVES=0
while [ $# -gt 0 ]; do
    case "$1" in
        --transactions) N="$2"; shift 2 ;;
        --keep-tmp) KEEP_TMP=1; shift ;;
        --alternatives) ALTERNATIVES=1; shift ;;
        -h|--help) usage_from_header "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ "$N" =~ ^[1-9][0-9]*$ ]] && [ "$N" -ge 8 ] || { echo "--transactions: an integer of at least 8" >&2; exit 2; }

log() { printf '[guard-sql-cost %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
PG_BIN="${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}"
for t in "$PG_BIN/initdb" "$PG_BIN/postgres" "$PG_BIN/pg_ctl"; do
    [ -x "$t" ] || { echo "missing $t (set PG_BIN)" >&2; exit 1; }
done
for t in pgbench psql valgrind; do
    command -v "$t" >/dev/null || { echo "missing tool: $t" >&2; exit 1; }
done

TMP="$(mktemp -d /tmp/fencepost-guard-sql-cost.XXXXXX)"
chmod 755 "$TMP"
PG_UP=0
cleanup() {
    local rc=$?
    set +e
    [ "$PG_UP" = 1 ] && su postgres -c "'$PG_BIN/pg_ctl' -D '$TMP/pg/data' stop -m fast -w" >/dev/null 2>&1
    if [ "$KEEP_TMP" = 1 ] || [ "$rc" != 0 ]; then echo "temporary files kept in $TMP" >&2; else rm -rf "$TMP"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

PORT="$(free_port)"
PSQL=(psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres)
mkdir -p "$TMP/pg/cg" "$TMP/scripts"
chown -R postgres "$TMP/pg"
log "initdb, the guard from migrations/guard/ (cluster on port $PORT)"
su postgres -c "'$PG_BIN/initdb' -D '$TMP/pg/data' -A trust -U postgres" >"$TMP/initdb.log" 2>&1
su postgres -c "'$PG_BIN/pg_ctl' -D '$TMP/pg/data' -o '-p $PORT -k $TMP/pg -c fsync=off -c autovacuum=off' -l '$TMP/pg/setup.log' start -w" >/dev/null
PG_UP=1
"${PSQL[@]}" -d postgres -c "CREATE DATABASE bench"
for f in "$ROOT"/migrations/guard/*.sql; do "${PSQL[@]}" -d bench -f "$f" >/dev/null; done
# Two yardsticks beside the guard: a PL/pgSQL function of the same
# signature that does nothing, and one that only reads the mark.
"${PSQL[@]}" -d bench <<'SQL' >/dev/null
CREATE FUNCTION public.guard_noop(p_resource text, p_token text, p_wait_ms integer)
RETURNS void LANGUAGE plpgsql VOLATILE AS $$ BEGIN RETURN; END $$;
CREATE FUNCTION public.guard_read(p_resource text, p_token text, p_wait_ms integer)
RETURNS void LANGUAGE plpgsql VOLATILE AS $$
DECLARE mark text COLLATE "C";
BEGIN
    SELECT m.token INTO mark FROM fencepost.marks AS m WHERE m.resource = p_resource;
END $$;
SELECT fencepost.advance('bench', '00000000000000000001', 5000);
SQL

# --alternatives: the candidate guards, and what each does on the throwaway
# cluster before it goes under callgrind.
GATE="pg_advisory_xact_lock_shared(1717920355, hashtext('bench'))"
READ="SELECT 1/(SELECT count(*) FROM fencepost.marks WHERE resource = 'bench' AND token = '00000000000000000001')::int"
declare -A CHECK=()
CHECKS_BAD=0
if [ "$ALTERNATIVES" = 1 ]; then
    "${PSQL[@]}" -d bench <<'SQL' >/dev/null
CREATE FUNCTION public.guard_sql_hold(p_resource text, p_token text)
RETURNS integer LANGUAGE sql VOLATILE AS $$
    SELECT pg_advisory_xact_lock_shared(1717920355, hashtext(p_resource));
    SELECT 1/(SELECT count(*) FROM fencepost.marks WHERE resource = p_resource AND token = p_token)::int;
$$;
CREATE FUNCTION public.guard_plpgsql_hold(p_resource text, p_token text)
RETURNS void LANGUAGE plpgsql VOLATILE AS $$
DECLARE mark text COLLATE "C";
BEGIN
    IF pg_advisory_xact_lock_shared(1717920355, hashtext(p_resource)) IS NULL THEN
        NULL;
    END IF;
    SELECT m.token INTO mark FROM fencepost.marks AS m WHERE m.resource = p_resource;
    IF mark IS DISTINCT FROM (p_token COLLATE "C") THEN
        RAISE EXCEPTION USING ERRCODE = 'ZF001',
            MESSAGE = format('fencing token %s is not the mark %s for resource %s',
                             p_token, coalesce(mark, 'none'), p_resource);
    END IF;
END $$;
SQL
    # The sequence probes: the mark (token 1, stored as token - 2^63 so
    # that a u64 fits a bigint) in the resource's sequence.
    "${PSQL[@]}" -d bench <<'SQL' >/dev/null
CREATE SEQUENCE fencepost.m_1d28d258250876fb7dde22a17436ef9c AS bigint
    MINVALUE -9223372036854775808 NO MAXVALUE NO CYCLE;
SELECT setval('fencepost.m_1d28d258250876fb7dde22a17436ef9c', -9223372036854775807, true);
CREATE FUNCTION public.guard_seq(p_resource text, p_token text, p_wait_ms integer)
RETURNS void LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    seq regclass;
    v   bigint;
BEGIN
    seq := to_regclass('fencepost.m_' || md5(p_resource));
    v := (p_token::numeric - 9223372036854775808)::bigint;
    IF pg_sequence_last_value(seq) = v THEN
        IF pg_advisory_xact_lock_shared(1717920355, hashtext(p_resource)) IS NULL THEN
            NULL;
        END IF;
        IF pg_sequence_last_value(seq) = v THEN
            RETURN;
        END IF;
    END IF;
    RAISE EXCEPTION 'not the mark (a probe: no slow path)';
END $$;
SQL
    set_mark() { "${PSQL[@]}" -d bench -c "UPDATE fencepost.marks SET token = '$1' WHERE resource = 'bench'"; }
    # What one transaction of candidate $1 ends with: "returns" or the
    # SQLSTATE of its error. $2 is BEGIN's options; each further argument
    # is one Query message (psql -c), so a `;` inside one argument is a
    # multi-statement simple Query.
    attempt() {
        local name="$1" begin="$2" out; shift 2
        local args=(-c '\set VERBOSITY sqlstate' -c "BEGIN $begin")
        case "$name" in
            advance) args+=(-c "SELECT fencepost.advance('bench', '00000000000000000001', 5000); SELECT 1") ;;
            two) args+=(-c "SELECT $GATE; $READ; SELECT 1") ;;
            two-separate) args+=(-c "SELECT $GATE" -c "$READ" -c "SELECT 1") ;;
            sql-fn) args+=(-c "SELECT public.guard_sql_hold('bench', '00000000000000000001'); SELECT 1") ;;
            plpgsql-fn) args+=(-c "SELECT public.guard_plpgsql_hold('bench', '00000000000000000001'); SELECT 1") ;;
        esac
        if out="$("${PSQL[@]}" -d bench "${args[@]}" -c COMMIT 2>&1 >/dev/null)"; then
            echo returns
        else
            grep -o 'ERROR: *[0-9A-Z]\{5\}' <<<"$out" | awk '{print $2; exit}' | grep . || echo "failed: $out"
        fi
    }
    # The same while another transaction holds the gate exclusive and
    # raises the mark to 2 (as a newer token's advance does), committing
    # 1.5 s later: "<outcome> after <ms> ms".
    raced() {
        local t0 t1 res
        "${PSQL[@]}" -d bench -c "BEGIN; SELECT pg_advisory_xact_lock(1717920355, hashtext('bench')); UPDATE fencepost.marks SET token = '00000000000000000002' WHERE resource = 'bench'; SELECT pg_sleep(1.5); COMMIT" >/dev/null &
        local holder=$!
        for _ in $(seq 100); do
            [ "$("${PSQL[@]}" -d bench -tAc "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND mode = 'ExclusiveLock' AND granted")" = 1 ] && break
            sleep 0.05
        done
        t0="$(date +%s%N)"; res="$(attempt "$@")"; t1="$(date +%s%N)"
        wait "$holder"
        set_mark 00000000000000000001 >/dev/null
        echo "$res after $(( (t1 - t0) / 1000000 )) ms"
    }
    # expect <label> <wanted outcome, a regex> <outcome>
    expect() {
        local verdict=ok
        [[ "$3" =~ ^($2)$ ]] || { verdict=UNEXPECTED; CHECKS_BAD=1; }
        CHECK[$1]="$3 ($verdict)"
        log "check $1: $3 ($verdict)"
    }
    log "checks of the candidates (psql, not under callgrind)"
    for c in advance two two-separate sql-fn plpgsql-fn; do
        expect "$c/equal" returns "$(attempt "$c" "")"
    done
    set_mark 00000000000000000002 >/dev/null
    for c in advance two two-separate sql-fn plpgsql-fn; do
        expect "$c/mark-newer" 'ZF001|22012' "$(attempt "$c" "")"
    done
    # A newer token than the mark (a new leader's first transaction):
    # advance raises the mark; a same-token guard fails, and its error
    # ends the client's transaction too.
    set_mark 00000000000000000000 >/dev/null
    for c in advance two two-separate sql-fn plpgsql-fn; do
        if [ "$c" = advance ]; then want=returns; else want='ZF001|22012'; fi
        expect "$c/token-newer" "$want" "$(attempt "$c" "")"
        set_mark 00000000000000000000 >/dev/null
    done
    set_mark 00000000000000000001 >/dev/null
    for c in advance two two-separate sql-fn plpgsql-fn; do
        expect "$c/raced" '(ZF001|22012) after (1[0-9]{3}|[2-9][0-9]{3}) ms' "$(raced "$c" "")"
    done
    # Under REPEATABLE READ the snapshot is the transaction's first: taken
    # by the guard's first statement, before the gate's wait. 0004 reads
    # FOR SHARE there (40001); the candidates' plain read is shown as it is.
    for c in advance two two-separate sql-fn plpgsql-fn; do
        expect "$c/raced-repeatable-read" '.*' "$(raced "$c" "ISOLATION LEVEL REPEATABLE READ")"
    done
fi
su postgres -c "'$PG_BIN/pg_ctl' -D '$TMP/pg/data' stop -w" >/dev/null
PG_UP=0

ARGS="'bench', '00000000000000000001', 5000"
script() { printf 'BEGIN;\n%s\nEND;\n' "$2" >"$TMP/scripts/$1.sql"; }
script plain "SELECT 1;"
script statement "SELECT 1 \\; SELECT 1;"
script call "SELECT guard_noop($ARGS) \\; SELECT 1;"
script read "SELECT guard_read($ARGS) \\; SELECT 1;"
script advance "SELECT fencepost.advance($ARGS) \\; SELECT 1;"
# Prepared once per connection (pgbench keeps a client's variables from
# one transaction to the next), as guard mode's extended path prepares
# fencepost_guard_N once per server session.
printf '\\if :prepared = 0\nPREPARE fencepost_guard_1(text, text, integer) AS SELECT fencepost.advance($1, $2, $3);\n\\set prepared 1\n\\endif\n' >"$TMP/scripts/execute.sql"
cat >>"$TMP/scripts/execute.sql" <<EOF
BEGIN;
EXECUTE fencepost_guard_1($ARGS) \\; SELECT 1;
END;
EOF
# --alternatives: -M simple as above; -M prepared as separate statements
# (pgbench cannot prepare a `\;` compound), the resource and token as
# parameters (pgbench variables become $n in -M prepared).
script two "SELECT $GATE \\; $READ \\; SELECT 1;"
script sql_fn "SELECT public.guard_sql_hold('bench', '00000000000000000001') \\; SELECT 1;"
script plpgsql_fn "SELECT public.guard_plpgsql_hold('bench', '00000000000000000001') \\; SELECT 1;"
script advance_p $'SELECT fencepost.advance(:resource, :token, 5000);\nSELECT 1;'
script two_p $'SELECT pg_advisory_xact_lock_shared(1717920355, hashtext(:resource));\nSELECT 1/(SELECT count(*) FROM fencepost.marks WHERE resource = :resource AND token = :token)::int;\nSELECT 1;'
script sql_fn_p $'SELECT public.guard_sql_hold(:resource, :token);\nSELECT 1;'
script plpgsql_fn_p $'SELECT public.guard_plpgsql_hold(:resource, :token);\nSELECT 1;'
# The sequence probes (a mismatch divides by zero, behind a volatile call
# so that planning does not fold it; they never mismatch here).
SEQ="to_regclass('fencepost.m_' || md5('bench'))"
SEQ_P="to_regclass('fencepost.m_' || md5(:resource))"
V="(('00000000000000000001')::numeric - 9223372036854775808)::bigint"
V_P="((:token)::numeric - 9223372036854775808)::bigint"
seq_case() {
    printf 'SELECT CASE WHEN pg_sequence_last_value(%s) IS DISTINCT FROM %s THEN 1/(random() < 0)::int = 1 WHEN pg_advisory_xact_lock_shared(1717920355, hashtext(%s)) IS NULL THEN NULL WHEN pg_sequence_last_value(%s) = %s THEN true ELSE 1/(random() < 0)::int = 1 END' "$1" "$2" "$3" "$1" "$2"
}
script seq_fn "SELECT public.guard_seq('bench', '00000000000000000001', 5000) \\; SELECT 1;"
script seq_case "$(seq_case "$SEQ" "$V" "'bench'") \\; SELECT 1;"
script seq_fn_p $'SELECT public.guard_seq(:resource, :token, 5000);\nSELECT 1;'
script seq_case_p "$(seq_case "$SEQ_P" "$V_P" ":resource");
SELECT 1;"

log "the cluster under callgrind"
su postgres -c "cd '$TMP/pg' && exec valgrind --tool=callgrind --trace-children=yes \
    --callgrind-out-file='$TMP/pg/cg/be.%p' '$PG_BIN/postgres' -D '$TMP/pg/data' -p $PORT \
    -k '$TMP/pg' -c fsync=off -c autovacuum=off" >"$TMP/pg/server.log" 2>&1 &
PG_UP=1
for _ in $(seq 600); do
    "${PSQL[@]}" -d bench -tAc 'SELECT 1' >/dev/null 2>&1 && break
    sleep 0.2
done

ir() { awk '/^(summary|totals):/ {print $2; exit}' "$1"; }
# Backend instructions of one pgbench run of script $1, $2 transactions,
# -M $3 (default simple): the largest count written after the run started
# (pgbench's set-up connection writes a small one too).
run() {
    touch "$TMP/marker"; sleep 1.1
    pgbench -n -h 127.0.0.1 -p "$PORT" -U postgres -M "${3:-simple}" -D prepared=0 \
        -D resource=bench -D token=00000000000000000001 --random-seed=7 \
        -c 1 -j 1 -t "$2" -f "$TMP/scripts/$1.sql" bench >"$TMP/pgbench.log" 2>&1 \
        || { cat "$TMP/pgbench.log" >&2; exit 1; }
    for _ in $(seq 100); do
        [ -n "$(find "$TMP/pg/cg" -name 'be.*' -newer "$TMP/marker" -size +1k)" ] && break
        sleep 0.2
    done
    sleep 2
    local backend=0 f v
    for f in $(find "$TMP/pg/cg" -name 'be.*' -newer "$TMP/marker"); do
        v="$(ir "$f")"; [ "${v:-0}" -gt "$backend" ] && backend="$v"
        rm -f "$f"
    done
    echo "$backend"
}

declare -A IR=()
small=$((N / 4))
for s in plain statement call read advance execute; do
    run "$s" 20 >/dev/null
    b1="$(run "$s" "$small")"; b2="$(run "$s" "$N")"
    IR[$s]=$(( (b2 - b1) / (N - small) ))
    log "$s: ${IR[$s]} backend instructions per transaction"
done

echo
echo "fencepost commit $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown), $("$PG_BIN/postgres" --version)"
echo "backend instructions per transaction (callgrind, 1 pgbench client, -M simple, $N transactions):"
printf '  %-60s %10s %10s\n' "BEGIN; <...> \\; SELECT 1; END;" "total" "over plain"
row() { printf '  %-60s %10d %10d\n' "$1" "${IR[$2]}" $(( IR[$2] - IR[plain] )); }
row "(nothing: plain)" plain
row "SELECT 1 (an extra statement)" statement
row "SELECT guard_noop(...) (PL/pgSQL call, empty body)" call
row "SELECT guard_read(...) (the call and one read of the mark)" read
row "SELECT fencepost.advance(...) (the guard, same token)" advance
row "EXECUTE fencepost_guard_1(...) (the guard, SQL EXECUTE)" execute

[ "$ALTERNATIVES" = 1 ] || exit 0
# The candidates: -M simple reuses plain and advance from above.
measure() {
    local key="$1" script="$2" mode="$3" b1 b2
    run "$script" 20 "$mode" >/dev/null
    b1="$(run "$script" "$small" "$mode")"; b2="$(run "$script" "$N" "$mode")"
    IR[$key]=$(( (b2 - b1) / (N - small) ))
    log "$script -M $mode: ${IR[$key]} backend instructions per transaction"
}
for s in two sql_fn plpgsql_fn seq_fn seq_case; do measure "$s" "$s" simple; done
measure plain_p plain prepared
for s in advance_p two_p sql_fn_p plpgsql_fn_p seq_fn_p seq_case_p; do measure "$s" "$s" prepared; done

echo
echo "candidate same-token guards, backend instructions per transaction over plain in the same -M mode"
echo "(simple: BEGIN; <guard> \\; SELECT 1; END; prepared: BEGIN; <guard statement(s)>; SELECT 1; END;"
echo " against plain BEGIN; SELECT 1; END; which is ${IR[plain]} simple, ${IR[plain_p]} prepared):"
printf '  %-72s %10s %10s\n' "candidate" "simple" "prepared"
alt() { printf '  %-72s %10d %10d\n' "$1" $(( IR[$2] - IR[plain] )) $(( IR[$3] - IR[plain_p] )); }
alt "1 fencepost.advance(...) (0004, current)" advance advance_p
alt "2 SELECT pg_advisory_xact_lock_shared(...); SELECT 1/(count of the mark)" two two_p
alt "3 guard_sql_hold(...) (LANGUAGE sql VOLATILE, the two statements)" sql_fn sql_fn_p
alt "4 guard_plpgsql_hold(...) (PL/pgSQL, gate in an IF, no exception block)" plpgsql_fn plpgsql_fn_p
alt "probe: guard_seq(...) (PL/pgSQL; the mark read from a sequence)" seq_fn seq_fn_p
alt "probe: one SQL CASE over the sequence, the gate between two reads" seq_case seq_case_p
echo
echo "checks (psql, not under callgrind; returns or the SQLSTATE; raced: another transaction holds"
echo "the gate exclusive and raises the mark to 2 for 1.5 s; candidate 2 is 'two' as one Query and"
echo "'two-separate' as three):"
for k in $(printf '%s\n' "${!CHECK[@]}" | sort); do printf '  %-40s %s\n' "$k" "${CHECK[$k]}"; done
[ "$CHECKS_BAD" = 0 ] || { echo "some checks were UNEXPECTED" >&2; exit 1; }
