#!/usr/bin/env bash
# CPU a proxy spends per transaction, user and system apart, PgBouncer
# against fencepost, in figures a noisy machine blurs less than TPS:
#
#   bash benches/pg_cpu.sh [--transactions N] [--clients C] [--rounds R]
#                          [--modes "simple extended prepared"] [--workload tpcb|select]
#                          [--variant 'TOML line'] [--skip-build] [--keep-tmp]
#
# For each -M mode and round, pgbench runs a fixed number of transactions
# (-t N per client, C clients, -j 2) through PgBouncer (session pooling),
# through fencepost proxy mode (its default epoll engine), through the same
# proxy with engine = "tokio" (fp-tokio, a second process; --variant puts
# another line in that listener's config instead, e.g. 'workers = 1', and
# names the target fp-variant) and through a plain TCP relay (socat, as in
# pg_overhead.sh), in an order rotated each round; around each run the
# proxy's CPU time (utime and stime of /proc/PID/stat, all threads; for
# socat, which forks a process per connection, its reaped children's too)
# and its voluntary and involuntary context switches (every thread's
# /proc/PID/task/*/status) are read, and so are pgbench's own CPU time and
# the whole machine's busy time (/proc/stat). Reported per transaction
# (CPU, us) and per statement (switches), with the TPS of the same run
# beside them. Every connection is plain text (PGSSLMODE=disable, from
# lib.sh): through the relay libpq would otherwise negotiate TLS with a
# server that has ssl on, and pay for it in pgbench and the backends. Before
# each run the tables are reset on the server as pgbench would without -n
# (VACUUM pgbench_branches, pgbench_tellers; TRUNCATE pgbench_history) and
# a CHECKPOINT is taken.
#
# Why: on this 2-CPU machine pgbench, the proxy and the backends share
# the CPUs, and the TPC-B-like runs leave them 85-93 % busy, so a proxy's
# CPU per transaction comes out of everyone's throughput; a TPS ratio
# smears it with every other process's noise (the machine's speed itself
# varies by up to 1.7x from minute to minute). This says how much. The
# machine column (all processes, kernel included, per transaction) shows
# what a target costs the others: pgbench's and the backends' share.
#
# Needs the machine's Postgres at 127.0.0.1:5432 (user postgres, trust),
# pgbench, pgbouncer and socat. Creates a database fencepost_cpu_<pid> (pgbench -i
# -s 10), dropped on exit. FENCEPOST_BIN=path measures another build.
# Writes benches/results/pg_cpu.csv and prints medians per target and mode.
set -euo pipefail

TRANSACTIONS=3000
CLIENTS=8
ROUNDS=3
MODES="simple extended prepared"
WORKLOAD=tpcb
BUILD=1
KEEP_TMP=0
VARIANT='engine = "tokio"'
VT=fp-tokio
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
. "$HERE/lib.sh"

while [ $# -gt 0 ]; do
    case "$1" in
        --transactions) TRANSACTIONS="$2"; shift 2 ;;
        --clients) CLIENTS="$2"; shift 2 ;;
        --rounds) ROUNDS="$2"; shift 2 ;;
        --modes) MODES="$2"; shift 2 ;;
        --workload) WORKLOAD="$2"; shift 2 ;;
        --variant) VARIANT="$2"; VT=fp-variant; shift 2 ;;
        --skip-build) BUILD=0; shift ;;
        --keep-tmp) KEEP_TMP=1; shift ;;
        -h|--help) usage_from_header "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
for v in "$TRANSACTIONS" "$CLIENTS" "$ROUNDS"; do
    [[ "$v" =~ ^[1-9][0-9]*$ ]] || { echo "numeric arguments must be positive integers" >&2; exit 2; }
done
[ "$ROUNDS" -le 50 ] && [ "$CLIENTS" -le 64 ] || { echo "at most 50 rounds and 64 clients" >&2; exit 2; }
case "$WORKLOAD" in
    tpcb) STMTS=7 ;;   # BEGIN, 3 UPDATEs, SELECT, INSERT, END
    select) STMTS=1 ;;
    *) echo "--workload: tpcb or select" >&2; exit 2 ;;
esac
for m in $MODES; do
    case "$m" in simple|extended|prepared) ;; *) echo "--modes: simple, extended, prepared" >&2; exit 2 ;; esac
done

log() { printf '[cpu %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
PGBOUNCER="$(command -v pgbouncer || echo /usr/sbin/pgbouncer)"
[ -x "$PGBOUNCER" ] || { echo "needs pgbouncer" >&2; exit 1; }
command -v pgbench >/dev/null || { echo "needs pgbench" >&2; exit 1; }
command -v socat >/dev/null || { echo "needs socat" >&2; exit 1; }
if [ -n "${FENCEPOST_BIN:-}" ]; then
    FENCEPOST="$FENCEPOST_BIN"
else
    [ "$BUILD" = 1 ] && build_fencepost
    FENCEPOST="$ROOT/target/release/fencepost"
fi
[ -x "$FENCEPOST" ] || { echo "no fencepost binary at $FENCEPOST (build it, or drop --skip-build)" >&2; exit 1; }

DB="fencepost_cpu_$$"
TMP="$(mktemp -d /tmp/fencepost-cpu.XXXXXX)"
chmod 755 "$TMP"   # PgBouncer runs as postgres and reads its files here
PIDS=()
pg() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p 5432 -U postgres "$@"; }
cleanup() {
    local rc=$? pid
    set +e
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
    timeout 30 dropdb -h 127.0.0.1 -p 5432 -U postgres --if-exists --force "$DB"
    if [ "$KEEP_TMP" = 1 ] || [ "$rc" != 0 ]; then echo "kept $TMP" >&2; else rm -rf "$TMP"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "creating $DB (pgbench -i -s 10)"
createdb -h 127.0.0.1 -p 5432 -U postgres "$DB"
pgbench -h 127.0.0.1 -p 5432 -U postgres -i -s 10 -q "$DB" >"$TMP/init.log" 2>&1 || { cat "$TMP/init.log" >&2; exit 1; }

PGB_PORT="$(port)"; FP_PORT="$(port)"; RLY_PORT="$(port)"; FPT_PORT="$(port)"
pgbouncer_session_ini "$TMP/pgbouncer.ini" "$DB" "$PGB_PORT" "default_pool_size = $((CLIENTS + 4))"
cat >"$TMP/fencepost.toml" <<EOF
store = "sqlite://$TMP/fencepost.db"
[[postgres]]
listen = "127.0.0.1:$FP_PORT"
upstream = "127.0.0.1:5432"
enforce = "proxy"
EOF
# The same proxy with each session a tokio task (engine = "tokio", or the
# --variant line), in a process of its own so that each one's CPU is its
# own.
sed -e "s/:$FP_PORT\"/:$FPT_PORT\"/" -e 's/fencepost.db/fencepost-tokio.db/' "$TMP/fencepost.toml" >"$TMP/fencepost-tokio.toml"
echo "$VARIANT" >>"$TMP/fencepost-tokio.toml"
"$PGBOUNCER" -u postgres "$TMP/pgbouncer.ini" >"$TMP/pgbouncer.out" 2>&1 &
PGB_PID=$!; PIDS+=("$PGB_PID")
env -u RUST_LOG "$FENCEPOST" serve --config "$TMP/fencepost.toml" >"$TMP/fencepost.log" 2>&1 &
FP_PID=$!; PIDS+=("$FP_PID")
env -u RUST_LOG "$FENCEPOST" serve --config "$TMP/fencepost-tokio.toml" >"$TMP/fencepost-tokio.log" 2>&1 &
FPT_PID=$!; PIDS+=("$FPT_PID")
socat "TCP-LISTEN:$RLY_PORT,bind=127.0.0.1,reuseaddr,fork,nodelay" "TCP:127.0.0.1:5432,nodelay" \
    >"$TMP/socat.log" 2>&1 &
RLY_PID=$!; PIDS+=("$RLY_PID")
export PGOPTIONS='-c fencing.token=1 -c fencing.resource=bench'
for p in "$PGB_PORT" "$FP_PORT" "$FPT_PORT" "$RLY_PORT"; do
    up=0
    for _ in $(seq 100); do
        PGCONNECT_TIMEOUT=1 psql -X -h 127.0.0.1 -p "$p" -U postgres -d "$DB" -tAc 'SELECT 1' >/dev/null 2>&1 && { up=1; break; }
        sleep 0.1
    done
    [ "$up" = 1 ] || { echo "nothing answers on port $p; logs in $TMP" >&2; exit 1; }
done

declare -A PORT=([pgbouncer]="$PGB_PORT" [fencepost]="$FP_PORT" [$VT]="$FPT_PORT" [relay]="$RLY_PORT")
declare -A PID=([pgbouncer]="$PGB_PID" [fencepost]="$FP_PID" [$VT]="$FPT_PID" [relay]="$RLY_PID")
TARGETS=(pgbouncer fencepost "$VT" relay)
TICK="$(getconf CLK_TCK)"
# utime and stime, with those of reaped children (socat's per connection).
ticks() { awk '{ print $14 + $16, $15 + $17 }' "/proc/$1/stat"; }
# The machine's busy and idle ticks, all CPUs (busy: user, nice, system,
# irq, softirq, steal; idle: idle, iowait).
machine() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6 }' /proc/stat; }
# This shell's reaped children's CPU (pgbench), in seconds, into
# CHILD_CPU: `times`' second line. Called directly, never in `$(...)`:
# `times` reports the shell it runs in, and a subshell has reaped nothing.
children_cpu() {
    times >"$TMP/times"
    CHILD_CPU="$(awk 'NR == 2 { n = split($0, f, " "); t = 0
        for (i = 1; i <= n; i++) { split(f[i], ms, "m"); sub("s", "", ms[2]); t += ms[1] * 60 + ms[2] }
        print t }' "$TMP/times")"
}
switches() {
    local v=0 n=0 t a b
    for t in /proc/"$1"/task/*; do
        read -r a b < <(awk '/^voluntary_ctxt/ { v = $2 } /^nonvoluntary_ctxt/ { n = $2 } END { print v, n }' "$t/status")
        v=$((v + a)); n=$((n + b))
    done
    echo "$v $n"
}
select_flag=(); [ "$WORKLOAD" = select ] && select_flag=(-S)
jobs=2; [ "$CLIENTS" -lt 2 ] && jobs=1
CSV="$HERE/results/pg_cpu.csv"
mkdir -p "$HERE/results"
echo "mode,target,round,tps,user_us_per_xact,sys_us_per_xact,vol_cs_per_stmt,invol_cs_per_stmt,pgbench_us_per_xact,machine_us_per_xact,idle_frac" >"$CSV"
for t in "${TARGETS[@]}"; do   # warm-up
    pgbench -h 127.0.0.1 -p "${PORT[$t]}" -U postgres -n "${select_flag[@]}" -c "$CLIENTS" -j "$jobs" -T 2 "$DB" >/dev/null 2>&1
done
log "$WORKLOAD, $CLIENTS clients x $TRANSACTIONS transactions, $ROUNDS rounds per mode"
for mode in $MODES; do
    for r in $(seq "$ROUNDS"); do
        for t in $(round_order "$r" "${TARGETS[@]}"); do
            pg -d "$DB" -c 'VACUUM pgbench_branches, pgbench_tellers' -c 'TRUNCATE pgbench_history' -c 'CHECKPOINT' >/dev/null
            pid="${PID[$t]}"
            read -r u0 s0 < <(ticks "$pid"); read -r v0 n0 < <(switches "$pid")
            read -r b0 i0 < <(machine); children_cpu; c0="$CHILD_CPU"
            out="$(pgbench -h 127.0.0.1 -p "${PORT[$t]}" -U postgres -n "${select_flag[@]}" -M "$mode" \
                -c "$CLIENTS" -j "$jobs" -t "$TRANSACTIONS" "$DB" 2>&1)" \
                || { echo "pgbench failed through $t: $out" >&2; exit 1; }
            children_cpu; c1="$CHILD_CPU"; read -r b1 i1 < <(machine)
            # socat's per-connection processes end with pgbench's
            # connections: give the parent a moment to reap them.
            [ "$t" = relay ] && sleep 0.5
            read -r u1 s1 < <(ticks "$pid"); read -r v1 n1 < <(switches "$pid")
            tps="$(awk '/^tps = / { print $3 }' <<<"$out")"
            row="$(awk -v x=$((CLIENTS * TRANSACTIONS)) -v st="$STMTS" -v hz="$TICK" \
                -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v v=$((v1 - v0)) -v n=$((n1 - n0)) \
                -v c="$c0" -v C="$c1" -v b=$((b1 - b0)) -v i=$((i1 - i0)) \
                'BEGIN { printf "%.1f,%.1f,%.3f,%.3f,%.1f,%.1f,%.3f", u / hz * 1e6 / x, s / hz * 1e6 / x,
                         v / (x * st), n / (x * st), (C - c) * 1e6 / x, b / hz * 1e6 / x, i / (b + i) }')"
            # socat's per-connection processes, gone by now, took their
            # switch counts with them: not counted (-1, printed as "-").
            [ "$t" = relay ] && row="$(awk -F, -v OFS=, '{ $3 = -1; $4 = -1; print }' <<<"$row")"
            echo "$mode,$t,$r,$tps,$row" >>"$CSV"
            log "$mode r$r $t: $tps tps; user,sys us/tx, vol,invol switches/stmt, pgbench,machine us/tx, idle: $row"
        done
    done
done

echo
printf '%-9s %-10s %9s %12s %12s %10s %10s %12s %12s %6s\n' mode target tps user_us/tx sys_us/tx vol_cs/st inv_cs/st \
    pgbench_us/tx machine_us/tx idle
for mode in $MODES; do
    for t in "${TARGETS[@]}"; do
        awk -F, -v m="$mode" -v t="$t" '
            $1 == m && $2 == t { n++; for (i = 4; i <= 11; i++) v[i, n] = $i }
            function med(i,   a, k, j, x) {
                for (k = 1; k <= n; k++) a[k] = v[i, k]
                for (k = 2; k <= n; k++) { x = a[k]; for (j = k - 1; j > 0 && a[j] > x; j--) a[j + 1] = a[j]; a[j + 1] = x }
                return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
            }
            function sw(x) { return x < 0 ? "-" : sprintf("%.3f", x) }
            END { printf "%-9s %-10s %9.0f %12.1f %12.1f %10s %10s %12.1f %12.1f %6.3f\n",
                  m, t, med(4), med(5), med(6), sw(med(7)), sw(med(8)), med(9), med(10), med(11) }' "$CSV"
    done
done
echo "(medians of $ROUNDS rounds; raw: $CSV)"
