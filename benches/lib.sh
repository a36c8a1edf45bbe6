# Shared by the bench scripts (sourced, after they set HERE and ROOT and
# define `log`): what every one of them repeated word for word.

# The script's header comment (every `#` line after the shebang, up to the
# first line of code), printed as its --help: no line range to keep in step.
usage_from_header() {
    awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$1" | sed 's/^# \{0,1\}//'
}

# Plain text on every Postgres connection the scripts make, unless a script
# sets PGSSLMODE itself for one command (tls_overhead.sh does, per target).
# libpq's default (prefer) would negotiate TLS wherever the far end offers
# it: with a server that has ssl on (the machine's does), the direct and
# relay targets would run TLS while PgBouncer and fencepost (no TLS
# configured) run plain, and pgbench and the backends would spend the
# difference (pg_cpu.sh measured 30-50 us more pgbench CPU per TPC-B-like
# transaction through a relay that passed TLS through).
export PGSSLMODE=disable

# A port free on 127.0.0.1 now (the kernel's pick).
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# Distinct free ports, one per server.
declare -A TAKEN=()
port() {
    local p
    p="$(free_port)"
    while [ -n "${TAKEN[$p]:-}" ]; do p="$(free_port)"; done
    TAKEN[$p]=1
    echo "$p"
}

# Resident and peak resident memory of a process, in kB (0 once it is gone).
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
hwm_kb() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# The release binary the scripts measure, built from this checkout.
build_fencepost() {
    log "building fencepost (release)"
    (cd "$ROOT" && cargo build --release --bin fencepost)
}

# The targets in the order round R runs them (`round_order R t1 t2 ...`,
# one per line): rotated one place further each round. A fixed order puts
# the same target last in every round, where whatever builds up over a
# round (pgbench's tables and their dead rows, dirty pages waiting for a
# checkpoint, a warm or throttled CPU) lands on it alone; rotated, it
# lands on each target in turn and the medians compare like with like.
round_order() {
    local r="$1"; shift
    local n=$# i
    local -a t=("$@")
    for ((i = 0; i < n; i++)); do echo "${t[$(( (i + r - 1) % n ))]}"; done
}

# A PgBouncer config with session pooling for database DB of the machine's
# Postgres, listening on 127.0.0.1:PORT, written to INI with its userlist
# (user postgres, trust) beside it (`pgbouncer_session_ini INI DB PORT
# [line ...]`; each further argument is one more line of [pgbouncer]).
pgbouncer_session_ini() {
    local ini="$1" db="$2" port="$3" dir
    shift 3
    dir="$(dirname "$ini")"
    printf '"postgres" ""\n' >"$dir/userlist.txt"
    {
        printf '[databases]\n%s = host=127.0.0.1 port=5432 dbname=%s\n[pgbouncer]\n' "$db" "$db"
        printf '%s\n' "listen_addr = 127.0.0.1" "listen_port = $port" "unix_socket_dir =" \
            "auth_type = trust" "auth_file = $dir/userlist.txt" "pool_mode = session" \
            "ignore_startup_parameters = options,extra_float_digits" "$@"
    } >"$ini"
}
