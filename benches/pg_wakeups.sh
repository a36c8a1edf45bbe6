#!/usr/bin/env bash
# What a Postgres statement costs a proxy besides instructions, counted (not
# timed, so a shared machine does not blur it): system calls and wake-ups per
# statement at one client, fencepost (proxy mode) against PgBouncer (session
# pooling).
#
#   bash benches/pg_wakeups.sh [--statements N] [--modes "simple extended prepared"]
#                              [--workers "default 0 1"] [--no-strace] [--keep-tmp]
#
# For each -M mode and target, one pgbench client runs the select-only script
# (-S) for N transactions (one statement each) twice:
# 1. natively, reading every thread's voluntary and involuntary context
#    switches (/proc/PID/task/*/status) before and after: wake-ups per
#    statement, per thread: "slept" counts voluntary switches (the thread
#    waited, and was woken after), "preempted" involuntary ones;
# 2. under `strace -c -f -p PID`: system calls per statement by name, and how
#    many of them failed (a read that returns EAGAIN found nothing).
# Connecting is outside both windows (a warm-up run first; pgbench's one
# connection costs a few calls over N statements).
# --workers lists the fencepost variants: `default` (the config's default),
# or a number for `[[postgres]] workers`.
#
# Needs the machine's Postgres at 127.0.0.1:5432 (user postgres, trust),
# pgbench, pgbouncer and strace. Creates a database fencepost_wakeups_<pid>
# (pgbench -i -s 1), dropped on exit. FENCEPOST_BIN=path measures another
# build (default target/release/fencepost; build it first).
set -euo pipefail
STATEMENTS=10000
MODES="simple extended prepared"
WORKERS="default 0"
STRACE=1
KEEP_TMP=0
while [ $# -gt 0 ]; do
    case "$1" in
        --statements) STATEMENTS="$2"; shift 2 ;;
        --modes) MODES="$2"; shift 2 ;;
        --workers) WORKERS="$2"; shift 2 ;;
        --no-strace) STRACE=0; shift ;;
        --keep-tmp) KEEP_TMP=1; shift ;;
        -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ "$STATEMENTS" =~ ^[1-9][0-9]*$ ]] || { echo "--statements: a positive integer" >&2; exit 2; }
for m in $MODES; do
    case "$m" in simple|extended|prepared) ;; *) echo "--modes: simple, extended, prepared" >&2; exit 2 ;; esac
done
for w in $WORKERS; do
    [ "$w" = default ] || [[ "$w" =~ ^[0-9]+$ ]] || { echo "--workers: default or numbers" >&2; exit 2; }
done

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
. "$HERE/lib.sh"
FENCEPOST="${FENCEPOST_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/fencepost}"
[ -x "$FENCEPOST" ] || { echo "no fencepost binary at $FENCEPOST" >&2; exit 1; }
PGBOUNCER="$(command -v pgbouncer || echo /usr/sbin/pgbouncer)"
TOOLS=(pgbench psql createdb dropdb python3 "$PGBOUNCER")
[ "$STRACE" = 1 ] && TOOLS+=(strace)
for t in "${TOOLS[@]}"; do
    command -v "$t" >/dev/null || { echo "missing tool: $t" >&2; exit 1; }
done
log() { printf '[wakeups %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

DB="fencepost_wakeups_$$"
TMP="$(mktemp -d /tmp/fencepost-wakeups.XXXXXX)"
chmod 755 "$TMP"   # pgbouncer runs as postgres
PIDS=()
DB_CREATED=0
cleanup() {
    local rc=$?
    set +e
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    [ "$DB_CREATED" = 1 ] && dropdb -h 127.0.0.1 -U postgres --if-exists --force "$DB"
    if [ "$KEEP_TMP" = 1 ] || [ "$rc" != 0 ]; then
        echo "temporary files kept in $TMP" >&2
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_pg() { # port, pid
    for _ in $(seq 100); do
        kill -0 "$2" 2>/dev/null || { echo "a server exited during start-up (logs in $TMP)" >&2; exit 1; }
        PGCONNECT_TIMEOUT=1 psql -X -h 127.0.0.1 -p "$1" -U postgres -d "$DB" -tAc 'SELECT 1' >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "nothing answered on port $1 within 10 s (logs in $TMP)" >&2
    exit 1
}

log "creating database $DB (pgbench -i -s 1)"
createdb -h 127.0.0.1 -U postgres "$DB"
DB_CREATED=1
pgbench -h 127.0.0.1 -U postgres -i -s 1 -q "$DB" >"$TMP/pgbench-init.log" 2>&1

PGB_PORT="$(free_port)"
pgbouncer_session_ini "$TMP/pgbouncer.ini" "$DB" "$PGB_PORT" "logfile = $TMP/pgbouncer.log"
chown -R postgres "$TMP" 2>/dev/null || true
"$PGBOUNCER" -u postgres "$TMP/pgbouncer.ini" >"$TMP/pgbouncer.out" 2>&1 &
PIDS+=($!)
wait_pg "$PGB_PORT" "$!"
TARGETS=("pgbouncer:$PGB_PORT:$!")

for w in $WORKERS; do
    port="$(free_port)"
    line=""
    [ "$w" = default ] || line="workers = $w"
    cat >"$TMP/fencepost-$w.toml" <<EOF
store = "sqlite://$TMP/fencepost-$w.db"
[log]
level = "warn"
[[postgres]]
listen = "127.0.0.1:$port"
upstream = "127.0.0.1:5432"
enforce = "proxy"
$line
EOF
    env -u RUST_LOG -u FENCEPOST_POSTGRES_WORKERS "$FENCEPOST" serve --config "$TMP/fencepost-$w.toml" \
        >"$TMP/fencepost-$w.log" 2>&1 &
    PIDS+=($!)
    wait_pg "$port" "$!"
    TARGETS+=("fencepost(workers=$w):$port:$!")
done

export PGOPTIONS='-c fencing.token=1 -c fencing.resource=bench'
bench() { # port, mode, transactions
    pgbench -h 127.0.0.1 -p "$1" -U postgres -S -M "$2" -c 1 -t "$3" "$DB" >/dev/null 2>&1
}
switches() { # pid: "tid name voluntary involuntary" per thread
    local t
    for t in /proc/"$1"/task/*; do
        printf '%s %s %s\n' "${t##*/}" "$(tr ' ' _ <"$t/comm")" \
            "$(awk '/^voluntary_ctxt/ {v=$2} /^nonvoluntary_ctxt/ {n=$2} END {print v, n}' "$t/status")"
    done | sort
}

log "fencepost: $FENCEPOST; $STATEMENTS statements per run; load: $(cut -d' ' -f1-3 /proc/loadavg)"
for mode in $MODES; do
    for target in "${TARGETS[@]}"; do
        IFS=: read -r name port pid <<<"$target"
        bench "$port" "$mode" 500
        echo "== -M $mode, $name"
        switches "$pid" >"$TMP/before"
        bench "$port" "$mode" "$STATEMENTS"
        switches "$pid" >"$TMP/after"
        join "$TMP/before" "$TMP/after" | awk -v n="$STATEMENTS" '
            { v = $6 - $3; i = $7 - $4; tv += v; ti += i
              if (v + i > 0) printf "   thread %-8s %-18s slept %.3f, preempted %.3f per statement\n", $1, $2, v / n, i / n }
            END { printf "   all threads           slept %.3f, preempted %.3f per statement\n", tv / n, ti / n }'
        if [ "$STRACE" = 1 ]; then
            strace -c -f -p "$pid" -o "$TMP/strace" 2>/dev/null &
            sp=$!
            sleep 0.5
            bench "$port" "$mode" "$STATEMENTS"
            kill -INT "$sp"
            wait "$sp" 2>/dev/null || true
            # strace -c columns: % time, seconds, usecs/call, calls, [errors,] syscall
            awk -v n="$STATEMENTS" '
                /^ *[0-9]/ && $NF != "total" {
                    e = (NF == 6) ? $5 : 0
                    if ($4 / n >= 0.01) printf "   %-16s %6.2f per statement, %6.2f failed\n", $NF, $4 / n, e / n }' \
                "$TMP/strace"
        fi
    done
done
