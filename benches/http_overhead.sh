#!/usr/bin/env bash
# HTTP overhead of fencepost's [[http]] proxy, against a direct connection to
# the upstream and against a plain nginx reverse proxy in front of the same
# upstream, each proxy at 1 worker and at 2.
#
#   bash benches/http_overhead.sh [--rounds N] [--duration S]
#                                 [--sweep-rounds N] [--connections C]
#                                 [--requests N] [--no-callgrind] [--shared-runtime]
#                                 [--skip-install] [--skip-build] [--keep-tmp]
#                                 [--only-callgrind] [--sched-counters]
#                                 [--fixed-order] [--pin-latency CPU|A:B] [--latency-only]
#
# Targets (all on 127.0.0.1, on ports picked at start):
#   direct       wrk -> upstream nginx
#   nginx-1w     wrk -> nginx reverse proxy, 1 worker process (proxy_pass,
#                HTTP/1.1, keepalive 64) -> upstream
#   nginx-2w     the same with 2 worker processes
#   fencepost-1w wrk -> fencepost serve [[http]] (workers = 1) -> upstream
#   fencepost-2w the same with workers = 2
#   (--shared-runtime: fencepost's relay on its one multi-thread runtime
#   instead, workers = 0 and TOKIO_WORKER_THREADS=1 or 2: the layout the
#   relay threads replaced, to compare the two)
# The upstream is one nginx instance (static file for GET, `return 200` for
# PUT), the same for every target.
#
# Each round runs the targets in an order rotated one place from the round
# before (direct first in round 1, nginx-1w first in round 2, ...), so no
# target always follows the same one or always runs last; --fixed-order
# keeps the same order every round (the scripts' order before 5 December
# 2026).
#
# Workloads: GET, and PUT of 64 bytes with `Fencing-Token: 1` (equal to the
# mark, so fencepost's fast path: check, forward). Targets are run
# interleaved, round after round, so drift (thermal, noisy neighbours) hits
# all alike: first at --connections (32), then at 1 connection (the latency
# each proxy adds to direct, p50 and p99). --sweep-rounds N adds a PUT sweep
# at 1, 8, 32, 128 connections (default 0: off).
#
# --pin-latency CPU: every process of a 1-connection run (wrk, the
# target's workers with all their threads, the upstream's workers) on that
# one CPU while it runs, and back on every CPU after. --pin-latency A:B
# puts the target's workers on CPU B and wrk and the upstream on CPU A, so
# every hop into or out of the proxy crosses CPUs, each time the same
# way. Unpinned, where the three land decides the run: the same target
# measured 52-62 us at p50 in one 5 s run and 80-90 us in the next (4
# December 2026, 23:50 UTC), as each wake-up crossed to a halted vCPU or
# did not; pinned, every target is measured on the same path.
# --latency-only skips the 32-connection runs.
#
# Then (unless --no-callgrind) instructions per proxied PUT under callgrind:
# fencepost (workers = 1) and nginx (one process) are started anew under
# valgrind, warmed up, and --requests PUTs (default 2000, over 8 keep-alive
# connections) are counted alone (counters zeroed before, dumped after).
# --only-callgrind runs just that part (no wrk, no table of throughput):
# instruction counts are repeatable on a loaded machine, throughput is not.
#
# --sched-counters (needs `perf`): around each 1-connection run, the
# target's processes (a proxy's workers; the upstream's for direct) under
# `perf stat`, and context switches, CPU migrations and page faults per
# request written under that run in http_overhead_wrk.txt. A 1 % tail at
# one connection is a scheduling question (which vCPU wakes, and whether it
# had halted); these counts say how often each proxy sleeps and moves, on
# the quiet machine where the tail shows (see BENCHMARKS.md, issue 14).
#
# Output: a table on stdout, and in benches/results/:
#   http_overhead.csv        one row per wrk run (raw figures)
#   http_overhead.json       runs, medians, ratios, memory, callgrind, environment
#   http_overhead.svg        ratio to direct per workload and per connection count
#   http_overhead_wrk.txt    the raw wrk output of every run
set -euo pipefail

ROUNDS=3
DURATION=10
SWEEP_ROUNDS=0
CONNS=32
REQUESTS=2000
CALLGRIND=1
SHARED=0
SWEEP_CONNS=(1 8 32 128)
INSTALL=1
BUILD=1
KEEP_TMP=0
ONLY_CALLGRIND=0
SCHED=0
FIXED_ORDER=0
PIN=""
LATENCY_ONLY=0

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
. "$HERE/lib.sh"
usage() { usage_from_header "$0"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS="$2"; shift 2 ;;
        --duration) DURATION="$2"; shift 2 ;;
        --sweep-rounds) SWEEP_ROUNDS="$2"; shift 2 ;;
        --connections) CONNS="$2"; shift 2 ;;
        --requests) REQUESTS="$2"; shift 2 ;;
        --no-callgrind) CALLGRIND=0; shift ;;
        --shared-runtime) SHARED=1; shift ;;
        --skip-install) INSTALL=0; shift ;;
        --skip-build) BUILD=0; shift ;;
        --keep-tmp) KEEP_TMP=1; shift ;;
        --only-callgrind) ONLY_CALLGRIND=1; CALLGRIND=1; shift ;;
        --sched-counters) SCHED=1; shift ;;
        --fixed-order) FIXED_ORDER=1; shift ;;
        --pin-latency) PIN="$2"; shift 2 ;;
        --latency-only) LATENCY_ONLY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ "$SWEEP_ROUNDS" =~ ^[0-9]+$ ]] || { echo "--sweep-rounds must be a count" >&2; exit 2; }
for v in "$ROUNDS" "$DURATION" "$CONNS" "$REQUESTS"; do
    [[ "$v" =~ ^[1-9][0-9]*$ ]] || { echo "rounds, duration and connections must be positive integers" >&2; exit 2; }
done
# Bounded runtime: refuse absurd settings rather than run for hours.
if [ -n "$PIN" ]; then
    [[ "$PIN" =~ ^([0-9]+)(:([0-9]+))?$ ]] || { echo "--pin-latency takes CPU or A:B" >&2; exit 2; }
    PIN="${BASH_REMATCH[1]}"; PIN_TARGET="${BASH_REMATCH[3]:-$PIN}"
    for c in "$PIN" "$PIN_TARGET"; do
        [ "$c" -lt "$(nproc)" ] || { echo "--pin-latency: CPU $c: this machine has $(nproc)" >&2; exit 2; }
    done
fi
if [ "$ROUNDS" -gt 50 ] || [ "$SWEEP_ROUNDS" -gt 50 ] || [ "$DURATION" -gt 300 ]; then
    echo "at most 50 rounds and 300 s per run" >&2; exit 2
fi

RESULTS="$HERE/results"
HELPER="$HERE/http_overhead.py"
log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# ---------------------------------------------------------------- 1. tools
if [ "$INSTALL" = 1 ] && { ! command -v nginx >/dev/null || ! command -v wrk >/dev/null \
        || { [ "$CALLGRIND" = 1 ] && ! command -v valgrind >/dev/null; }; }; then
    log "installing nginx, wrk and valgrind"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nginx wrk valgrind >/dev/null
fi
NEED=(nginx curl python3)
[ "$SCHED" = 1 ] && NEED+=(perf)
[ "$ONLY_CALLGRIND" = 1 ] || NEED+=(wrk)
[ "$CALLGRIND" = 1 ] && NEED+=(valgrind callgrind_control)
for t in "${NEED[@]}"; do
    command -v "$t" >/dev/null || { echo "missing tool: $t" >&2; exit 1; }
done
NGINX="$(command -v nginx)"

if [ "$BUILD" = 1 ]; then
    build_fencepost
fi
FENCEPOST="${CARGO_TARGET_DIR:-$ROOT/target}/release/fencepost"
[ -x "$FENCEPOST" ] || { echo "no fencepost binary at $FENCEPOST" >&2; exit 1; }

# ---------------------------------------------------------------- cleanup
TMP="$(mktemp -d /tmp/fencepost-bench.XXXXXX)"
chmod 755 "$TMP"   # nginx workers run as nobody when started by root
PIDS=()
cleanup() {
    local rc=$?
    set +e
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null
    done
    for pid in "${PIDS[@]}"; do
        # bounded wait: 5 s, then KILL
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    if [ "$KEEP_TMP" = 1 ] || [ "$rc" != 0 ]; then
        echo "temporary files (configs, logs) kept in $TMP" >&2
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM


wait_http() { # url, what, pid: up to 10 s for any HTTP answer
    local url="$1" what="$2" pid="$3"
    for _ in $(seq 100); do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "$what exited during start-up; its log:" >&2
            cat "$TMP/$what.log" >&2 2>/dev/null
            exit 1
        fi
        if curl -s -o /dev/null --max-time 1 "$url"; then return 0; fi
        sleep 0.1
    done
    echo "$what did not answer at $url within 10 s" >&2
    exit 1
}

expect_status() { # want, curl args...
    local want="$1"; shift
    local got
    got="$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$@")"
    if [ "$got" != "$want" ]; then
        echo "sanity check failed: curl $* -> $got, want $want" >&2
        exit 1
    fi
}


UP_PORT="$(port)"

# ---------------------------------------------------------------- 2. servers
nginx_common() { # prefix workers
    cat <<EOF
worker_processes $2;
daemon off;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $1/client_body;
    proxy_temp_path $1/proxy;
    fastcgi_temp_path $1/fastcgi;
    uwsgi_temp_path $1/uwsgi;
    scgi_temp_path $1/scgi;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    default_type text/plain;
EOF
}

# Upstream: a 6-byte static file for GET, `return 200` for PUT.
UP="$TMP/upstream"
mkdir -p "$UP/www"
printf 'hello\n' >"$UP/www/item"
{
    nginx_common "$UP" 1
    cat <<EOF
    server {
        listen 127.0.0.1:$UP_PORT;
        root $UP/www;
        location / {
            if (\$request_method = PUT) { return 200 "ok\n"; }
        }
    }
}
EOF
} >"$UP/nginx.conf"

nginx_proxy_conf() { # dir port workers
    nginx_common "$1" "$3"
    cat <<EOF
    upstream backend {
        server 127.0.0.1:$UP_PORT;
        keepalive 64;
    }
    server {
        listen 127.0.0.1:$2;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
}

# fencepost: SQLite store in its directory, one [[http]] proxy, no admin,
# no elector; logs at info (the default a deployment would run).
fencepost_conf() { # dir port workers
    cat <<EOF
store = "sqlite://$1/fencepost.db"

[log]
level = "info"

[[http]]
listen = "127.0.0.1:$2"
upstream = "http://127.0.0.1:$UP_PORT"
routes = [{ prefix = "/", resource = "bench" }]
workers = $3
EOF
}

log "starting upstream nginx on 127.0.0.1:$UP_PORT"
"$NGINX" -p "$UP" -c "$UP/nginx.conf" -e "$UP/error.log" >"$TMP/upstream.log" 2>&1 &
UP_PID=$!; PIDS+=("$UP_PID")
wait_http "http://127.0.0.1:$UP_PORT/item" upstream "$UP_PID"

declare -A PORT=([direct]="$UP_PORT")
declare -A PID=()
if [ "$ONLY_CALLGRIND" = 0 ]; then
for w in 1 2; do
    t="nginx-${w}w"; d="$TMP/$t"; mkdir -p "$d"; PORT[$t]="$(port)"
    nginx_proxy_conf "$d" "${PORT[$t]}" "$w" >"$d/nginx.conf"
    log "starting $t on 127.0.0.1:${PORT[$t]}"
    "$NGINX" -p "$d" -c "$d/nginx.conf" -e "$d/error.log" >"$TMP/$t.log" 2>&1 &
    PID[$t]=$!; PIDS+=("${PID[$t]}")
    wait_http "http://127.0.0.1:${PORT[$t]}/item" "$t" "${PID[$t]}"

    # One tokio worker for everything but the relay (the fence, the store):
    # the relay's own threads are `workers`. --shared-runtime: no relay
    # threads, the relay on the tokio runtime, with `w` workers.
    t="fencepost-${w}w"; d="$TMP/$t"; mkdir -p "$d"; PORT[$t]="$(port)"
    if [ "$SHARED" = 1 ]; then relay=0; tokio="$w"; else relay="$w"; tokio=1; fi
    fencepost_conf "$d" "${PORT[$t]}" "$relay" >"$d/fencepost.toml"
    log "starting $t on 127.0.0.1:${PORT[$t]} (workers = $relay, TOKIO_WORKER_THREADS=$tokio)"
    env -u RUST_LOG TOKIO_WORKER_THREADS="$tokio" "$FENCEPOST" serve --config "$d/fencepost.toml" >"$TMP/$t.log" 2>&1 &
    PID[$t]=$!; PIDS+=("${PID[$t]}")
    wait_http "http://127.0.0.1:${PORT[$t]}/item" "$t" "${PID[$t]}"
    # The mark becomes 1.
    expect_status 200 -X PUT -H 'Fencing-Token: 1' --data x "http://127.0.0.1:${PORT[$t]}/item"
done
TARGETS=(direct nginx-1w fencepost-1w nginx-2w fencepost-2w)
for t in "${TARGETS[@]}"; do
    expect_status 200 "http://127.0.0.1:${PORT[$t]}/item"
    expect_status 200 -X PUT -H 'Fencing-Token: 1' --data x "http://127.0.0.1:${PORT[$t]}/item"
done
# fencepost really fences: an older token is refused.
expect_status 409 -X PUT -H 'Fencing-Token: 0' --data x "http://127.0.0.1:${PORT[fencepost-1w]}/item"

# The processes that serve a target, comma-separated (for perf stat -p).
pids_of() { # target
    case "$1" in
        nginx-*) pgrep -P "${PID[$1]}" | paste -sd, ;;
        fencepost-*) echo "${PID[$1]}" ;;
        *) pgrep -P "$UP_PID" | paste -sd, ;;
    esac
}

# The target's and the upstream's processes, every thread, onto CPUs.
pin_all() { # cpus-of-the-target cpus-of-the-upstream target
    local p
    for p in $(pids_of "$3" | tr , ' '); do
        taskset -a -p -c "$1" "$p" >/dev/null || { echo "taskset failed for pid $p" >&2; exit 1; }
    done
    for p in $(pgrep -P "$UP_PID"); do
        taskset -a -p -c "$2" "$p" >/dev/null || { echo "taskset failed for pid $p" >&2; exit 1; }
    done
}

# RSS of a target: nginx's worker processes summed, fencepost's process.
rss_of() { # target
    case "$1" in
        nginx-*) local sum=0 p; for p in $(pgrep -P "${PID[$1]}"); do sum=$((sum + $(rss_kb "$p"))); done; echo "$sum" ;;
        fencepost-*) rss_kb "${PID[$1]}" ;;
        *) echo "" ;;
    esac
}
sleep 1
MEMORY=()
for t in "${TARGETS[@]:1}"; do MEMORY+=("${t}_idle_kb=$(rss_of "$t")"); done

# ---------------------------------------------------------------- 3. load
# 64 bytes of body, the issue's PUT.
cat >"$TMP/put.lua" <<'EOF'
wrk.method = "PUT"
wrk.body = string.rep("x", 64)
wrk.headers["Fencing-Token"] = "1"
wrk.headers["Content-Type"] = "text/plain"
EOF

mkdir -p "$RESULTS"
RAW="$RESULTS/http_overhead_wrk.txt"
MANIFEST="$TMP/manifest.tsv"
: >"$RAW"
: >"$MANIFEST"
printf 'phase\tworkload\ttarget\tconnections\tround\tfile\trss_after_kb\n' >>"$MANIFEST"

RUN=0
run_wrk() { # phase workload target connections round duration
    local phase="$1" workload="$2" target="$3" conns="$4" round="$5" dur="$6"
    local url="http://127.0.0.1:${PORT[$target]}/item"
    local args=(-t1 -c"$conns" -d"${dur}s" --latency --timeout 5s)
    [ "$workload" = PUT ] && args+=(-s "$TMP/put.lua")
    RUN=$((RUN + 1))
    local out="$TMP/run-$RUN.txt"
    local perf_pid="" perf_out="$TMP/perf-$RUN.txt"
    if [ "$SCHED" = 1 ] && [ "$phase" = latency ]; then
        perf stat -x, -e context-switches,cpu-migrations,page-faults \
            -p "$(pids_of "$target")" -o "$perf_out" &
        perf_pid=$!
        sleep 0.2
    fi
    local pin=()
    if [ -n "$PIN" ] && [ "$phase" = latency ]; then
        pin_all "$PIN_TARGET" "$PIN" "$target"
        pin=(taskset -c "$PIN")
    fi
    if ! timeout --kill-after=5 $((dur + 30)) "${pin[@]}" wrk "${args[@]}" "$url" >"$out" 2>&1; then
        echo "wrk failed for $target $workload c=$conns:" >&2; cat "$out" >&2; exit 1
    fi
    [ ${#pin[@]} -gt 0 ] && pin_all "0-$(( $(nproc) - 1 ))" "0-$(( $(nproc) - 1 ))" "$target"
    if [ -n "$perf_pid" ]; then
        kill -INT "$perf_pid" 2>/dev/null; wait "$perf_pid" 2>/dev/null || true
        awk -F, -v n="$(awk '/requests in/ {print $1}' "$out")" \
            'n > 0 && $3 ~ /^[a-z-]+$/ { printf "%s%s=%.4f", sep, $3, $1 / n; sep = " " }
             END { print "" }' "$perf_out" | sed 's/^/### per request: /' >>"$out"
    fi
    for pid in "${PIDS[@]}"; do
        kill -0 "$pid" 2>/dev/null || { echo "a server died during the $target run; see $TMP" >&2; exit 1; }
    done
    local rss
    rss="$(rss_of "$target")"
    [ "$phase" = warmup ] && return 0
    { echo "### phase=$phase workload=$workload target=$target connections=$conns round=$round"
      echo "### wrk ${args[*]} $url"
      cat "$out"; echo; } >>"$RAW"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$phase" "$workload" "$target" "$conns" "$round" "$out" "$rss" >>"$MANIFEST"
    printf '  %-7s %-4s %-12s c=%-3s round %s: %s\n' "$phase" "$workload" "$target" "$conns" "$round" \
        "$(awk '/^Requests\/sec/ {print $2 " req/s"}' "$out")" >&2
}

LOAD_START="$(cut -d' ' -f1 /proc/loadavg)"
if awk -v l="$LOAD_START" -v n="$(nproc)" 'BEGIN { exit !(l > n / 2) }'; then
    log "warning: load average is $LOAD_START before the load starts; other work on this machine will skew the numbers"
fi
N=${#TARGETS[@]}
total=$(( (4 * ROUNDS + 4 * SWEEP_ROUNDS) * N * DURATION + 2 * N * 2 ))
log "measuring: ~$((total / 60 + 1)) min of wrk ($ROUNDS rounds x ${DURATION}s, $N targets)"

# The targets of round R, rotated (see the top of the file).
order() { if [ "$FIXED_ORDER" = 1 ]; then printf '%s\n' "${TARGETS[@]}"; else round_order "$1" "${TARGETS[@]}"; fi; }
for workload in GET PUT; do
    for t in "${TARGETS[@]}"; do run_wrk warmup "$workload" "$t" "$CONNS" 0 2; done
    [ "$LATENCY_ONLY" = 1 ] && continue
    for r in $(seq "$ROUNDS"); do
        for t in $(order "$r"); do run_wrk main "$workload" "$t" "$CONNS" "$r" "$DURATION"; done
    done
done
for t in "${TARGETS[@]:1}"; do MEMORY+=("${t}_after_main_kb=$(rss_of "$t")"); done

# One connection: the latency a proxy adds to each request.
for workload in GET PUT; do
    for r in $(seq "$ROUNDS"); do
        for t in $(order "$r"); do run_wrk latency "$workload" "$t" 1 "$r" "$DURATION"; done
    done
done

if [ "$SWEEP_ROUNDS" -gt 0 ]; then
    for c in "${SWEEP_CONNS[@]}"; do
        for r in $(seq "$SWEEP_ROUNDS"); do
            for t in $(order "$r"); do run_wrk sweep PUT "$t" "$c" "$r" "$DURATION"; done
        done
    done
fi
for t in "${TARGETS[@]:1}"; do MEMORY+=("${t}_after_load_kb=$(rss_of "$t")"); done
MEMORY+=("fencepost-1w_peak_kb=$(hwm_kb "${PID[fencepost-1w]}")")

LOAD_END="$(cut -d' ' -f1-3 /proc/loadavg)"
# Was anything logged per request? (a hint when fencepost is slow)
FP_LOG_LINES="$(wc -l <"$TMP/fencepost-1w.log")"
fi # ONLY_CALLGRIND

# ---------------------------------------------------------------- callgrind
# Instructions per proxied PUT: the process under valgrind, its counters
# zeroed after a warm-up and dumped after --requests PUTs; Ir / requests.
CALLGRIND_META=()
callgrind_count() { # name port pid outfile
    local name="$1" port="$2" pid="$3" out="$4"
    python3 "$HELPER" load --port "$port" --requests 300 --connections 8
    # Counters to zero after the warm-up; the dump (out.1) then holds
    # exactly the measured PUTs.
    callgrind_control -z "$pid" >/dev/null
    python3 "$HELPER" load --port "$port" --requests "$REQUESTS" --connections 8
    callgrind_control -d "$pid" >/dev/null
    sleep 1
    local ir
    ir="$(python3 "$HELPER" callgrind-total "$out".[0-9]*)"
    CALLGRIND_META+=("callgrind_${name}_ir=$ir" "callgrind_${name}_per_put=$((ir / REQUESTS))")
    log "callgrind: $name $((ir / REQUESTS)) instructions per proxied PUT ($ir over $REQUESTS)"
}
wait_up() { # port pid: up to 60 s (valgrind starts slowly)
    for _ in $(seq 600); do
        kill -0 "$2" 2>/dev/null || { echo "a process under valgrind exited; see $TMP" >&2; exit 1; }
        curl -s -o /dev/null --max-time 2 "http://127.0.0.1:$1/item" && return 0
        sleep 0.1
    done
    echo "no answer under valgrind on port $1" >&2; exit 1
}
if [ "$CALLGRIND" = 1 ]; then
    log "callgrind: fencepost (workers = 1) and nginx (1 process) under valgrind"
    d="$TMP/cg-fencepost"; mkdir -p "$d"; p="$(port)"
    fencepost_conf "$d" "$p" 1 >"$d/fencepost.toml"
    # --dump-instr=yes: the kept dump (--keep-tmp) can be read per
    # function and per instruction (callgrind_annotate); the count is the same.
    env -u RUST_LOG TOKIO_WORKER_THREADS=1 valgrind --tool=callgrind --dump-instr=yes \
        --callgrind-out-file="$d/cg.out" "$FENCEPOST" serve --config "$d/fencepost.toml" >"$TMP/cg-fencepost.log" 2>&1 &
    cg=$!; PIDS+=("$cg")
    wait_up "$p" "$cg"
    expect_status 200 -X PUT -H 'Fencing-Token: 1' --data x "http://127.0.0.1:$p/item"
    callgrind_count fencepost "$p" "$cg" "$d/cg.out"
    kill -TERM "$cg" 2>/dev/null; wait "$cg" 2>/dev/null || true

    d="$TMP/cg-nginx"; mkdir -p "$d"; p="$(port)"
    nginx_proxy_conf "$d" "$p" 1 | sed 's/^daemon off;/daemon off;\nmaster_process off;/' >"$d/nginx.conf"
    valgrind --tool=callgrind --callgrind-out-file="$d/cg.out" \
        "$NGINX" -p "$d" -c "$d/nginx.conf" -e "$d/error.log" >"$TMP/cg-nginx.log" 2>&1 &
    cg=$!; PIDS+=("$cg")
    wait_up "$p" "$cg"
    callgrind_count nginx "$p" "$cg" "$d/cg.out"
    kill -TERM "$cg" 2>/dev/null; wait "$cg" 2>/dev/null || true
fi

# ---------------------------------------------------------------- 4. report
if [ "$ONLY_CALLGRIND" = 1 ]; then
    echo
    echo "Instructions per proxied PUT (callgrind, $REQUESTS PUTs, user space):"
    for kv in "${CALLGRIND_META[@]}"; do
        case "$kv" in callgrind_*_per_put=*)
            k="${kv%%=*}"; k="${k#callgrind_}"; printf '  %-12s %10s\n' "${k%_per_put}" "${kv#*=}" ;;
        esac
    done
    exit 0
fi
python3 "$HELPER" report \
    --manifest "$MANIFEST" \
    --out "$RESULTS" \
    --meta "rounds=$ROUNDS" "duration_s=$DURATION" "sweep_rounds=$SWEEP_ROUNDS" "connections=$CONNS" \
           "cpus=$(nproc)" "kernel=$(uname -r)" "nginx=$("$NGINX" -v 2>&1 | sed 's/.*\///')" \
           "wrk=$(wrk --version 2>&1 | head -1 | awk '{print $2}')" \
           "fencepost_commit=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
           "fencepost_log_lines=$FP_LOG_LINES" "loadavg_start=$LOAD_START" "loadavg_end=$LOAD_END" \
           "requests=$REQUESTS" "shared_runtime=$SHARED" "${CALLGRIND_META[@]}" \
           "order=$([ "$FIXED_ORDER" = 1 ] && echo fixed || echo rotated)" \
           "pin_latency=${PIN:+wrk and upstream on CPU $PIN, target on CPU ${PIN_TARGET:-$PIN}}" \
    --memory "${MEMORY[@]}"
