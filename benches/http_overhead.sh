#!/usr/bin/env bash
# HTTP overhead of fencepost's [[http]] proxy, against a direct connection to
# the upstream and against a plain nginx reverse proxy in front of the same
# upstream.
#
#   bash benches/http_overhead.sh [--rounds N] [--duration S]
#                                 [--sweep-rounds N] [--connections C]
#                                 [--skip-install] [--skip-build] [--keep-tmp]
#
# Targets (all on 127.0.0.1, on ports picked at start):
#   direct     wrk -> upstream nginx
#   nginx      wrk -> nginx reverse proxy (proxy_pass, HTTP/1.1, keepalive 64) -> upstream
#   fencepost  wrk -> fencepost serve [[http]] -> upstream
# The upstream is one nginx instance (static file for GET, `return 200` for
# PUT), the same for every target.
#
# Workloads: GET, and PUT with `Fencing-Token: 1` (equal to the mark, so
# fencepost's fast path: check, forward). Targets are run interleaved,
# round after round, so drift (thermal, noisy neighbours) hits all alike.
# Then a connection sweep (PUT at 1, 8, 32, 128 connections).
#
# Fairness on a small machine: wrk runs one thread, each nginx one worker
# process, fencepost one tokio worker thread (TOKIO_WORKER_THREADS=1). On a
# 2-core box wrk, the proxy and the upstream still share two cores, so the
# absolute numbers are the machine's; the ratios to direct are the point.
#
# Output: a table on stdout, and in benches/results/:
#   http_overhead.csv        one row per wrk run (raw figures)
#   http_overhead.json       runs, medians, ratios, memory, environment
#   http_overhead.svg        ratio to direct per workload and per connection count
#   http_overhead_wrk.txt    the raw wrk output of every run
set -euo pipefail

ROUNDS=5
DURATION=10
SWEEP_ROUNDS=3
CONNS=32
SWEEP_CONNS=(1 8 32 128)
INSTALL=1
BUILD=1
KEEP_TMP=0

usage() { sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS="$2"; shift 2 ;;
        --duration) DURATION="$2"; shift 2 ;;
        --sweep-rounds) SWEEP_ROUNDS="$2"; shift 2 ;;
        --connections) CONNS="$2"; shift 2 ;;
        --skip-install) INSTALL=0; shift ;;
        --skip-build) BUILD=0; shift ;;
        --keep-tmp) KEEP_TMP=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
for v in "$ROUNDS" "$DURATION" "$SWEEP_ROUNDS" "$CONNS"; do
    [[ "$v" =~ ^[1-9][0-9]*$ ]] || { echo "rounds, duration and connections must be positive integers" >&2; exit 2; }
done
# Bounded runtime: refuse absurd settings rather than run for hours.
if [ "$ROUNDS" -gt 50 ] || [ "$SWEEP_ROUNDS" -gt 50 ] || [ "$DURATION" -gt 300 ]; then
    echo "at most 50 rounds and 300 s per run" >&2; exit 2
fi

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
RESULTS="$HERE/results"
HELPER="$HERE/http_overhead.py"
log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# ---------------------------------------------------------------- 1. tools
if [ "$INSTALL" = 1 ] && { ! command -v nginx >/dev/null || ! command -v wrk >/dev/null; }; then
    log "installing nginx and wrk"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nginx wrk >/dev/null
fi
for t in nginx wrk curl python3; do
    command -v "$t" >/dev/null || { echo "missing tool: $t" >&2; exit 1; }
done
NGINX="$(command -v nginx)"

if [ "$BUILD" = 1 ]; then
    log "building fencepost (release)"
    (cd "$ROOT" && cargo build --release --bin fencepost)
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

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

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

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
hwm_kb() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

UP_PORT="$(free_port)"
NGX_PORT="$(free_port)"
FP_PORT="$(free_port)"
while [ "$NGX_PORT" = "$UP_PORT" ]; do NGX_PORT="$(free_port)"; done
while [ "$FP_PORT" = "$UP_PORT" ] || [ "$FP_PORT" = "$NGX_PORT" ]; do FP_PORT="$(free_port)"; done

# ---------------------------------------------------------------- 2. servers
nginx_common() { # prefix
    cat <<EOF
worker_processes 1;
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
    nginx_common "$UP"
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

# Plain nginx reverse proxy in front of it.
NGX="$TMP/nginx"
mkdir -p "$NGX"
{
    nginx_common "$NGX"
    cat <<EOF
    upstream backend {
        server 127.0.0.1:$UP_PORT;
        keepalive 64;
    }
    server {
        listen 127.0.0.1:$NGX_PORT;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
} >"$NGX/nginx.conf"

# fencepost: SQLite store in the temp dir, one [[http]] proxy, no admin,
# no elector; logs at info (the default a deployment would run).
FP="$TMP/fencepost"
mkdir -p "$FP"
cat >"$FP/fencepost.toml" <<EOF
store = "sqlite://$FP/fencepost.db"

[log]
level = "info"

[[http]]
listen = "127.0.0.1:$FP_PORT"
upstream = "http://127.0.0.1:$UP_PORT"
routes = [{ prefix = "/", resource = "bench" }]
EOF

log "starting upstream nginx on 127.0.0.1:$UP_PORT"
"$NGINX" -p "$UP" -c "$UP/nginx.conf" -e "$UP/error.log" >"$TMP/upstream.log" 2>&1 &
UP_PID=$!; PIDS+=("$UP_PID")
wait_http "http://127.0.0.1:$UP_PORT/item" upstream "$UP_PID"

log "starting nginx reverse proxy on 127.0.0.1:$NGX_PORT"
"$NGINX" -p "$NGX" -c "$NGX/nginx.conf" -e "$NGX/error.log" >"$TMP/nginx.log" 2>&1 &
NGX_PID=$!; PIDS+=("$NGX_PID")
wait_http "http://127.0.0.1:$NGX_PORT/item" nginx "$NGX_PID"

log "starting fencepost on 127.0.0.1:$FP_PORT (TOKIO_WORKER_THREADS=1)"
env -u RUST_LOG TOKIO_WORKER_THREADS=1 "$FENCEPOST" serve --config "$FP/fencepost.toml" >"$TMP/fencepost.log" 2>&1 &
FP_PID=$!; PIDS+=("$FP_PID")
wait_http "http://127.0.0.1:$FP_PORT/item" fencepost "$FP_PID"

# Set the mark to 1, then check every target answers both workloads with 200.
expect_status 200 -X PUT -H 'Fencing-Token: 1' --data x "http://127.0.0.1:$FP_PORT/item"
declare -A PORT=([direct]="$UP_PORT" [nginx]="$NGX_PORT" [fencepost]="$FP_PORT")
TARGETS=(direct nginx fencepost)
for t in "${TARGETS[@]}"; do
    expect_status 200 "http://127.0.0.1:${PORT[$t]}/item"
    expect_status 200 -X PUT -H 'Fencing-Token: 1' --data x "http://127.0.0.1:${PORT[$t]}/item"
done
# fencepost really fences: an older token is refused.
expect_status 409 -X PUT -H 'Fencing-Token: 0' --data x "http://127.0.0.1:$FP_PORT/item"

ngx_worker() { pgrep -P "$NGX_PID" | head -1; }
sleep 1
FP_RSS_IDLE="$(rss_kb "$FP_PID")"
NGX_RSS_IDLE="$(rss_kb "$(ngx_worker)")"
log "idle RSS: fencepost ${FP_RSS_IDLE} kB, nginx proxy worker ${NGX_RSS_IDLE} kB"

# ---------------------------------------------------------------- 3. load
cat >"$TMP/put.lua" <<'EOF'
wrk.method = "PUT"
wrk.body = "x"
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
    if ! timeout --kill-after=5 $((dur + 30)) wrk "${args[@]}" "$url" >"$out" 2>&1; then
        echo "wrk failed for $target $workload c=$conns:" >&2; cat "$out" >&2; exit 1
    fi
    for pid in "${PIDS[@]}"; do
        kill -0 "$pid" 2>/dev/null || { echo "a server died during the $target run; see $TMP" >&2; exit 1; }
    done
    local rss=""
    [ "$target" = fencepost ] && rss="$(rss_kb "$FP_PID")"
    [ "$target" = nginx ] && rss="$(rss_kb "$(ngx_worker)")"
    [ "$phase" = warmup ] && return 0
    { echo "### phase=$phase workload=$workload target=$target connections=$conns round=$round"
      echo "### wrk ${args[*]} $url"
      cat "$out"; echo; } >>"$RAW"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$phase" "$workload" "$target" "$conns" "$round" "$out" "$rss" >>"$MANIFEST"
    printf '  %-5s %-4s %-9s c=%-3s round %s: %s\n' "$phase" "$workload" "$target" "$conns" "$round" \
        "$(awk '/^Requests\/sec/ {print $2 " req/s"}' "$out")" >&2
}

LOAD_START="$(cut -d' ' -f1 /proc/loadavg)"
if awk -v l="$LOAD_START" -v n="$(nproc)" 'BEGIN { exit !(l > n / 2) }'; then
    log "warning: load average is $LOAD_START before the load starts; other work on this machine will skew the numbers"
fi
total=$(( (2 * ROUNDS + ${#SWEEP_CONNS[@]} * SWEEP_ROUNDS) * 3 * DURATION + 2 * 3 * 2 ))
log "measuring: ~$((total / 60 + 1)) min ($ROUNDS rounds x ${DURATION}s, sweep $SWEEP_ROUNDS rounds)"

for workload in GET PUT; do
    for t in "${TARGETS[@]}"; do run_wrk warmup "$workload" "$t" "$CONNS" 0 2; done
    for r in $(seq "$ROUNDS"); do
        for t in "${TARGETS[@]}"; do run_wrk main "$workload" "$t" "$CONNS" "$r" "$DURATION"; done
    done
done
FP_RSS_AFTER_MAIN="$(rss_kb "$FP_PID")"
NGX_RSS_AFTER_MAIN="$(rss_kb "$(ngx_worker)")"

for c in "${SWEEP_CONNS[@]}"; do
    for r in $(seq "$SWEEP_ROUNDS"); do
        for t in "${TARGETS[@]}"; do run_wrk sweep PUT "$t" "$c" "$r" "$DURATION"; done
    done
done
FP_RSS_AFTER_SWEEP="$(rss_kb "$FP_PID")"
FP_HWM="$(hwm_kb "$FP_PID")"
NGX_RSS_AFTER_SWEEP="$(rss_kb "$(ngx_worker)")"
sleep 2
FP_RSS_SETTLED="$(rss_kb "$FP_PID")"

LOAD_END="$(cut -d' ' -f1-3 /proc/loadavg)"
# Was anything logged per request? (a hint when fencepost is slow)
FP_LOG_LINES="$(wc -l <"$TMP/fencepost.log")"

# ---------------------------------------------------------------- 4. report
python3 "$HELPER" report \
    --manifest "$MANIFEST" \
    --out "$RESULTS" \
    --meta "rounds=$ROUNDS" "duration_s=$DURATION" "sweep_rounds=$SWEEP_ROUNDS" "connections=$CONNS" \
           "cpus=$(nproc)" "kernel=$(uname -r)" "nginx=$("$NGINX" -v 2>&1 | sed 's/.*\///')" \
           "wrk=$(wrk --version 2>&1 | head -1 | awk '{print $2}')" \
           "fencepost_commit=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
           "fencepost_log_lines=$FP_LOG_LINES" "loadavg_start=$LOAD_START" "loadavg_end=$LOAD_END" \
    --memory "fencepost_idle_kb=$FP_RSS_IDLE" "fencepost_after_main_kb=$FP_RSS_AFTER_MAIN" \
             "fencepost_after_sweep_kb=$FP_RSS_AFTER_SWEEP" "fencepost_settled_kb=$FP_RSS_SETTLED" \
             "fencepost_peak_kb=$FP_HWM" \
             "nginx_worker_idle_kb=$NGX_RSS_IDLE" "nginx_worker_after_main_kb=$NGX_RSS_AFTER_MAIN" \
             "nginx_worker_after_sweep_kb=$NGX_RSS_AFTER_SWEEP"
