#!/usr/bin/env bash
# Postgres overhead of fencepost's [[postgres]] proxy, against a direct
# connection, a plain L4 relay (socat, the floor) and PgBouncer (session
# pooling), with pgbench.
#
#   bash benches/pg_overhead.sh [--rounds N] [--duration S] [--sweep-rounds N]
#                               [--clients C] [--idle-conns N] [--resources N]
#                               [--private-server] [--fsync on|off]
#                               [--workloads "select tpcb"] [--no-sweep]
#                               [--results DIR] [--skip-install]
#                               [--skip-build] [--keep-tmp]
#                               [--fixed-order] [--no-reset] [--with-tokio]
#                               [--variant 'TOML line'] [--guard-extension]
#                               [--targets "direct relay pgbouncer fp-proxy fp-guard"]
#
# Needs the machine's Postgres at 127.0.0.1:5432 (user postgres, trust
# auth); creates a database fencepost_bench_<pid> there (pgbench -i -s 10)
# and drops it on exit. With --private-server it instead initdb's and runs
# a throwaway cluster of the same Postgres (default settings but
# max_connections=300) on a free port, so the 128-client level fits
# beside PgBouncer's own server connections; stopped and removed on exit.
# --fsync on|off (with --private-server) sets that cluster's fsync, to
# compare the targets with and without the cost of flushing the WAL.
# --workloads picks the pgbench scripts (default both), --no-sweep skips
# the client-count sweep, --results writes the results elsewhere (e.g. one
# directory per fsync setting). Targets (all on 127.0.0.1, ports picked at start):
#   direct     pgbench -> Postgres
#   relay      pgbench -> socat (TCP relay, TCP_NODELAY both sides) -> Postgres
#   pgbouncer  pgbench -> PgBouncer (pool_mode=session) -> Postgres
#   fp-proxy   pgbench -> fencepost [[postgres]] enforce="proxy" -> Postgres
#   fp-guard   pgbench -> fencepost [[postgres]] enforce="database" -> Postgres
#              (after `fencepost migrate --guard`)
#   fp-tokio   (--with-tokio) fp-proxy with engine = "tokio": each session a
#              tokio task instead of a state machine in the epoll engine
#   fp-variant (--variant LINE) fp-proxy with LINE added to its listener,
#              e.g. 'workers = 1'
#   fp-guard-c (--guard-extension) fp-guard with guard_extension = true: the
#              fencepost_guard extension's C guard (deploy/fencepost_guard/,
#              installed in the server first: make -C deploy/fencepost_guard
#              install)
# --targets picks which of the first five run (default all five; fp-tokio,
# fp-variant and fp-guard-c come with their own options): issue 13's
# comparison needs only pgbouncer, relay and fp-proxy, and a round without
# guard mode is a fifth shorter, so a run of the same length has more
# rounds.
# Every connection carries a valid token: PGOPTIONS='-c fencing.token=1
# -c fencing.resource=bench' (PgBouncer is told to ignore `options`).
#
# Workloads: pgbench -S (select-only) and the default TPC-B-like script at
# -c C -j 2, and -S at one client (select1), each in -M simple, extended and
# prepared, run interleaved for N rounds, each round in an order rotated
# one place from the round before (round 1 direct, relay, pgbouncer,
# fp-proxy, fp-guard; round 2 relay, ..., direct), so that no target
# always runs last (--fixed-order: the same order every round). Before
# every measured run the bench database is put back as pgbench itself
# would without -n, on the server directly rather than through the target:
# VACUUM pgbench_branches and pgbench_tellers, TRUNCATE pgbench_history,
# and a CHECKPOINT, so each run starts from the same tables and none pays
# for another's dirty pages or dead rows (--no-reset: skip it). The report
# ends with issue 13's table (fp-proxy TPS as a ratio to PgBouncer's and
# to the relay's, per row and mode). Then -S -M prepared at 1, 8, 32 and
# 128 clients (levels the server's
# max_connections cannot hold are skipped and named). fencepost's resident
# memory: idle, with N idle client connections through it (before the
# load), and after writes to N distinct resources (after it).
#
# Output: a table on stdout, and in benches/results/:
#   pg_overhead.csv          one row per pgbench run (tps, latency avg/p50/p99)
#   pg_overhead.json         runs, medians, ratios, memory, environment
#   pg_overhead.svg          TPS ratio to direct per workload and by clients
#   pg_overhead_pgbench.txt  the raw pgbench output of every run
set -euo pipefail

ROUNDS=3
DURATION=10
SWEEP_ROUNDS=1
CLIENTS=8
IDLE_CONNS=1000
RESOURCES=10000
SWEEP_CLIENTS=(1 8 32 128)
INSTALL=1
BUILD=1
KEEP_TMP=0
SCALE=10

PRIVATE=0
FSYNC=""
WORKLOADS="select tpcb select1"
NO_SWEEP=0
RESULTS_DIR=""
FIXED_ORDER=0
RESET=1
VARIANT=""
VT=""
GX=0
PICKED="direct relay pgbouncer fp-proxy fp-guard"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
. "$HERE/lib.sh"
usage() { usage_from_header "$0"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS="$2"; shift 2 ;;
        --duration) DURATION="$2"; shift 2 ;;
        --sweep-rounds) SWEEP_ROUNDS="$2"; shift 2 ;;
        --clients) CLIENTS="$2"; shift 2 ;;
        --idle-conns) IDLE_CONNS="$2"; shift 2 ;;
        --resources) RESOURCES="$2"; shift 2 ;;
        --private-server) PRIVATE=1; shift ;;
        --fsync) FSYNC="$2"; shift 2 ;;
        --workloads) WORKLOADS="$2"; shift 2 ;;
        --no-sweep) NO_SWEEP=1; shift ;;
        --results) RESULTS_DIR="$2"; shift 2 ;;
        --skip-install) INSTALL=0; shift ;;
        --skip-build) BUILD=0; shift ;;
        --keep-tmp) KEEP_TMP=1; shift ;;
        --fixed-order) FIXED_ORDER=1; shift ;;
        --no-reset) RESET=0; shift ;;
        --with-tokio) VARIANT='engine = "tokio"'; VT=fp-tokio; shift ;;
        --variant) VARIANT="$2"; VT=fp-variant; shift 2 ;;
        --guard-extension) GX=1; shift ;;
        --targets) PICKED="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$FSYNC" in
    "") ;;
    on|off) [ "$PRIVATE" = 1 ] || { echo "--fsync needs --private-server (it sets the private cluster's fsync)" >&2; exit 2; } ;;
    *) echo "--fsync takes on or off" >&2; exit 2 ;;
esac
for t in $PICKED; do
    case "$t" in
        direct|relay|pgbouncer|fp-proxy|fp-guard) ;;
        *) echo "--targets: direct, relay, pgbouncer, fp-proxy and/or fp-guard, not $t" >&2; exit 2 ;;
    esac
done
[ -n "$PICKED" ] || { echo "--targets: at least one target" >&2; exit 2; }
# Whether the list $1 (words apart by spaces) holds the word $2.
holds() { case " $1 " in *" $2 "*) return 0 ;; *) return 1 ;; esac; }
if [ "$GX" = 1 ] && ! holds "$PICKED" fp-guard; then
    echo "--guard-extension compares fp-guard-c with fp-guard: keep fp-guard in --targets" >&2; exit 2
fi
for w in $WORKLOADS; do
    [ "$w" = select ] || [ "$w" = tpcb ] || [ "$w" = select1 ] \
        || { echo "--workloads: select, tpcb and/or select1, not $w" >&2; exit 2; }
done
[ -n "$WORKLOADS" ] || { echo "--workloads: at least one of select, tpcb, select1" >&2; exit 2; }
for v in "$ROUNDS" "$DURATION" "$SWEEP_ROUNDS" "$CLIENTS" "$IDLE_CONNS" "$RESOURCES"; do
    [[ "$v" =~ ^[1-9][0-9]*$ ]] || { echo "numeric arguments must be positive integers" >&2; exit 2; }
done
if [ "$ROUNDS" -gt 50 ] || [ "$SWEEP_ROUNDS" -gt 50 ] || [ "$DURATION" -gt 300 ] \
    || [ "$IDLE_CONNS" -gt 5000 ] || [ "$RESOURCES" -gt 100000 ]; then
    echo "at most 50 rounds, 300 s per run, 5000 idle connections, 100000 resources" >&2; exit 2
fi

RESULTS="${RESULTS_DIR:-$HERE/results}"
HELPER="$HERE/pg_overhead.py"
PGHOST_=127.0.0.1
PGPORT_=5432
PGUSER_=postgres
DB="fencepost_bench_$$"
log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# ---------------------------------------------------------------- 1. tools
if [ "$INSTALL" = 1 ] && ! command -v pgbouncer >/dev/null && [ ! -x /usr/sbin/pgbouncer ]; then
    log "installing pgbouncer"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq pgbouncer >/dev/null
fi
# The distribution's python3 has python3-psycopg; a python3 earlier in
# PATH (pyenv, a venv) may not.
if ! python3 -c 'import psycopg' 2>/dev/null && /usr/bin/python3 -c 'import psycopg' 2>/dev/null; then
    PATH="/usr/bin:$PATH"
fi
if [ "$INSTALL" = 1 ] && ! python3 -c 'import psycopg' 2>/dev/null; then
    log "installing python3-psycopg"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-psycopg >/dev/null
fi
if [ "$INSTALL" = 1 ] && ! command -v socat >/dev/null; then
    log "installing socat"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq socat >/dev/null
fi
PGBOUNCER="$(command -v pgbouncer || echo /usr/sbin/pgbouncer)"
for t in pgbench psql createdb dropdb python3 socat "$PGBOUNCER"; do
    command -v "$t" >/dev/null || { echo "missing tool: $t" >&2; exit 1; }
done
python3 -c 'import psycopg' || { echo "python3 psycopg (3) is needed for the memory figures" >&2; exit 1; }

if [ "$BUILD" = 1 ]; then
    build_fencepost
fi
FENCEPOST="${CARGO_TARGET_DIR:-$ROOT/target}/release/fencepost"
[ -x "$FENCEPOST" ] || { echo "no fencepost binary at $FENCEPOST" >&2; exit 1; }

export PGCONNECT_TIMEOUT=10
pg() { psql -X -q -v ON_ERROR_STOP=1 -h "$PGHOST_" -p "$PGPORT_" -U "$PGUSER_" "$@"; }

# ---------------------------------------------------------------- cleanup
TMP="$(mktemp -d /tmp/fencepost-pgbench.XXXXXX)"
chmod 755 "$TMP"   # pgbouncer runs as postgres
STORE_DIR="$TMP"
[ -d /dev/shm ] && STORE_DIR="$(mktemp -d /dev/shm/fencepost-pgbench.XXXXXX)"
PIDS=()
DB_CREATED=0
PRIVATE_DATA=""
RUN_AS=()
cleanup() {
    local rc=$?
    set +e
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    if [ -n "$PRIVATE_DATA" ]; then
        "${RUN_AS[@]}" "$PGBIN/pg_ctl" -D "$PRIVATE_DATA" -m fast -w stop >/dev/null 2>&1
        DB_CREATED=0
    fi
    if [ "$DB_CREATED" = 1 ]; then
        timeout 30 dropdb -h "$PGHOST_" -p "$PGPORT_" -U "$PGUSER_" --if-exists --force "$DB" \
            || echo "could not drop database $DB" >&2
    fi
    [ "$STORE_DIR" != "$TMP" ] && rm -rf "$STORE_DIR"
    if [ "$KEEP_TMP" = 1 ] || [ "$rc" != 0 ]; then
        echo "temporary files (configs, logs) kept in $TMP" >&2
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM


wait_pg() { # port, what, pid, db: up to 10 s for a query to answer
    local port="$1" what="$2" pid="$3" db="$4"
    for _ in $(seq 100); do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "$what exited during start-up; its log:" >&2
            cat "$TMP/$what.log" >&2 2>/dev/null
            exit 1
        fi
        if PGCONNECT_TIMEOUT=1 psql -X -h 127.0.0.1 -p "$port" -U "$PGUSER_" -d "$db" -tAc 'SELECT 1' >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    echo "$what did not answer on port $port within 10 s" >&2
    exit 1
}

if [ "$PRIVATE" = 1 ]; then
    PGBIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
    [ -x "$PGBIN/initdb" ] || { echo "--private-server needs the Postgres server binaries (package postgresql)" >&2; exit 1; }
    PRIVATE_DATA="$TMP/pgdata"
    mkdir -p "$PRIVATE_DATA"
    # initdb refuses to run as root.
    if [ "$(id -u)" = 0 ]; then chown postgres "$PRIVATE_DATA"; RUN_AS=(runuser -u postgres --); fi
    "${RUN_AS[@]}" "$PGBIN/initdb" -D "$PRIVATE_DATA" -U "$PGUSER_" -A trust >"$TMP/initdb.log" 2>&1 \
        || { cat "$TMP/initdb.log" >&2; exit 1; }
    PGPORT_="$(free_port)"
    log "starting a private Postgres ($PGBIN) on $PGHOST_:$PGPORT_, max_connections=300${FSYNC:+, fsync=$FSYNC}"
    "${RUN_AS[@]}" "$PGBIN/pg_ctl" -D "$PRIVATE_DATA" -l "$PRIVATE_DATA/postgres.log" -w -t 60 \
        -o "-p $PGPORT_ -c listen_addresses=$PGHOST_ -c max_connections=300 -c unix_socket_directories=$PRIVATE_DATA${FSYNC:+ -c fsync=$FSYNC}" \
        start >/dev/null || { cat "$PRIVATE_DATA/postgres.log" >&2; exit 1; }
fi
pg -d postgres -tAc 'SELECT 1' >/dev/null || { echo "no Postgres at $PGHOST_:$PGPORT_ (user $PGUSER_, trust)" >&2; exit 1; }

# ---------------------------------------------------------------- 2. database
log "creating database $DB and running pgbench -i -s $SCALE"
createdb -h "$PGHOST_" -p "$PGPORT_" -U "$PGUSER_" "$DB"
DB_CREATED=1
timeout 600 pgbench -h "$PGHOST_" -p "$PGPORT_" -U "$PGUSER_" -i -s "$SCALE" -q "$DB" >"$TMP/pgbench-init.log" 2>&1 \
    || { cat "$TMP/pgbench-init.log" >&2; exit 1; }
"$FENCEPOST" migrate --guard "postgres://$PGUSER_@$PGHOST_:$PGPORT_/$DB" >"$TMP/migrate.log" 2>&1 \
    || { cat "$TMP/migrate.log" >&2; exit 1; }
if [ "$GX" = 1 ] && ! grep -q "fencepost_guard extension is installed" "$TMP/migrate.log"; then
    echo "--guard-extension: the server has no fencepost_guard extension (make -C deploy/fencepost_guard install):" >&2
    cat "$TMP/migrate.log" >&2; exit 1
fi

MAX_CONN="$(pg -d postgres -tAc 'SHOW max_connections')"
RESERVED="$(pg -d postgres -tAc 'SHOW superuser_reserved_connections')"

# ---------------------------------------------------------------- 3. servers
PGB_PORT="$(free_port)"
FPP_PORT="$(free_port)"
FPG_PORT="$(free_port)"
FPI_PORT="$(free_port)"
FPT_PORT="$(free_port)"
FPX_PORT="$(free_port)"
RLY_PORT="$(free_port)"
# distinct ports (free_port can, rarely, hand out the same one twice)
[ "$(printf '%s\n' "$PGB_PORT" "$FPP_PORT" "$FPG_PORT" "$FPI_PORT" "$RLY_PORT" | sort -u | wc -l)" = 5 ] \
    || { echo "port collision, run again" >&2; exit 1; }

# PgBouncer: session pooling for the benchmark; a transaction-pooled alias
# (${DB}_tx) only as the upstream of fencepost's idle-connection listener, so
# 1,000 idle clients do not need 1,000 Postgres backends.
PGB="$TMP/pgbouncer"
mkdir -p "$PGB"
# Session pooling: one server connection per client for the whole run, so
# the pool must hold the largest client count measured.
POOL_SIZE="$CLIENTS"
for c in "${SWEEP_CLIENTS[@]}"; do [ "$c" -gt "$POOL_SIZE" ] && POOL_SIZE="$c"; done
printf '"%s" ""\n' "$PGUSER_" >"$PGB/userlist.txt"
cat >"$PGB/pgbouncer.ini" <<EOF
[databases]
$DB = host=$PGHOST_ port=$PGPORT_ dbname=$DB
${DB}_tx = host=$PGHOST_ port=$PGPORT_ dbname=$DB pool_mode=transaction pool_size=4

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
unix_socket_dir =
auth_type = trust
auth_file = $PGB/userlist.txt
pool_mode = session
default_pool_size = $POOL_SIZE
max_client_conn = $((IDLE_CONNS + 500))
server_idle_timeout = 5
ignore_startup_parameters = options,extra_float_digits
logfile = $PGB/pgbouncer.log
pidfile = $PGB/pgbouncer.pid
log_connections = 0
log_disconnections = 0
EOF
chown -R postgres "$PGB" 2>/dev/null || true

# fencepost: one process, three [[postgres]] listeners; SQLite store (in
# /dev/shm when there is one), logs at info, no admin, no elector.
FP="$TMP/fencepost"
mkdir -p "$FP"
cat >"$FP/fencepost.toml" <<EOF
store = "sqlite://$STORE_DIR/fencepost.db"

[log]
level = "info"

[[postgres]]
listen = "127.0.0.1:$FPP_PORT"
upstream = "$PGHOST_:$PGPORT_"
enforce = "proxy"

[[postgres]]
listen = "127.0.0.1:$FPG_PORT"
upstream = "$PGHOST_:$PGPORT_"
enforce = "database"

[[postgres]]
listen = "127.0.0.1:$FPI_PORT"
upstream = "127.0.0.1:$PGB_PORT"
enforce = "proxy"
EOF
if [ "$GX" = 1 ]; then
    cat >>"$FP/fencepost.toml" <<EOF

[[postgres]]
listen = "127.0.0.1:$FPX_PORT"
upstream = "$PGHOST_:$PGPORT_"
enforce = "database"
guard_extension = true
EOF
fi
if [ -n "$VT" ]; then
    cat >>"$FP/fencepost.toml" <<EOF

[[postgres]]
listen = "127.0.0.1:$FPT_PORT"
upstream = "$PGHOST_:$PGPORT_"
enforce = "proxy"
$VARIANT
EOF
fi

ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"

log "starting pgbouncer on 127.0.0.1:$PGB_PORT (session pooling)"
"$PGBOUNCER" -u postgres "$PGB/pgbouncer.ini" >"$TMP/pgbouncer.log" 2>&1 &
PGB_PID=$!; PIDS+=("$PGB_PID")
wait_pg "$PGB_PORT" pgbouncer "$PGB_PID" "$DB"

log "starting the relay (socat) on 127.0.0.1:$RLY_PORT"
socat "TCP-LISTEN:$RLY_PORT,bind=127.0.0.1,reuseaddr,fork,nodelay" "TCP:$PGHOST_:$PGPORT_,nodelay" \
    >"$TMP/socat.log" 2>&1 &
RLY_PID=$!; PIDS+=("$RLY_PID")
wait_pg "$RLY_PORT" socat "$RLY_PID" "$DB"

log "starting fencepost: proxy mode on $FPP_PORT, guard mode on $FPG_PORT, idle-test listener on $FPI_PORT"
env -u RUST_LOG "$FENCEPOST" serve --config "$FP/fencepost.toml" >"$TMP/fencepost.log" 2>&1 &
FP_PID=$!; PIDS+=("$FP_PID")
wait_pg "$FPP_PORT" fencepost "$FP_PID" "$DB"
wait_pg "$FPG_PORT" fencepost "$FP_PID" "$DB"

declare -A PORT=([direct]="$PGPORT_" [relay]="$RLY_PORT" [pgbouncer]="$PGB_PORT" [fp-proxy]="$FPP_PORT" [fp-guard]="$FPG_PORT")
TARGETS=()
for t in direct relay pgbouncer fp-proxy fp-guard; do
    holds "$PICKED" "$t" && TARGETS+=("$t")
done
if [ -n "$VT" ]; then PORT[$VT]="$FPT_PORT"; TARGETS+=("$VT"); fi
if [ "$GX" = 1 ]; then PORT[fp-guard-c]="$FPX_PORT"; TARGETS+=(fp-guard-c); fi
export PGOPTIONS='-c fencing.token=1 -c fencing.resource=bench'

# Sanity: every target runs a write with the token; fencepost refuses a
# write without one (ZF002) and a stale one (ZF001), in both modes.
for t in "${TARGETS[@]}"; do
    pg -p "${PORT[$t]}" -d "$DB" -c 'UPDATE pgbench_branches SET bbalance = bbalance WHERE bid = 1' >/dev/null \
        || { echo "sanity check failed: a tokened write through $t" >&2; exit 1; }
done
GUARDED=()
for t in fp-proxy fp-guard fp-guard-c; do
    holds "${TARGETS[*]}" "$t" && GUARDED+=("$t")
done
for t in "${GUARDED[@]}"; do
    out="$(PGOPTIONS='' psql -X -h 127.0.0.1 -p "${PORT[$t]}" -U "$PGUSER_" -d "$DB" -v VERBOSITY=verbose \
        -c 'UPDATE pgbench_branches SET bbalance = bbalance WHERE bid = 1' 2>&1 || true)"
    grep -q ZF002 <<<"$out" || { echo "sanity check failed: $t did not refuse a write without a token: $out" >&2; exit 1; }
    out="$(PGOPTIONS='-c fencing.token=0 -c fencing.resource=bench' psql -X -h 127.0.0.1 -p "${PORT[$t]}" \
        -U "$PGUSER_" -d "$DB" -v VERBOSITY=verbose \
        -c 'UPDATE pgbench_branches SET bbalance = bbalance WHERE bid = 1' 2>&1 || true)"
    grep -q ZF001 <<<"$out" || { echo "sanity check failed: $t did not refuse a stale token: $out" >&2; exit 1; }
done
pg -d "$DB" -c 'VACUUM ANALYZE' >/dev/null

sleep 1
FP_RSS_IDLE="$(rss_kb "$FP_PID")"
log "idle RSS: fencepost ${FP_RSS_IDLE} kB"

# Idle client connections, before any load (so the allocator has no freed
# memory from the load to hand back): real ones (startup, auth, one
# SELECT 1), through the listener whose upstream is PgBouncer's
# transaction pool.
FP_RSS_BEFORE_CONNS="$(rss_kb "$FP_PID")"
PGB_RSS_BEFORE_CONNS="$(rss_kb "$PGB_PID")"
log "opening $IDLE_CONNS idle connections through fencepost"
READY="$TMP/hold.ready"
python3 "$HELPER" hold --dsn "host=127.0.0.1 port=$FPI_PORT user=$PGUSER_ dbname=${DB}_tx" \
    --count "$IDLE_CONNS" --ready "$READY" --seconds 300 >"$TMP/hold.log" 2>&1 &
HOLD_PID=$!; PIDS+=("$HOLD_PID")
for _ in $(seq 1200); do
    [ -s "$READY" ] && break
    kill -0 "$HOLD_PID" 2>/dev/null || { echo "the idle-connection client failed:" >&2; cat "$TMP/hold.log" >&2; exit 1; }
    sleep 0.1
done
[ -s "$READY" ] || { echo "$IDLE_CONNS connections not open within 120 s" >&2; exit 1; }
sleep 2
FP_RSS_CONNS="$(rss_kb "$FP_PID")"
PGB_RSS_CONNS="$(rss_kb "$PGB_PID")"
log "with $IDLE_CONNS idle connections: fencepost ${FP_RSS_CONNS} kB (before: ${FP_RSS_BEFORE_CONNS} kB)"
kill -TERM "$HOLD_PID" 2>/dev/null; wait "$HOLD_PID" 2>/dev/null || true
PIDS=("$PGB_PID" "$RLY_PID" "$FP_PID")   # the servers only, again
sleep 2
FP_RSS_AFTER_CONNS="$(rss_kb "$FP_PID")"

# ---------------------------------------------------------------- 4. load
mkdir -p "$RESULTS"
RAW="$RESULTS/pg_overhead_pgbench.txt"
MANIFEST="$TMP/manifest.tsv"
: >"$RAW"
printf 'phase\tworkload\ttarget\tclients\tround\tout\tlogdir\trss_after_kb\n' >"$MANIFEST"

# What pgbench does before a run unless -n, sent to the server itself (not
# through the target, so no target's run includes it), and a CHECKPOINT:
# every run starts from the same tables and clean buffers.
reset_db() {
    pg -d "$DB" -q -c 'VACUUM pgbench_branches, pgbench_tellers' -c 'TRUNCATE pgbench_history' \
        -c 'CHECKPOINT' >/dev/null || { echo "could not reset the bench database before a run" >&2; exit 1; }
}
# The targets of round R (see the top of the file).
order() { if [ "$FIXED_ORDER" = 1 ]; then printf '%s\n' "${TARGETS[@]}"; else round_order "$1" "${TARGETS[@]}"; fi; }

RUN=0
run_pgbench() { # phase script mode target clients round duration
    local phase="$1" script="$2" mode="$3" target="$4" clients="$5" round="$6" dur="$7"
    local jobs=2; [ "$clients" -lt 2 ] && jobs=1
    local args=(-n -M "$mode" -c "$clients" -j "$jobs" -T "$dur")
    [ "$script" = select ] || [ "$script" = select1 ] && args+=(-S)
    RUN=$((RUN + 1))
    [ "$phase" != warmup ] && [ "$RESET" = 1 ] && reset_db
    local dir="$TMP/run-$RUN"
    mkdir -p "$dir"
    local cmd=(pgbench -h 127.0.0.1 -p "${PORT[$target]}" -U "$PGUSER_" "${args[@]}")
    [ "$phase" != warmup ] && cmd+=(--log --log-prefix="$dir/pgbench_log")
    if ! timeout --kill-after=5 $((dur + 60)) "${cmd[@]}" "$DB" >"$dir/out.txt" 2>&1; then
        echo "pgbench failed for $target $script -M $mode -c $clients:" >&2; tail -20 "$dir/out.txt" >&2; exit 1
    fi
    for pid in "${PIDS[@]}"; do
        kill -0 "$pid" 2>/dev/null || { echo "a server died during the $target run; see $TMP" >&2; exit 1; }
    done
    [ "$phase" = warmup ] && return 0
    local rss=""
    [[ "$target" == fp-* ]] && rss="$(rss_kb "$FP_PID")"
    local workload="$script -M $mode"
    [ "$script" = select1 ] && workload="select -c1 -M $mode"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$phase" "$workload" "$target" "$clients" "$round" \
        "$dir/out.txt" "$dir" "$rss" >>"$MANIFEST"
    {
        echo "=== $phase $workload target=$target clients=$clients round=$round"
        echo "\$ PGOPTIONS='$PGOPTIONS' ${cmd[*]} $DB"
        grep -v '^pgbench: ' "$dir/out.txt" || true
        echo
    } >>"$RAW"
    printf '[bench %(%H:%M:%S)T] %-6s %-22s %-9s c=%-3s r%s: %s\n' -1 "$phase" "$workload" "$target" \
        "$clients" "$round" "$(awk '/^tps = / {print $3 " tps"}' "$dir/out.txt")" >&2
}

# Sweep levels this server can hold: PgBouncer keeps its session pool's
# server connections open for a few seconds after a run, so allow 2x.
IN_USE="$(pg -d postgres -tAc "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'")"
AVAILABLE=$((MAX_CONN - RESERVED - IN_USE - 8))
SWEEP=(); SKIPPED=()
[ "$NO_SWEEP" = 1 ] && SWEEP_CLIENTS=()
for c in "${SWEEP_CLIENTS[@]}"; do
    if [ $((2 * c)) -le "$AVAILABLE" ]; then SWEEP+=("$c"); else SKIPPED+=("$c"); fi
done
[ "$CLIENTS" -le "$((AVAILABLE / 2))" ] || { echo "-c $CLIENTS needs more than max_connections=$MAX_CONN allows" >&2; exit 1; }
[ "${#SKIPPED[@]}" -gt 0 ] && log "warning: max_connections=$MAX_CONN: skipping sweep level(s) ${SKIPPED[*]} clients"

LOAD_START="$(cut -d' ' -f1 /proc/loadavg)"
if awk -v l="$LOAD_START" -v n="$(nproc)" 'BEGIN { exit !(l > n / 2) }'; then
    log "warning: load average is $LOAD_START before the load starts; other work on this machine will skew the numbers"
fi
NW=$(( $(wc -w <<<"$WORKLOADS") * 3 ))
NT=${#TARGETS[@]}
total=$(( NW * ROUNDS * NT * (DURATION + 1) + ${#SWEEP[@]} * SWEEP_ROUNDS * NT * (DURATION + 1) + NT * 3 ))
log "measuring: ~$((total / 60 + 1)) min ($ROUNDS rounds x ${DURATION}s, $NW workloads, $NT targets; sweep ${SWEEP[*]:-none})"

for t in "${TARGETS[@]}"; do run_pgbench warmup select prepared "$t" "$CLIENTS" 0 2; done
for script in $WORKLOADS; do
    for mode in simple extended prepared; do
        c="$CLIENTS"; [ "$script" = select1 ] && c=1
        for r in $(seq "$ROUNDS"); do
            for t in $(order "$r"); do run_pgbench main "$script" "$mode" "$t" "$c" "$r" "$DURATION"; done
        done
    done
done
FP_RSS_AFTER_MAIN="$(rss_kb "$FP_PID")"

for c in "${SWEEP[@]}"; do
    for r in $(seq "$SWEEP_ROUNDS"); do
        for t in $(order "$r"); do run_pgbench sweep select prepared "$t" "$c" "$r" "$DURATION"; done
    done
done
FP_RSS_AFTER_SWEEP="$(rss_kb "$FP_PID")"
LOAD_END="$(cut -d' ' -f1-3 /proc/loadavg)"

# ---------------------------------------------------------------- 5. memory
log "writing to $RESOURCES distinct resources through fencepost (proxy mode, one connection each)"
sleep 2
FP_RSS_BEFORE_RES="$(rss_kb "$FP_PID")"
timeout 600 python3 "$HELPER" resources --dsn "host=127.0.0.1 port=$FPP_PORT user=$PGUSER_ dbname=$DB" \
    --count "$RESOURCES" --threads 4 >"$TMP/resources.log" 2>&1 \
    || { echo "resource writes failed:" >&2; cat "$TMP/resources.log" >&2; exit 1; }
sleep 2
FP_RSS_RES="$(rss_kb "$FP_PID")"
FP_HWM="$(hwm_kb "$FP_PID")"
log "with $RESOURCES more tracked resources: fencepost ${FP_RSS_RES} kB (before: ${FP_RSS_BEFORE_RES} kB)"

FP_LOG_LINES="$(wc -l <"$TMP/fencepost.log")"

# ---------------------------------------------------------------- 6. report
python3 "$HELPER" report \
    --manifest "$MANIFEST" \
    --out "$RESULTS" \
    --meta "rounds=$ROUNDS" "duration_s=$DURATION" "sweep_rounds=$SWEEP_ROUNDS" "clients=$CLIENTS" \
           "scale=$SCALE" "private_server=$PRIVATE" "fsync=${FSYNC:-server default}" "cpus=$(nproc)" "kernel=$(uname -r)" "max_connections=$MAX_CONN" \
           "postgres=$(pg -d postgres -tAc 'SHOW server_version' | awk '{print $1}')" \
           "pgbouncer=$("$PGBOUNCER" --version 2>&1 | head -1 | awk '{print $2}')" \
           "pgbench=$(pgbench --version | awk '{print $3}')" \
           "fencepost_commit=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
           "fencepost_log_lines=$FP_LOG_LINES" "loadavg_start=$LOAD_START" "loadavg_end=$LOAD_END" \
           "idle_conns=$IDLE_CONNS" "resources=$RESOURCES" "sweep_skipped=${SKIPPED[*]:-}" \
    --memory "fencepost_idle_kb=$FP_RSS_IDLE" "fencepost_after_main_kb=$FP_RSS_AFTER_MAIN" \
             "fencepost_after_sweep_kb=$FP_RSS_AFTER_SWEEP" \
             "fencepost_before_conns_kb=$FP_RSS_BEFORE_CONNS" "fencepost_idle_conns_kb=$FP_RSS_CONNS" \
             "fencepost_after_conns_closed_kb=$FP_RSS_AFTER_CONNS" \
             "fencepost_before_resources_kb=$FP_RSS_BEFORE_RES" "fencepost_resources_kb=$FP_RSS_RES" \
             "fencepost_peak_kb=$FP_HWM" \
             "pgbouncer_before_conns_kb=$PGB_RSS_BEFORE_CONNS" "pgbouncer_idle_conns_kb=$PGB_RSS_CONNS"
