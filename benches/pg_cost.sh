#!/usr/bin/env bash
# What fencepost's Postgres proxy (enforce = "proxy") costs per statement and
# per idle client connection, in figures a shared machine does not blur:
#
#   bash benches/pg_cost.sh [--statements N] [--idle-conns N] [--modes "simple extended prepared"]
#                           [--workloads "select tpcb"] [--skip-build] [--no-callgrind]
#                           [--no-idle] [--keep-tmp]
#
# 1. Instructions per statement (callgrind): fencepost runs under
#    `valgrind --tool=callgrind`; for each -M mode one pgbench client runs
#    the select-only script (-S) twice, N/4 and N transactions (one statement
#    each), with the counters zeroed before and dumped after each run
#    (callgrind_control). Instructions per statement = (Ir(N) - Ir(N/4)) /
#    (N - N/4): connection setup, start-up and warm-up cancel out. With
#    --workloads tpcb the TPC-B-like script too (7 statements a transaction:
#    BEGIN, 3 UPDATEs, SELECT, INSERT, END; written per statement).
# 2. Memory per idle client connection: fencepost (natively, not under
#    valgrind) with a proxy-mode listener in front of PgBouncer's transaction
#    pool (so 1,000 clients do not need 1,000 Postgres backends); a
#    python/psycopg client opens N real connections (startup, authentication,
#    one SELECT 1 each) and keeps them idle; (VmRSS with them - VmRSS before)
#    / N. PgBouncer's own figure, from the same connections, for comparison.
#
# Needs the machine's Postgres at 127.0.0.1:5432 (user postgres, trust),
# pgbench, valgrind, pgbouncer and python3-psycopg (as pg_overhead.sh).
# Creates a database fencepost_cost_<pid> (pgbench -i -s 1), dropped on exit.
# FENCEPOST_BIN=path measures another build (e.g. a "before" binary);
# FENCEPOST_ENGINE=tokio (or epoll) sets the listeners' `engine`.
set -euo pipefail

STATEMENTS=4000
ENGINE_LINE=""
[ -n "${FENCEPOST_ENGINE:-}" ] && ENGINE_LINE="engine = \"$FENCEPOST_ENGINE\""
IDLE_CONNS=1000
MODES="simple extended prepared"
WORKLOADS="select"
BUILD=1
CALLGRIND=1
IDLE=1
KEEP_TMP=0
while [ $# -gt 0 ]; do
    case "$1" in
        --statements) STATEMENTS="$2"; shift 2 ;;
        --idle-conns) IDLE_CONNS="$2"; shift 2 ;;
        --modes) MODES="$2"; shift 2 ;;
        --workloads) WORKLOADS="$2"; shift 2 ;;
        --skip-build) BUILD=0; shift ;;
        --no-callgrind) CALLGRIND=0; shift ;;
        --no-idle) IDLE=0; shift ;;
        --keep-tmp) KEEP_TMP=1; shift ;;
        -h|--help) sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
for v in "$STATEMENTS" "$IDLE_CONNS"; do
    [[ "$v" =~ ^[1-9][0-9]*$ ]] || { echo "numeric arguments must be positive integers" >&2; exit 2; }
done
[ "$STATEMENTS" -ge 8 ] || { echo "--statements: at least 8" >&2; exit 2; }

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
. "$HERE/lib.sh"
HELPER="$HERE/pg_overhead.py"
DB="fencepost_cost_$$"
log() { printf '[cost %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# The distribution's python3 has python3-psycopg; a python3 earlier in
# PATH (pyenv, a venv) may not.
if ! python3 -c 'import psycopg' 2>/dev/null && /usr/bin/python3 -c 'import psycopg' 2>/dev/null; then
    PATH="/usr/bin:$PATH"
fi
PGBOUNCER="$(command -v pgbouncer || echo /usr/sbin/pgbouncer)"
for t in pgbench psql createdb dropdb python3 valgrind callgrind_control; do
    command -v "$t" >/dev/null || { echo "missing tool: $t" >&2; exit 1; }
done
if [ "$IDLE" = 1 ]; then
    [ -x "$PGBOUNCER" ] || { echo "missing tool: pgbouncer (apt-get install pgbouncer)" >&2; exit 1; }
    python3 -c 'import psycopg' || { echo "python3 psycopg (3) is needed (apt-get install python3-psycopg)" >&2; exit 1; }
fi
if [ "$BUILD" = 1 ]; then
    build_fencepost
fi
FENCEPOST="${FENCEPOST_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/fencepost}"
[ -x "$FENCEPOST" ] || { echo "no fencepost binary at $FENCEPOST" >&2; exit 1; }

TMP="$(mktemp -d /tmp/fencepost-cost.XXXXXX)"
chmod 755 "$TMP"   # pgbouncer runs as postgres
PIDS=()
DB_CREATED=0
cleanup() {
    local rc=$?
    set +e
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    [ "$DB_CREATED" = 1 ] && { timeout 30 dropdb -h 127.0.0.1 -U postgres --if-exists --force "$DB" || echo "could not drop $DB" >&2; }
    if [ "$KEEP_TMP" = 1 ] || [ "$rc" != 0 ]; then echo "temporary files kept in $TMP" >&2; else rm -rf "$TMP"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_pg() { # port pid db seconds
    for _ in $(seq $(($4 * 10))); do
        kill -0 "$2" 2>/dev/null || { echo "a server exited during start-up; see $TMP" >&2; exit 1; }
        PGCONNECT_TIMEOUT=2 psql -X -h 127.0.0.1 -p "$1" -U postgres -d "$3" -tAc 'SELECT 1' >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "nothing answered on port $1 within $4 s; see $TMP" >&2; exit 1
}

log "creating database $DB (pgbench -i -s 1)"
createdb -h 127.0.0.1 -U postgres "$DB"
DB_CREATED=1
pgbench -h 127.0.0.1 -U postgres -i -s 1 -q "$DB" >"$TMP/init.log" 2>&1 || { cat "$TMP/init.log" >&2; exit 1; }
export PGOPTIONS='-c fencing.token=1 -c fencing.resource=bench'
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"

# ------------------------------------------------------- 1. callgrind
declare -A PER_STMT=()
if [ "$CALLGRIND" = 1 ]; then
    PORT="$(free_port)"
    mkdir -p "$TMP/cg"
    cat >"$TMP/cg.toml" <<EOF
store = "sqlite://$TMP/cg/fencepost.db"
[log]
level = "warn"
[[postgres]]
listen = "127.0.0.1:$PORT"
upstream = "127.0.0.1:5432"
enforce = "proxy"
$ENGINE_LINE
EOF
    log "starting fencepost under callgrind"
    (cd "$TMP/cg" && exec env -u RUST_LOG valgrind --tool=callgrind --callgrind-out-file="$TMP/cg/out.%p" \
        "$FENCEPOST" serve --config "$TMP/cg.toml" >"$TMP/cg/fencepost.log" 2>&1) &
    CG_PID=$!; PIDS+=("$CG_PID")
    wait_pg "$PORT" "$CG_PID" "$DB" 120
    # One run, its instructions: counters zeroed before, dumped after.
    ir_of() { # script mode transactions
        local args=(-n -M "$2" -c 1 -j 1 -t "$3")
        [ "$1" = select ] && args+=(-S)
        callgrind_control -z "$CG_PID" >/dev/null 2>&1
        pgbench -h 127.0.0.1 -p "$PORT" -U postgres "${args[@]}" "$DB" >"$TMP/cg/pgbench.log" 2>&1 \
            || { cat "$TMP/cg/pgbench.log" >&2; exit 1; }
        callgrind_control -d "$CG_PID" >/dev/null 2>&1
        local f; f="$(ls -t "$TMP"/cg/out.* | head -1)"
        awk '/^(summary|totals):/ {print $2; exit}' "$f"
        rm -f "$TMP"/cg/out.*
    }
    small=$((STATEMENTS / 4))
    for w in $WORKLOADS; do
        per=1; [ "$w" = tpcb ] && per=7
        for m in $MODES; do
            ir_of "$w" "$m" 50 >/dev/null   # warm: classification caches, the fence slot
            a="$(ir_of "$w" "$m" "$small")"
            b="$(ir_of "$w" "$m" "$STATEMENTS")"
            PER_STMT["$w $m"]=$(( (b - a) / ((STATEMENTS - small) * per) ))
            log "$w -M $m: ${PER_STMT["$w $m"]} instructions per statement (Ir $a for $small, $b for $STATEMENTS transactions)"
        done
    done
    kill -TERM "$CG_PID" 2>/dev/null; wait "$CG_PID" 2>/dev/null || true
    PIDS=()
fi

# ------------------------------------------------------- 2. idle memory
if [ "$IDLE" = 1 ]; then
    PGB_PORT="$(free_port)"; FP_PORT="$(free_port)"
    PGB="$TMP/pgbouncer"; mkdir -p "$PGB"
    printf '"postgres" ""\n' >"$PGB/userlist.txt"
    cat >"$PGB/pgbouncer.ini" <<EOF
[databases]
$DB = host=127.0.0.1 port=5432 dbname=$DB pool_mode=transaction pool_size=4
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
unix_socket_dir =
auth_type = trust
auth_file = $PGB/userlist.txt
max_client_conn = $((2 * IDLE_CONNS + 100))
ignore_startup_parameters = options,extra_float_digits
logfile = $PGB/pgbouncer.log
pidfile = $PGB/pgbouncer.pid
log_connections = 0
log_disconnections = 0
EOF
    chown -R postgres "$PGB" 2>/dev/null || true
    "$PGBOUNCER" -u postgres "$PGB/pgbouncer.ini" >"$TMP/pgbouncer.out" 2>&1 &
    PGB_PID=$!; PIDS+=("$PGB_PID")
    wait_pg "$PGB_PORT" "$PGB_PID" "$DB" 10
    mkdir -p "$TMP/idle"
    cat >"$TMP/idle.toml" <<EOF
store = "sqlite://$TMP/idle/fencepost.db"
[log]
level = "warn"
[[postgres]]
listen = "127.0.0.1:$FP_PORT"
upstream = "127.0.0.1:$PGB_PORT"
enforce = "proxy"
max_connections = $((2 * IDLE_CONNS + 100))
$ENGINE_LINE
EOF
    env -u RUST_LOG "$FENCEPOST" serve --config "$TMP/idle.toml" >"$TMP/idle/fencepost.log" 2>&1 &
    FP_PID=$!; PIDS+=("$FP_PID")
    wait_pg "$FP_PORT" "$FP_PID" "$DB" 10
    hold() { # port -> prints the holder's pid once its connections are open
        local ready="$TMP/ready.$1"; rm -f "$ready"
        python3 "$HELPER" hold --dsn "host=127.0.0.1 port=$1 user=postgres dbname=$DB" \
            --count "$IDLE_CONNS" --ready "$ready" --seconds 300 >"$TMP/hold.$1.log" 2>&1 &
        local pid=$!
        for _ in $(seq 1200); do
            [ -s "$ready" ] && break
            kill -0 "$pid" 2>/dev/null || { cat "$TMP/hold.$1.log" >&2; exit 1; }
            sleep 0.1
        done
        [ -s "$ready" ] || { echo "$IDLE_CONNS connections not open within 120 s" >&2; exit 1; }
        sleep 2
        echo "$pid"
    }
    # PgBouncer alone first (its own per-client cost), then through fencepost.
    PGB_BEFORE="$(rss_kb "$PGB_PID")"
    h="$(hold "$PGB_PORT")"
    PGB_WITH="$(rss_kb "$PGB_PID")"
    kill -TERM "$h"; wait "$h" 2>/dev/null || true
    sleep 2
    FP_BEFORE="$(rss_kb "$FP_PID")"
    h="$(hold "$FP_PORT")"
    FP_WITH="$(rss_kb "$FP_PID")"
    kill -TERM "$h"; wait "$h" 2>/dev/null || true
    sleep 2
    FP_AFTER="$(rss_kb "$FP_PID")"
fi

# ------------------------------------------------------- report
echo
echo "fencepost commit $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown), $(nproc) CPUs, $(uname -r)"
if [ "$CALLGRIND" = 1 ]; then
    echo "instructions per statement (callgrind, proxy mode, 1 client, token on every connection):"
    for w in $WORKLOADS; do
        for m in $MODES; do printf '  %-7s -M %-9s %8s\n' "$w" "$m" "${PER_STMT["$w $m"]}"; done
    done
fi
if [ "$IDLE" = 1 ]; then
    awk -v n="$IDLE_CONNS" -v b="$FP_BEFORE" -v w="$FP_WITH" -v a="$FP_AFTER" -v pb="$PGB_BEFORE" -v pw="$PGB_WITH" 'BEGIN {
        printf "memory per idle client connection (%d real connections, VmRSS delta / %d):\n", n, n
        printf "  fencepost  %6.1f KiB  (%d kB before, %d kB with them, %d kB after they closed)\n", (w - b) / n, b, w, a
        printf "  pgbouncer  %6.1f KiB  (%d kB before, %d kB with them)\n", (pw - pb) / n, pb, pw
    }'
fi
