#!/usr/bin/env bash
# What each part of the database guard's same-token call costs the
# backend, in instructions (issue 11): the guard's statement, the
# PL/pgSQL call, a read of the mark, and the whole `fencepost.advance`,
# sent as guard mode sends it in `-M simple` (prepended to the client's
# statement, in the same Query) and as SQL EXECUTE of a prepared statement:
#
#   bash benches/guard_sql_cost.sh [--transactions N] [--keep-tmp]
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
# Needs the machine's Postgres binaries (PG_BIN, default the newest
# /usr/lib/postgresql/*/bin), pgbench, psql and valgrind. Runs as root
# (the cluster runs as user postgres).
set -euo pipefail

N=2000
KEEP_TMP=0
while [ $# -gt 0 ]; do
    case "$1" in
        --transactions) N="$2"; shift 2 ;;
        --keep-tmp) KEEP_TMP=1; shift ;;
        -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ "$N" =~ ^[1-9][0-9]*$ ]] && [ "$N" -ge 8 ] || { echo "--transactions: an integer of at least 8" >&2; exit 2; }

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
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

PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')"
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
# Backend instructions of one pgbench run of script $1, $2 transactions:
# the largest count written after the run started (pgbench's set-up
# connection writes a small one too).
run() {
    touch "$TMP/marker"; sleep 1.1
    pgbench -n -h 127.0.0.1 -p "$PORT" -U postgres -M simple -D prepared=0 --random-seed=7 \
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
