#!/usr/bin/env bash
# What guard mode (enforce = "database") costs per pgbench TPC-B-like
# transaction, split between the database and the proxy, in instruction
# counts a loaded machine does not move (issue 11):
#
#   bash benches/guard_cost.sh [--transactions N] [--modes "simple extended prepared"]
#                              [--profiles DIR] [--guard-sql FILE]
#                              [--guard-extension]
#                              [--skip-build] [--keep-tmp]
#
# A throwaway Postgres cluster (initdb, fsync off, autovacuum off) runs
# under `valgrind --tool=callgrind --trace-children=yes`, so every backend
# writes its own instruction count when it exits; fencepost runs under
# callgrind too, with a proxy-mode and a guard-mode listener in front of
# that cluster (`fencepost migrate --guard` first). For each -M mode and
# each listener, one pgbench client runs N/4 and then N transactions; the
# backend's and the proxy's instructions per transaction are
# (Ir(N) - Ir(N/4)) / (3N/4), so connection set-up cancels out.
# pgbench's own work is the same in both modes and is not counted.
#
# Needs the machine's Postgres binaries (initdb, postgres: PG_BIN, default
# the newest /usr/lib/postgresql/*/bin), pgbench, psql, valgrind and
# callgrind_control. Runs as root (the cluster runs as user postgres).
# FENCEPOST_BIN=path measures another build (e.g. a "before" binary).
# --profiles DIR keeps the backend's callgrind file of each N-transaction
# run as DIR/backend-<mode>-<proxy|guard>.out, to see where the guard's
# instructions go: `python3 benches/callgrind_diff.py --per N
# DIR/backend-prepared-proxy.out DIR/backend-prepared-guard.out`.
# --guard-sql FILE runs FILE with psql on the throwaway cluster after the
# guard is installed and the mark set, to count another guard in its
# place. --guard-extension sets guard_extension = true on the guard-mode
# listener: the fencepost_guard extension's C guard
# (deploy/fencepost_guard/, installed first: make -C
# deploy/fencepost_guard with_llvm=no install).
set -euo pipefail

N=1200
MODES="simple extended prepared"
BUILD=1
KEEP_TMP=0
PROFILES=""
GUARD_SQL=""
GUARD_EXT=false
while [ $# -gt 0 ]; do
    case "$1" in
        --transactions) N="$2"; shift 2 ;;
        --modes) MODES="$2"; shift 2 ;;
        --skip-build) BUILD=0; shift ;;
        --keep-tmp) KEEP_TMP=1; shift ;;
        --profiles) PROFILES="$2"; shift 2 ;;
        --guard-sql) GUARD_SQL="$2"; shift 2 ;;
        --guard-extension) GUARD_EXT=true; shift ;;
        -h|--help) sed -n '2,34p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ "$N" =~ ^[1-9][0-9]*$ ]] && [ "$N" -ge 8 ] || { echo "--transactions: an integer of at least 8" >&2; exit 2; }
if [ -n "$GUARD_SQL" ] && [ ! -r "$GUARD_SQL" ]; then
    echo "--guard-sql: cannot read $GUARD_SQL" >&2; exit 2
fi
[ -n "$GUARD_SQL" ] && GUARD_SQL="$(cd "$(dirname "$GUARD_SQL")" && pwd)/$(basename "$GUARD_SQL")"
if [ -n "$PROFILES" ]; then
    mkdir -p "$PROFILES" && PROFILES="$(cd "$PROFILES" && pwd)"
fi

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
. "$HERE/lib.sh"
log() { printf '[guard-cost %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
PG_BIN="${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}"
for t in "$PG_BIN/initdb" "$PG_BIN/postgres" "$PG_BIN/pg_ctl"; do
    [ -x "$t" ] || { echo "missing $t (set PG_BIN)" >&2; exit 1; }
done
for t in pgbench psql valgrind callgrind_control; do
    command -v "$t" >/dev/null || { echo "missing tool: $t" >&2; exit 1; }
done
if [ "$BUILD" = 1 ]; then
    build_fencepost
fi
FENCEPOST="${FENCEPOST_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/fencepost}"
[ -x "$FENCEPOST" ] || { echo "no fencepost binary at $FENCEPOST" >&2; exit 1; }

TMP="$(mktemp -d /tmp/fencepost-guard-cost.XXXXXX)"
chmod 755 "$TMP"
PG_PID=""
FP_PID=""
cleanup() {
    local rc=$?
    set +e
    [ -n "$FP_PID" ] && { kill -TERM "$FP_PID" 2>/dev/null; wait "$FP_PID" 2>/dev/null; }
    [ -n "$PG_PID" ] && su postgres -c "'$PG_BIN/pg_ctl' -D '$TMP/pg/data' stop -m fast -w" >/dev/null 2>&1
    if [ "$KEEP_TMP" = 1 ] || [ "$rc" != 0 ]; then echo "temporary files kept in $TMP" >&2; else rm -rf "$TMP"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_pg() { # port seconds
    for _ in $(seq $(($2 * 5))); do
        PGCONNECT_TIMEOUT=2 psql -X -h 127.0.0.1 -p "$1" -U postgres -d bench -tAc 'SELECT 1' >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    echo "nothing answered on port $1 within $2 s; see $TMP" >&2; exit 1
}

PG_PORT="$(free_port)"
mkdir -p "$TMP/pg/cg"
chown -R postgres "$TMP/pg"
log "initdb and pgbench -i -s 1 (cluster on port $PG_PORT)"
su postgres -c "'$PG_BIN/initdb' -D '$TMP/pg/data' -A trust -U postgres" >"$TMP/initdb.log" 2>&1
su postgres -c "'$PG_BIN/pg_ctl' -D '$TMP/pg/data' -o '-p $PG_PORT -k $TMP/pg -c fsync=off -c autovacuum=off' -l '$TMP/pg/setup.log' start -w" >/dev/null
psql -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -c "CREATE DATABASE bench"
pgbench -h 127.0.0.1 -p "$PG_PORT" -U postgres -i -s 1 -q bench >"$TMP/init.log" 2>&1
"$FENCEPOST" migrate --guard "postgres://postgres@127.0.0.1:$PG_PORT/bench" >"$TMP/migrate.log" 2>&1
if [ "$GUARD_EXT" = true ] && ! grep -q "fencepost_guard extension is installed" "$TMP/migrate.log"; then
    echo "--guard-extension: the server has no fencepost_guard extension:" >&2
    cat "$TMP/migrate.log" >&2; exit 1
fi
psql -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d bench \
    -c "SELECT fencepost.advance('bench', '00000000000000000001', 5000)" >/dev/null
if [ -n "$GUARD_SQL" ]; then
    psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres -d bench -f "$GUARD_SQL" >/dev/null
fi
su postgres -c "'$PG_BIN/pg_ctl' -D '$TMP/pg/data' stop -w" >/dev/null

log "the cluster under callgrind"
su postgres -c "cd '$TMP/pg' && exec valgrind --tool=callgrind --trace-children=yes \
    --callgrind-out-file='$TMP/pg/cg/be.%p' '$PG_BIN/postgres' -D '$TMP/pg/data' -p $PG_PORT \
    -k '$TMP/pg' -c fsync=off -c autovacuum=off" >"$TMP/pg/server.log" 2>&1 &
PG_PID=$!
wait_pg "$PG_PORT" 120

PROXY_PORT="$(free_port)"; GUARD_PORT="$(free_port)"
mkdir -p "$TMP/fp"
cat >"$TMP/fp.toml" <<EOF
store = "sqlite://$TMP/fp/fencepost.db"
[log]
level = "warn"
[[postgres]]
listen = "127.0.0.1:$PROXY_PORT"
upstream = "127.0.0.1:$PG_PORT"
enforce = "proxy"
[[postgres]]
listen = "127.0.0.1:$GUARD_PORT"
upstream = "127.0.0.1:$PG_PORT"
enforce = "database"
guard_extension = $GUARD_EXT
EOF
log "fencepost under callgrind (proxy mode on $PROXY_PORT, guard mode on $GUARD_PORT)"
(cd "$TMP/fp" && exec env -u RUST_LOG valgrind --tool=callgrind --callgrind-out-file="$TMP/fp/out.%p" \
    "$FENCEPOST" serve --config "$TMP/fp.toml" >"$TMP/fp/fencepost.log" 2>&1) &
FP_PID=$!
wait_pg "$PROXY_PORT" 120
wait_pg "$GUARD_PORT" 120
export PGOPTIONS='-c fencing.token=1 -c fencing.resource=bench'

ir() { awk '/^(summary|totals):/ {print $2; exit}' "$1"; }
# One pgbench run of $3 transactions in mode $2 at port $1: "backend proxy"
# instructions. The backend's file is the largest one written during the
# run (pgbench's set-up connection writes a small one too); with
# --profiles, kept there as $4 when $4 is given.
run() {
    touch "$TMP/marker"; sleep 1.1
    callgrind_control -z "$FP_PID" >/dev/null 2>&1
    pgbench -n -h 127.0.0.1 -p "$1" -U postgres -M "$2" -c 1 -j 1 -t "$3" bench >"$TMP/pgbench.log" 2>&1 \
        || { cat "$TMP/pgbench.log" >&2; exit 1; }
    callgrind_control -d "$FP_PID" >/dev/null 2>&1
    local fp; fp="$(ls -t "$TMP"/fp/out.* | head -1)"
    local proxy; proxy="$(ir "$fp")"; rm -f "$TMP"/fp/out.*
    local backend=0 f v
    for _ in $(seq 100); do
        # Backends write their counts at exit, shortly after pgbench's.
        [ -n "$(find "$TMP/pg/cg" -name 'be.*' -newer "$TMP/marker" -size +1k)" ] && break
        sleep 0.2
    done
    sleep 2
    for f in $(find "$TMP/pg/cg" -name 'be.*' -newer "$TMP/marker"); do
        v="$(ir "$f")"
        if [ "${v:-0}" -gt "$backend" ]; then
            backend="$v"
            if [ -n "$PROFILES" ] && [ -n "${4:-}" ]; then
                cp "$f" "$PROFILES/$4"
            fi
        fi
        rm -f "$f"
    done
    echo "$backend $proxy"
}

declare -A BE=() FP=()
small=$((N / 4))
for m in $MODES; do
    for target in proxy guard; do
        port="$PROXY_PORT"; [ "$target" = guard ] && port="$GUARD_PORT"
        run "$port" "$m" 50 >/dev/null   # warm: caches, the fence slot
        read -r b1 p1 < <(run "$port" "$m" "$small")
        read -r b2 p2 < <(run "$port" "$m" "$N" "backend-$m-$target.out")
        BE["$m $target"]=$(( (b2 - b1) / (N - small) ))
        FP["$m $target"]=$(( (p2 - p1) / (N - small) ))
        log "$m $target: backend ${BE["$m $target"]}, proxy ${FP["$m $target"]} instructions per transaction"
    done
done

echo
echo "fencepost commit $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown), $("$PG_BIN/postgres" --version)"
echo "instructions per TPC-B-like transaction (callgrind, 1 pgbench client, $N transactions):"
printf '  %-9s %12s %12s %10s %12s %12s %10s\n' "-M" "backend px" "backend gd" "+" "proxy px" "proxy gd" "+"
for m in $MODES; do
    printf '  %-9s %12d %12d %10d %12d %12d %10d\n' "$m" \
        "${BE["$m proxy"]}" "${BE["$m guard"]}" $(( BE["$m guard"] - BE["$m proxy"] )) \
        "${FP["$m proxy"]}" "${FP["$m guard"]}" $(( FP["$m guard"] - FP["$m proxy"] ))
done
