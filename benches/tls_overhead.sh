#!/usr/bin/env bash
# The cost of TLS on fencepost's data paths (issue 17), handshake and steady
# state, beside nginx and PgBouncer with TLS on the same test certificate.
#
#   bash benches/tls_overhead.sh [--rounds N] [--duration S] [--connections C]
#                                [--handshake-connections C] [--clients C]
#                                [--no-http] [--no-pg]
#                                [--skip-install] [--skip-build] [--keep-tmp]
#
# HTTP targets (127.0.0.1, free ports), all in front of one plain upstream
# nginx (1 worker: static file for GET, `return 200` for PUT):
#   nginx          nginx reverse proxy, 1 worker, plain
#   nginx-tls      the same with `listen ... ssl` and the test certificate
#   fencepost      fencepost serve, one [[http]] (workers = 1), plain
#   fencepost-tls  the same with tls_cert/tls_key
# Workloads (wrk -t1, interleaved rounds, 2 s warm-up each):
#   GET, PUT 64 B with `Fencing-Token: 1` at --connections (32) keep-alive
#   connections: the steady state (record encryption only);
#   GET with `Connection: close` at --handshake-connections (8): every
#   request is a new TCP connection and, on the TLS targets, a full
#   handshake (wrk's OpenSSL client keeps no session, so nothing resumes).
#
# Postgres targets, on a fresh database (pgbench -i -s 10) of the Postgres at
# 127.0.0.1:5432 (user postgres, trust), the server side in plain text:
#   pgbouncer      session pooling, plain (client_tls_sslmode = disable)
#   pgbouncer-tls  client_tls_sslmode = require, the test certificate
#   fencepost      one [[postgres]] listener, enforce = "proxy", plain
#   fencepost-tls  the same with tls_cert/tls_key
# pgbench -n -S -c 8 -j 2, -M simple and -M prepared (PGSSLMODE=require on
# the TLS targets, disable on the others), and -S -M simple -C (a new
# connection, and handshake, per transaction).
#
# Output: a table of medians with ratios (TLS / plaintext per proxy,
# fencepost / peer in plain text and under TLS); benches/results/:
#   tls_overhead.csv   one row per run
#   tls_overhead.json  runs, medians, ratios, environment
#   tls_overhead.txt   the raw wrk and pgbench output of every run
set -euo pipefail

ROUNDS=3
DURATION=10
CONNS=32
HS_CONNS=8
CLIENTS=8
SCALE=10
DO_HTTP=1
DO_PG=1
INSTALL=1
BUILD=1
KEEP_TMP=0

usage() { sed -n '2,37p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS="$2"; shift 2 ;;
        --duration) DURATION="$2"; shift 2 ;;
        --connections) CONNS="$2"; shift 2 ;;
        --handshake-connections) HS_CONNS="$2"; shift 2 ;;
        --clients) CLIENTS="$2"; shift 2 ;;
        --no-http) DO_HTTP=0; shift ;;
        --no-pg) DO_PG=0; shift ;;
        --skip-install) INSTALL=0; shift ;;
        --skip-build) BUILD=0; shift ;;
        --keep-tmp) KEEP_TMP=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
for v in "$ROUNDS" "$DURATION" "$CONNS" "$HS_CONNS" "$CLIENTS"; do
    [[ "$v" =~ ^[1-9][0-9]*$ ]] || { echo "numeric arguments must be positive integers" >&2; exit 2; }
done
if [ "$ROUNDS" -gt 50 ] || [ "$DURATION" -gt 300 ] || [ "$CLIENTS" -gt 40 ]; then
    echo "at most 50 rounds, 300 s per run, 40 clients" >&2; exit 2
fi

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
. "$HERE/lib.sh"
RESULTS="$HERE/results"
HELPER="$HERE/tls_overhead.py"
PGUSER_=postgres
DB="fencepost_tls_$$"
log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# ---------------------------------------------------------------- 1. tools
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
if [ "$INSTALL" = 1 ] && { ! command -v nginx >/dev/null || ! command -v wrk >/dev/null \
        || { ! command -v pgbouncer >/dev/null && [ ! -x /usr/sbin/pgbouncer ]; }; }; then
    log "installing nginx, wrk and pgbouncer"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nginx wrk pgbouncer >/dev/null
fi
PGBOUNCER="$(command -v pgbouncer || echo /usr/sbin/pgbouncer)"
for t in nginx wrk curl openssl python3 pgbench psql createdb dropdb "$PGBOUNCER"; do
    command -v "$t" >/dev/null || { echo "missing tool: $t" >&2; exit 1; }
done
NGINX="$(command -v nginx)"

if [ "$BUILD" = 1 ]; then
    build_fencepost
fi
FENCEPOST="${CARGO_TARGET_DIR:-$ROOT/target}/release/fencepost"
[ -x "$FENCEPOST" ] || { echo "no fencepost binary at $FENCEPOST" >&2; exit 1; }

export PGCONNECT_TIMEOUT=10
pg() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p 5432 -U "$PGUSER_" "$@"; }

# ---------------------------------------------------------------- cleanup
# (cleanup, free_port, port, wait_http, expect_status: as in
# http_overhead.sh and pg_overhead.sh, copied: the two scripts share no
# library and these are a few lines each.)
TMP="$(mktemp -d /tmp/fencepost-tls.XXXXXX)"
chmod 755 "$TMP"   # nginx workers run as nobody, pgbouncer as postgres, when started by root
PIDS=()
DB_CREATED=0
cleanup() {
    local rc=$?
    set +e
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    if [ "$DB_CREATED" = 1 ]; then
        timeout 30 dropdb -h 127.0.0.1 -p 5432 -U "$PGUSER_" --if-exists --force "$DB" \
            || echo "could not drop database $DB" >&2
    fi
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
        if curl -s -o /dev/null --max-time 1 --cacert "$CERTS/ca.pem" "$url"; then return 0; fi
        sleep 0.1
    done
    echo "$what did not answer at $url within 10 s" >&2
    exit 1
}

expect_status() { # want, curl args...
    local want="$1"; shift
    local got
    got="$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 --cacert "$CERTS/ca.pem" "$@")"
    if [ "$got" != "$want" ]; then
        echo "sanity check failed: curl $* -> $got, want $want" >&2
        exit 1
    fi
}

wait_pg() { # port, what, pid, sslmode: up to 10 s for a query to answer
    local port="$1" what="$2" pid="$3" mode="$4"
    for _ in $(seq 100); do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "$what exited during start-up; its log:" >&2
            cat "$TMP/$what.log" >&2 2>/dev/null
            exit 1
        fi
        if PGSSLMODE="$mode" PGCONNECT_TIMEOUT=1 psql -X -h 127.0.0.1 -p "$port" -U "$PGUSER_" -d "$DB" \
            -tAc 'SELECT 1' >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    echo "$what did not answer on port $port within 10 s" >&2
    exit 1
}

# One test CA and a server certificate for 127.0.0.1 and localhost, used by
# every TLS target alike (same key type, same chain length).
CERTS="$TMP/certs"
"$FENCEPOST" keygen tls --out "$CERTS" --san 127.0.0.1 --san localhost >"$TMP/keygen.log" 2>&1 \
    || { cat "$TMP/keygen.log" >&2; exit 1; }
chmod 755 "$CERTS"; chmod 644 "$CERTS"/server.key   # throwaway key: pgbouncer (as postgres) reads it
KEY_TYPE="$(openssl x509 -in "$CERTS/server.pem" -noout -text \
    | awk -F': ' '/Public Key Algorithm/ {a = $2} /ASN1 OID|Public-Key:/ {k = $2} END {print a " " k}')"

mkdir -p "$RESULTS"
RAW="$RESULTS/tls_overhead.txt"
MANIFEST="$TMP/manifest.tsv"
: >"$RAW"
printf 'path\tworkload\ttarget\tround\tfile\n' >"$MANIFEST"
RUN=0
declare -A PORT=()
declare -A SCHEME=()

# Negotiated protocol and cipher of a TLS target, for the record: the two
# peers must be compared on the same suite.
tls_params() { # port [openssl s_client args]
    openssl s_client -connect "127.0.0.1:$1" -CAfile "$CERTS/ca.pem" "${@:2}" </dev/null 2>/dev/null \
        | awk '/^New, / {sub(",", "", $2); print $2 "/" $NF; exit}'
}

LOAD_START="$(cut -d' ' -f1 /proc/loadavg)"
if awk -v l="$LOAD_START" -v n="$(nproc)" 'BEGIN { exit !(l > n / 2) }'; then
    log "warning: load average is $LOAD_START before the load starts; other work on this machine will skew the numbers"
fi
META=()

# ================================================================ HTTP
if [ "$DO_HTTP" = 1 ]; then
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

UP_PORT="$(port)"
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

nginx_proxy_conf() { # dir port tls(0|1)
    nginx_common "$1"
    local listen="listen 127.0.0.1:$2;"
    # TLS 1.2 and 1.3 as fencepost; nginx's default session settings (no
    # resumption happens anyway: wrk's client does not resume).
    [ "$3" = 1 ] && listen="listen 127.0.0.1:$2 ssl;
        ssl_certificate $CERTS/server.pem;
        ssl_certificate_key $CERTS/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;"
    cat <<EOF
    upstream backend {
        server 127.0.0.1:$UP_PORT;
        keepalive 64;
    }
    server {
        $listen
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
}

fencepost_http_conf() { # dir port tls(0|1)
    cat <<EOF
store = "sqlite://$1/fencepost.db"

[log]
level = "info"

[[http]]
listen = "127.0.0.1:$2"
upstream = "http://127.0.0.1:$UP_PORT"
routes = [{ prefix = "/", resource = "bench" }]
workers = 1
EOF
    if [ "$3" = 1 ]; then
        printf 'tls_cert = "%s"\ntls_key = "%s"\n' "$CERTS/server.pem" "$CERTS/server.key"
    fi
}

log "starting upstream nginx on 127.0.0.1:$UP_PORT"
"$NGINX" -p "$UP" -c "$UP/nginx.conf" -e "$UP/error.log" >"$TMP/upstream.log" 2>&1 &
PIDS+=("$!")
wait_http "http://127.0.0.1:$UP_PORT/item" upstream "$!"

HTTP_TARGETS=(nginx nginx-tls fencepost fencepost-tls)
for t in "${HTTP_TARGETS[@]}"; do
    d="$TMP/http-$t"; mkdir -p "$d"; PORT[$t]="$(port)"
    tls=0; SCHEME[$t]=http; [[ "$t" == *-tls ]] && { tls=1; SCHEME[$t]=https; }
    url="${SCHEME[$t]}://127.0.0.1:${PORT[$t]}/item"
    log "starting http $t on 127.0.0.1:${PORT[$t]}"
    case "$t" in
        nginx*)
            nginx_proxy_conf "$d" "${PORT[$t]}" "$tls" >"$d/nginx.conf"
            "$NGINX" -p "$d" -c "$d/nginx.conf" -e "$d/error.log" >"$TMP/$t.log" 2>&1 & ;;
        fencepost*)
            # As http_overhead.sh's fencepost-1w: one relay thread, one
            # tokio worker for the rest.
            fencepost_http_conf "$d" "${PORT[$t]}" "$tls" >"$d/fencepost.toml"
            env -u RUST_LOG TOKIO_WORKER_THREADS=1 "$FENCEPOST" serve --config "$d/fencepost.toml" >"$TMP/$t.log" 2>&1 & ;;
    esac
    PIDS+=("$!")
    wait_http "$url" "$t" "$!"
    expect_status 200 "$url"
    expect_status 200 -X PUT -H 'Fencing-Token: 1' --data x "$url"
    # A new connection per request is what the handshake phase measures:
    # check that the target really closes after `Connection: close`.
    hdr="$(curl -s -D - -o /dev/null --max-time 5 --cacert "$CERTS/ca.pem" -H 'Connection: close' "$url" | tr -d '\r')"
    grep -qi '^connection: close' <<<"$hdr" || { echo "sanity check failed: $t does not answer Connection: close with close:" >&2; echo "$hdr" >&2; exit 1; }
done
expect_status 409 -X PUT -H 'Fencing-Token: 0' --data x "https://127.0.0.1:${PORT[fencepost-tls]}/item"
META+=("http_tls_nginx=$(tls_params "${PORT[nginx-tls]}")" "http_tls_fencepost=$(tls_params "${PORT[fencepost-tls]}")")

cat >"$TMP/put.lua" <<'EOF'
wrk.method = "PUT"
wrk.body = string.rep("x", 64)
wrk.headers["Fencing-Token"] = "1"
wrk.headers["Content-Type"] = "text/plain"
EOF

run_wrk() { # workload target round duration (round 0: warm-up, not recorded)
    local workload="$1" target="$2" round="$3" dur="$4"
    local url="${SCHEME[$target]}://127.0.0.1:${PORT[$target]}/item"
    local args=(-t1 -c"$CONNS" -d"${dur}s" --latency --timeout 5s)
    case "$workload" in
        PUT) args+=(-s "$TMP/put.lua") ;;
        handshake) args=(-t1 -c"$HS_CONNS" -d"${dur}s" --latency --timeout 5s -H 'Connection: close') ;;
    esac
    RUN=$((RUN + 1))
    local out="$TMP/run-$RUN.txt"
    if ! timeout --kill-after=5 $((dur + 30)) wrk "${args[@]}" "$url" >"$out" 2>&1; then
        echo "wrk failed for $target $workload:" >&2; cat "$out" >&2; exit 1
    fi
    for pid in "${PIDS[@]}"; do
        kill -0 "$pid" 2>/dev/null || { echo "a server died during the $target run; see $TMP" >&2; exit 1; }
    done
    [ "$round" = 0 ] && return 0
    { echo "### http workload=$workload target=$target round=$round"
      echo "### wrk ${args[*]} $url"
      cat "$out"; echo; } >>"$RAW"
    printf 'http\t%s\t%s\t%s\t%s\n' "$workload" "$target" "$round" "$out" >>"$MANIFEST"
    printf '[bench %(%H:%M:%S)T] http %-9s %-13s round %s: %s\n' -1 "$workload" "$target" "$round" \
        "$(awk '/^Requests\/sec/ {print $2 " req/s"}' "$out")" >&2
}

log "HTTP: ~$(( (3 * ROUNDS * DURATION + 3 * 2) * 4 / 60 + 1 )) min of wrk ($ROUNDS rounds x ${DURATION}s, 4 targets, 3 workloads)"
for workload in GET PUT handshake; do
    for t in "${HTTP_TARGETS[@]}"; do run_wrk "$workload" "$t" 0 2; done
    for r in $(seq "$ROUNDS"); do
        for t in "${HTTP_TARGETS[@]}"; do run_wrk "$workload" "$t" "$r" "$DURATION"; done
    done
done
fi # DO_HTTP

# ================================================================ Postgres
if [ "$DO_PG" = 1 ]; then
pg -d postgres -tAc 'SELECT 1' >/dev/null || { echo "no Postgres at 127.0.0.1:5432 (user $PGUSER_, trust)" >&2; exit 1; }
log "creating database $DB and running pgbench -i -s $SCALE"
createdb -h 127.0.0.1 -p 5432 -U "$PGUSER_" "$DB"
DB_CREATED=1
timeout 600 pgbench -h 127.0.0.1 -p 5432 -U "$PGUSER_" -i -s "$SCALE" -q "$DB" >"$TMP/pgbench-init.log" 2>&1 \
    || { cat "$TMP/pgbench-init.log" >&2; exit 1; }

PGB_PORT="$(port)"; PGBT_PORT="$(port)"; FP_PORT="$(port)"; FPT_PORT="$(port)"
pgbouncer_conf() { # dir port tls(0|1)
    cat <<EOF
[databases]
$DB = host=127.0.0.1 port=5432 dbname=$DB

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $2
unix_socket_dir =
auth_type = trust
auth_file = $1/userlist.txt
pool_mode = session
default_pool_size = $CLIENTS
max_client_conn = 200
server_idle_timeout = 5
ignore_startup_parameters = options,extra_float_digits
logfile = $1/pgbouncer.log
pidfile = $1/pgbouncer.pid
log_connections = 0
log_disconnections = 0
; The server side stays plain text, as fencepost's (upstream_sslmode
; defaults to disable); PgBouncer's default, prefer, would encrypt it.
server_tls_sslmode = disable
EOF
    if [ "$3" = 1 ]; then
        printf 'client_tls_sslmode = require\nclient_tls_key_file = %s\nclient_tls_cert_file = %s\n' \
            "$CERTS/server.key" "$CERTS/server.pem"
    else
        printf 'client_tls_sslmode = disable\n'
    fi
}
fencepost_pg_conf() { # dir port tls(0|1)
    cat <<EOF
store = "sqlite://$1/fencepost.db"

[log]
level = "info"

[[postgres]]
listen = "127.0.0.1:$2"
upstream = "127.0.0.1:5432"
enforce = "proxy"
EOF
    if [ "$3" = 1 ]; then
        printf 'tls_cert = "%s"\ntls_key = "%s"\n' "$CERTS/server.pem" "$CERTS/server.key"
    fi
}

PG_TARGETS=(pgbouncer pgbouncer-tls fencepost fencepost-tls)
declare -A PGPORT=([pgbouncer]="$PGB_PORT" [pgbouncer-tls]="$PGBT_PORT" [fencepost]="$FP_PORT" [fencepost-tls]="$FPT_PORT")
declare -A SSLMODE=([pgbouncer]=disable [pgbouncer-tls]=require [fencepost]=disable [fencepost-tls]=require)
for t in "${PG_TARGETS[@]}"; do
    d="$TMP/pg-$t"; mkdir -p "$d"; tls=0; [[ "$t" == *-tls ]] && tls=1
    log "starting pg $t on 127.0.0.1:${PGPORT[$t]}"
    case "$t" in
        pgbouncer*)
            printf '"%s" ""\n' "$PGUSER_" >"$d/userlist.txt"
            pgbouncer_conf "$d" "${PGPORT[$t]}" "$tls" >"$d/pgbouncer.ini"
            chown -R postgres "$d" 2>/dev/null || true
            "$PGBOUNCER" -u postgres "$d/pgbouncer.ini" >"$TMP/$t.log" 2>&1 & ;;
        fencepost*)
            fencepost_pg_conf "$d" "${PGPORT[$t]}" "$tls" >"$d/fencepost.toml"
            env -u RUST_LOG "$FENCEPOST" serve --config "$d/fencepost.toml" >"$TMP/$t.log" 2>&1 & ;;
    esac
    PIDS+=("$!")
    wait_pg "${PGPORT[$t]}" "$t" "$!" "${SSLMODE[$t]}"
done
# The TLS targets really speak TLS (libpq reports it), and refuse plain text.
for t in pgbouncer-tls fencepost-tls; do
    on="$(PGSSLMODE=require psql -X -h 127.0.0.1 -p "${PGPORT[$t]}" -U "$PGUSER_" -d "$DB" -tAc \
        'SELECT 1' -c '\conninfo' 2>&1 | grep -o 'SSL connection ([^)]*)' || true)"
    [ -n "$on" ] || { echo "sanity check failed: $t: no SSL connection reported" >&2; exit 1; }
    META+=("pg_tls_$t=$on")
    if PGSSLMODE=disable psql -X -h 127.0.0.1 -p "${PGPORT[$t]}" -U "$PGUSER_" -d "$DB" -tAc 'SELECT 1' >/dev/null 2>&1; then
        echo "sanity check failed: $t accepted a plaintext connection" >&2; exit 1
    fi
done
export PGOPTIONS='-c fencing.token=1 -c fencing.resource=bench'
pg -d "$DB" -c 'VACUUM ANALYZE' >/dev/null

run_pgbench() { # workload target round duration (round 0: warm-up)
    local workload="$1" target="$2" round="$3" dur="$4"
    local args=(-n -S -c "$CLIENTS" -j 2 -T "$dur")
    case "$workload" in
        "select -M simple") args+=(-M simple) ;;
        "select -M prepared") args+=(-M prepared) ;;
        "connect -C") args+=(-M simple -C) ;;
    esac
    RUN=$((RUN + 1))
    local out="$TMP/run-$RUN.txt"
    local cmd=(pgbench -h 127.0.0.1 -p "${PGPORT[$target]}" -U "$PGUSER_" "${args[@]}" "$DB")
    if ! PGSSLMODE="${SSLMODE[$target]}" timeout --kill-after=5 $((dur + 60)) "${cmd[@]}" >"$out" 2>&1; then
        echo "pgbench failed for $target $workload:" >&2; tail -20 "$out" >&2; exit 1
    fi
    for pid in "${PIDS[@]}"; do
        kill -0 "$pid" 2>/dev/null || { echo "a server died during the $target run; see $TMP" >&2; exit 1; }
    done
    [ "$round" = 0 ] && return 0
    { echo "### pg workload=$workload target=$target round=$round"
      echo "### PGSSLMODE=${SSLMODE[$target]} PGOPTIONS='$PGOPTIONS' ${cmd[*]}"
      grep -v '^pgbench: ' "$out" || true; echo; } >>"$RAW"
    printf 'pg\t%s\t%s\t%s\t%s\n' "$workload" "$target" "$round" "$out" >>"$MANIFEST"
    printf '[bench %(%H:%M:%S)T] pg   %-18s %-13s round %s: %s\n' -1 "$workload" "$target" "$round" \
        "$(awk '/^tps = / {print $3 " tps"}' "$out")" >&2
}

log "Postgres: ~$(( (3 * ROUNDS * (DURATION + 1) + 3 * 3) * 4 / 60 + 1 )) min of pgbench ($ROUNDS rounds x ${DURATION}s, 4 targets, 3 workloads)"
for workload in "select -M simple" "select -M prepared" "connect -C"; do
    for t in "${PG_TARGETS[@]}"; do run_pgbench "$workload" "$t" 0 2; done
    for r in $(seq "$ROUNDS"); do
        for t in "${PG_TARGETS[@]}"; do run_pgbench "$workload" "$t" "$r" "$DURATION"; done
    done
done
META+=("postgres=$(pg -d postgres -tAc 'SHOW server_version' | awk '{print $1}')"
       "pgbouncer=$("$PGBOUNCER" --version 2>&1 | head -1 | awk '{print $2}')"
       "pgbench=$(pgbench --version | awk '{print $3}')")
fi # DO_PG

# ---------------------------------------------------------------- report
LOAD_END="$(cut -d' ' -f1-3 /proc/loadavg)"
python3 "$HELPER" report --manifest "$MANIFEST" --out "$RESULTS" \
    --meta "rounds=$ROUNDS" "duration_s=$DURATION" "connections=$CONNS" "handshake_connections=$HS_CONNS" \
           "clients=$CLIENTS" "scale=$SCALE" "cpus=$(nproc)" "kernel=$(uname -r)" \
           "nginx=$("$NGINX" -v 2>&1 | sed 's/.*\///')" "openssl=$(openssl version | awk '{print $2}')" \
           "wrk=$(wrk --version 2>&1 | head -1 | awk '{print $2}')" "server_key=$KEY_TYPE" \
           "fencepost_commit=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
           "loadavg_start=$LOAD_START" "loadavg_end=$LOAD_END" "${META[@]}"
