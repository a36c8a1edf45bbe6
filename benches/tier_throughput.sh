#!/usr/bin/env bash
# Same-token HTTP throughput through one replica of a fencing tier: the
# replica alone in the tier, against the same replica with two more live
# replicas on the same Postgres store (issue 12: "equal within noise: no
# store round trip").
#
#   bash benches/tier_throughput.sh [--rounds N] [--duration S]
#                                   [--connections C] [--skip-install]
#                                   [--skip-build] [--debug] [--keep-tmp]
#
# Set-up (all on 127.0.0.1): an nginx upstream answering PUT with
# `return 200`; a fresh database on DATABASE_URL's Postgres (default
# postgres://postgres@127.0.0.1:5432/test) as the store; three `fencepost
# serve` replicas on it (`[cluster] replica_ttl = "3s"`, one tokio worker
# each, logs at info). wrk (one thread, C connections) PUTs with
# `Fencing-Token: 1` through replica 1 only: after the first write that is
# the mark, so every request takes the same-token path.
#
# Interleaved, round after round: "three" (replicas 2 and 3 running) then
# "one" (replicas 2 and 3 stopped with SIGTERM, so they leave the tier),
# then replicas 2 and 3 start again for the next round. Drift on the
# machine hits both alike; the ratio of the medians is the figure.
#
# Output: a table on stdout; the raw wrk output of every run in
# benches/results/tier_throughput_wrk.txt.
set -euo pipefail

ROUNDS=5
DURATION=10
CONNS=32
INSTALL=1
BUILD=1
PROFILE=release
KEEP_TMP=0

usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS="$2"; shift 2 ;;
        --duration) DURATION="$2"; shift 2 ;;
        --connections) CONNS="$2"; shift 2 ;;
        --skip-install) INSTALL=0; shift ;;
        --skip-build) BUILD=0; shift ;;
        --debug) PROFILE=debug; shift ;;
        --keep-tmp) KEEP_TMP=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
for v in "$ROUNDS" "$DURATION" "$CONNS"; do
    [[ "$v" =~ ^[1-9][0-9]*$ ]] || { echo "rounds, duration and connections must be positive integers" >&2; exit 2; }
done
if [ "$ROUNDS" -gt 50 ] || [ "$DURATION" -gt 300 ]; then
    echo "at most 50 rounds and 300 s per run" >&2; exit 2
fi

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
. "$HERE/lib.sh"
RESULTS="$HERE/results"
log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

if [ "$INSTALL" = 1 ] && { ! command -v nginx >/dev/null || ! command -v wrk >/dev/null; }; then
    log "installing nginx and wrk"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nginx wrk >/dev/null
fi
for t in nginx wrk curl psql python3; do
    command -v "$t" >/dev/null || { echo "missing tool: $t" >&2; exit 1; }
done
if [ "$BUILD" = 1 ]; then
    log "building fencepost ($PROFILE)"
    if [ "$PROFILE" = release ]; then
        (cd "$ROOT" && cargo build --release --bin fencepost)
    else
        (cd "$ROOT" && cargo build --bin fencepost)
    fi
fi
FENCEPOST="${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE/fencepost"
[ -x "$FENCEPOST" ] || { echo "no fencepost binary at $FENCEPOST" >&2; exit 1; }

DB_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
DB_NAME="fp_tier_bench_$$"
STORE_URL="${DB_URL%/*}/$DB_NAME"

TMP="$(mktemp -d /tmp/fencepost-tier-bench.XXXXXX)"
chmod 755 "$TMP"
declare -A PID=()
cleanup() {
    local rc=$?
    set +e
    for p in "${PID[@]}"; do kill -TERM "$p" 2>/dev/null; done
    for p in "${PID[@]}"; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null; wait "$p" 2>/dev/null
    done
    psql -q "$DB_URL" -c "DROP DATABASE IF EXISTS $DB_NAME" >/dev/null 2>&1
    if [ "$KEEP_TMP" = 1 ] || [ "$rc" != 0 ]; then
        echo "temporary files (configs, logs) kept in $TMP" >&2
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

put() { # port token -> status
    curl -s -o /dev/null -w '%{http_code}' --max-time 5 -X PUT \
        -H "Fencing-Token: $2" -H 'Fencing-Resource: bench' --data x "http://127.0.0.1:$1/item"
}

psql -q "$DB_URL" -c "CREATE DATABASE $DB_NAME" >/dev/null

UP_PORT="$(free_port)"
mkdir -p "$TMP/upstream"
cat >"$TMP/upstream/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $TMP/upstream/nginx.pid;
error_log $TMP/upstream/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $TMP/upstream/client_body;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:$UP_PORT;
        location / { return 200 "ok\n"; }
    }
}
EOF
nginx -p "$TMP/upstream" -c "$TMP/upstream/nginx.conf" >"$TMP/upstream.log" 2>&1 &
PID[up]=$!

declare -A PORT=()
for r in 1 2 3; do
    PORT[$r]="$(free_port)"
    mkdir -p "$TMP/r$r"
    cat >"$TMP/r$r/fencepost.toml" <<EOF
store = "$STORE_URL"
[log]
level = "info"
[cluster]
replica_ttl = "3s"
[[http]]
listen = "127.0.0.1:${PORT[$r]}"
upstream = "http://127.0.0.1:$UP_PORT"
EOF
done

start_replica() { # r
    local r="$1"
    env -u RUST_LOG TOKIO_WORKER_THREADS=1 "$FENCEPOST" serve --config "$TMP/r$r/fencepost.toml" \
        >>"$TMP/r$r/serve.log" 2>&1 &
    PID[r$r]=$!
    for _ in $(seq 100); do
        [ "$(put "${PORT[$r]}" 1)" = 200 ] && return 0
        kill -0 "${PID[r$r]}" 2>/dev/null || { cat "$TMP/r$r/serve.log" >&2; exit 1; }
        sleep 0.1
    done
    echo "replica $r never admitted a write" >&2; exit 1
}
stop_replica() { # r: SIGTERM, the replica leaves the tier
    local r="$1"
    kill -TERM "${PID[r$r]}"
    wait "${PID[r$r]}" 2>/dev/null || true
    unset "PID[r$r]"
}
live_replicas() {
    psql -qtA "$STORE_URL" -c "SELECT count(*) FROM fencepost_store.replicas WHERE expires_at > now()"
}

log "starting three replicas on $STORE_URL"
for r in 1 2 3; do start_replica "$r"; done
[ "$(put "${PORT[1]}" 0)" = 409 ] || { echo "replica 1 does not fence" >&2; exit 1; }

cat >"$TMP/put.lua" <<'EOF'
wrk.method = "PUT"
wrk.body = "x"
wrk.headers["Fencing-Token"] = "1"
wrk.headers["Fencing-Resource"] = "bench"
EOF

mkdir -p "$RESULTS"
RAW="$RESULTS/tier_throughput_wrk.txt"
: >"$RAW"
declare -A RPS=([one]="" [three]="")
run_wrk() { # label round
    local out="$TMP/wrk-$1-$2.txt"
    local live; live="$(live_replicas)"
    timeout --kill-after=5 $((DURATION + 30)) wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency \
        --timeout 5s -s "$TMP/put.lua" "http://127.0.0.1:${PORT[1]}/item" >"$out" 2>&1
    local rps; rps="$(awk '/^Requests\/sec:/ {print $2}' "$out")"
    local non2xx; non2xx="$(awk '/Non-2xx/ {print $NF}' "$out")"
    [ -z "$non2xx" ] || { echo "non-2xx answers in the $1 run:" >&2; cat "$out" >&2; exit 1; }
    RPS[$1]="${RPS[$1]} $rps"
    { echo "### $1 (live replicas in the store: $live) round $2"; cat "$out"; echo; } >>"$RAW"
    log "round $2 $1: $rps req/s (live replicas: $live)"
}

log "warm-up"
timeout 30 wrk -t1 -c"$CONNS" -d2s -s "$TMP/put.lua" "http://127.0.0.1:${PORT[1]}/item" >/dev/null
for round in $(seq "$ROUNDS"); do
    run_wrk three "$round"
    stop_replica 2; stop_replica 3
    run_wrk one "$round"
    start_replica 2; start_replica 3
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
M1="$(echo "${RPS[one]}" | median)"
M3="$(echo "${RPS[three]}" | median)"
echo
echo "same-token PUT through replica 1, wrk -t1 -c$CONNS -d${DURATION}s, $ROUNDS interleaved rounds, $PROFILE build"
printf '%-28s %s\n' "replica alone (req/s):" "${RPS[one]}"
printf '%-28s %s\n' "three replicas live (req/s):" "${RPS[three]}"
printf 'median: one %s, three %s, three/one %s\n' "$M1" "$M3" \
    "$(python3 -c "print(f'{$M3/$M1:.3f}')")"
