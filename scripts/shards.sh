#!/usr/bin/env bash
# Local PostgreSQL 15 servers for the shards of a shardwire config.
#
#   scripts/shards.sh start    [CONFIG]   create (first time) and start every shard server
#   scripts/shards.sh stop     [CONFIG]   stop every shard server
#   scripts/shards.sh status   [CONFIG]   print each shard up/down (exit 0 = all up, 3 = some down)
#   scripts/shards.sh restart  [CONFIG]   stop, then start
#   scripts/shards.sh stop-one  NAME [CONFIG]   stop the server of one shard (failure tests)
#   scripts/shards.sh start-one NAME [CONFIG]   start it again
#
# CONFIG defaults to ./shard-config.yaml. The shard list comes from
# `shardwire check --config CONFIG --list-shards`; the binary is $SHARDWIRE_BIN, or
# target/release/shardwire (built first if missing or older than the sources).
#
# Each distinct local port gets one PostgreSQL cluster in .shards/<port>/ of the repo
# (or /tmp/shardwire-shards/<port>/ when the postgres OS user cannot reach the repo),
# listening on 127.0.0.1 only, with its unix socket inside the data directory and its
# log in <data dir>/server.log. `start` also makes sure each shard's role (with its SCRAM
# password) and database exist, so re-running it on running servers is a cheap no-op.
# Shards on other hosts are not managed and are skipped with a note.
#
# These clusters are for local development and tests only: fsync is off (see below).
#
# Environment:
#   SHARDWIRE_BIN      shardwire binary to use (default: build target/release/shardwire)
#   SHARDS_DIR         base directory for data directories (default: see above)
#   SHARDS_SUPERUSER   1 (default): shard roles are superusers, which PostgreSQL 15 requires
#                      for CREATE SUBSCRIPTION (rebalancing); 0: plain LOGIN REPLICATION roles
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROG="shards"

say() { printf '%s: %s\n' "$PROG" "$*"; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
die() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}

usage() {
    sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

is_root() { [[ "$(id -u)" -eq 0 ]]; }

# Run a command as root (directly, or through sudo without a password prompt).
as_root() {
    if is_root; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        die "need root to run: $*"
    fi
}

# ---------------------------------------------------------------------------
# The shardwire binary

shardwire_bin() {
    if [[ -n "${SHARDWIRE_BIN:-}" ]]; then
        [[ -x "$SHARDWIRE_BIN" ]] || die "SHARDWIRE_BIN=$SHARDWIRE_BIN is not an executable"
        printf '%s\n' "$SHARDWIRE_BIN"
        return
    fi
    local target="${CARGO_TARGET_DIR:-$REPO_ROOT/target}"
    [[ "$target" = /* ]] || target="$REPO_ROOT/$target"
    local bin="$target/release/shardwire"
    if [[ ! -x "$bin" ]] || [[ -n "$(find "$REPO_ROOT/src" "$REPO_ROOT/Cargo.toml" \
        "$REPO_ROOT/Cargo.lock" -newer "$bin" -print -quit 2>/dev/null)" ]]; then
        say "making sure $bin is up to date (cargo build --release --bin shardwire)" >&2
        (cd "$REPO_ROOT" && cargo build --release --bin shardwire) </dev/null >&2 ||
            die "cargo build --release --bin shardwire failed"
    fi
    printf '%s\n' "$bin"
}

# ---------------------------------------------------------------------------
# PostgreSQL binaries

# Print the bin directory of PostgreSQL 15 server binaries, if present.
find_pg_bindir() {
    local d
    for d in "$(pg_config --bindir 2>/dev/null || true)" /usr/lib/postgresql/15/bin; do
        [[ -n "$d" && -x "$d/initdb" && -x "$d/pg_ctl" && -x "$d/postgres" ]] || continue
        if "$d/postgres" --version 2>/dev/null | grep -q ' 15\.'; then
            printf '%s\n' "$d"
            return 0
        fi
    done
    return 1
}

ensure_postgres() {
    if PG_BIN="$(find_pg_bindir)"; then
        return
    fi
    command -v apt-get >/dev/null 2>&1 ||
        die "PostgreSQL 15 server binaries not found and apt-get is unavailable; install PostgreSQL 15"
    say "PostgreSQL 15 server binaries not found; installing with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update -q </dev/null || die "apt-get update failed"
    as_root apt-get install -y -q postgresql-15 </dev/null ||
        as_root apt-get install -y -q postgresql </dev/null ||
        die "apt-get install postgresql failed"
    PG_BIN="$(find_pg_bindir)" ||
        die "PostgreSQL 15 still not found after installing (is this distribution's postgresql 15?)"
}

# ---------------------------------------------------------------------------
# Running cluster commands: initdb and pg_ctl refuse to run as root, so as root they run
# as the postgres OS user, from a directory that user can enter.

PG_USER_ARGS=()
setup_pg_user() {
    if is_root; then
        if ! id postgres >/dev/null 2>&1; then
            say "creating the postgres OS user"
            useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres ||
                die "could not create the postgres OS user"
        fi
        PG_USER_ARGS=(runuser -u postgres --)
    fi
}

as_pg() { (cd / && "${PG_USER_ARGS[@]}" "$@"); }

# Whether the cluster user can create and enter directories under $1.
pg_can_use() {
    if is_root; then
        runuser -u postgres -- test -x "$1" -a -w "$1" 2>/dev/null
    else
        test -x "$1" -a -w "$1"
    fi
}

# Choose (and create) the base directory for data directories; sets SHARDS_BASE.
choose_base() {
    if [[ -n "${SHARDS_DIR:-}" ]]; then
        SHARDS_BASE="$SHARDS_DIR"
    else
        SHARDS_BASE="$REPO_ROOT/.shards"
        # A unix socket path must stay under ~107 bytes: <base>/<port>/.s.PGSQL.<port>.
        if [[ ${#SHARDS_BASE} -gt 70 ]]; then
            SHARDS_BASE=/tmp/shardwire-shards
        fi
    fi
    mkdir -p "$SHARDS_BASE"
    if is_root && [[ "$(stat -c %U "$SHARDS_BASE")" != postgres ]]; then
        chown postgres: "$SHARDS_BASE"
    fi
    if ! pg_can_use "$SHARDS_BASE"; then
        [[ -z "${SHARDS_DIR:-}" ]] || die "the postgres OS user cannot use SHARDS_DIR=$SHARDS_DIR"
        # Typically a repo under /root: some parent directory is not traversable.
        say "the postgres OS user cannot reach $SHARDS_BASE; using /tmp/shardwire-shards"
        SHARDS_BASE=/tmp/shardwire-shards
        mkdir -p "$SHARDS_BASE"
        if is_root; then chown postgres: "$SHARDS_BASE"; fi
        pg_can_use "$SHARDS_BASE" || die "the postgres OS user cannot use $SHARDS_BASE"
    fi
}

# ---------------------------------------------------------------------------
# The shard list

CONFIG=""
NAMES=() HOSTS=() PORTS=() DBS=() USERS=() PASSWORDS=()

load_shards() {
    local cfg="$1"
    if [[ ! -f "$cfg" && "$cfg" != /* && -f "$REPO_ROOT/$cfg" ]]; then
        cfg="$REPO_ROOT/$cfg"
    fi
    [[ -f "$cfg" ]] || die "config file $cfg not found"
    CONFIG="$cfg"
    local bin list
    bin="$(shardwire_bin)"
    list="$("$bin" check --config "$cfg" --list-shards)" || die "$cfg is not a valid config (see above)"
    local name host port db user pw
    while IFS=$'\t' read -r name host port db user pw; do
        [[ -n "$name" ]] || continue
        NAMES+=("$name") HOSTS+=("$host") PORTS+=("$port") DBS+=("$db")
        USERS+=("$user") PASSWORDS+=("$pw")
    done <<<"$list"
    [[ ${#NAMES[@]} -gt 0 ]] || die "$cfg lists no shards"
}

is_local_host() { [[ "$1" == 127.0.0.1 || "$1" == localhost || "$1" == ::1 ]]; }

data_dir() { printf '%s/%s\n' "$SHARDS_BASE" "$1"; }

# Distinct local ports, in config order.
local_ports() {
    local i seen=" "
    for i in "${!NAMES[@]}"; do
        if ! is_local_host "${HOSTS[$i]}"; then
            continue
        fi
        case "$seen" in *" ${PORTS[$i]} "*) continue ;; esac
        seen+="${PORTS[$i]} "
        printf '%s\n' "${PORTS[$i]}"
    done
}

shard_index() {
    local i
    for i in "${!NAMES[@]}"; do
        if [[ "${NAMES[$i]}" == "$1" ]]; then
            printf '%s\n' "$i"
            return 0
        fi
    done
    die "no shard named '$1' in $CONFIG (shards: ${NAMES[*]})"
}

# ---------------------------------------------------------------------------
# One cluster

is_running() {
    local dir
    dir="$(data_dir "$1")"
    [[ -f "$dir/PG_VERSION" ]] && as_pg "$PG_BIN/pg_ctl" -D "$dir" status >/dev/null 2>&1
}

init_cluster() {
    local port="$1" dir
    dir="$(data_dir "$port")"
    [[ -f "$dir/PG_VERSION" ]] && return 0
    say "creating cluster for port $port in $dir"
    # C collation: text keys of range distributions compare bytewise, like the router.
    as_pg "$PG_BIN/initdb" -D "$dir" -U postgres --auth-local=trust \
        --auth-host=scram-sha-256 -E UTF8 --no-locale >"$SHARDS_BASE/initdb-$port.log" 2>&1 || {
        cat "$SHARDS_BASE/initdb-$port.log" >&2
        die "initdb failed for port $port"
    }
    as_pg sh -c "printf '%s\n' \"include_if_exists = 'shardwire.conf'\" >>'$dir/postgresql.conf'"
}

write_settings() {
    local port="$1" dir
    dir="$(data_dir "$port")"
    as_pg tee "$dir/shardwire.conf" >/dev/null <<EOF
# Written by scripts/shards.sh on every start; edit the script, not this file.
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
password_encryption = 'scram-sha-256'
max_connections = 200
shared_buffers = '128MB'
# Logical replication and two-phase commit, used by rebalancing and cross-shard writes.
wal_level = logical
max_wal_senders = 10
max_replication_slots = 10
max_prepared_transactions = 100
# Local development and tests only: trading crash safety for speed. Never in production.
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
    as_pg tee "$dir/pg_hba.conf" >/dev/null <<'EOF'
# Written by scripts/shards.sh. The postgres OS user administers over the unix socket;
# everyone else logs in over TCP on 127.0.0.1 with SCRAM-SHA-256.
local   all   postgres                 trust
host    all   all        127.0.0.1/32  scram-sha-256
EOF
}

start_cluster() {
    local port="$1" dir
    dir="$(data_dir "$port")"
    init_cluster "$port"
    write_settings "$port"
    if is_running "$port"; then
        say "port $port: already running"
        return 0
    fi
    if "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$port" -t 2 >/dev/null 2>&1; then
        die "port $port is already in use by another server (not $dir)"
    fi
    # setsid: the server must outlive this script's session and process group.
    if ! as_pg setsid -w "$PG_BIN/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 start 9>&- \
        </dev/null >/dev/null; then
        tail -n 20 "$dir/server.log" >&2 || true
        if tail -n 20 "$dir/server.log" 2>/dev/null | grep -q "Address already in use"; then
            say "hint: another program holds 127.0.0.1:$port; ports inside the kernel's ephemeral" \
                "range ($(tr '\t' '-' </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null)) can" \
                "also be taken by outgoing connections, so pick shard ports below it"
        fi
        die "port $port: server did not start (log: $dir/server.log)"
    fi
    say "port $port: started ($dir)"
}

stop_cluster() {
    local port="$1" dir
    dir="$(data_dir "$port")"
    if ! is_running "$port"; then
        say "port $port: not running"
        return 0
    fi
    as_pg "$PG_BIN/pg_ctl" -D "$dir" -m fast -w -t 60 stop >/dev/null ||
        die "port $port: server did not stop (log: $dir/server.log)"
    say "port $port: stopped"
}

# Make sure shard $1's role (with the configured password) and database exist.
ensure_role_db() {
    local i="$1" port dir super
    port="${PORTS[$i]}"
    dir="$(data_dir "$port")"
    if [[ "${SHARDS_SUPERUSER:-1}" == 1 ]]; then super=SUPERUSER; else super=NOSUPERUSER; fi
    # psql variables keep names and passwords safely quoted (%I, %L).
    as_pg "$PG_BIN/psql" -X -q -h "$dir" -p "$port" -U postgres -d postgres \
        -v ON_ERROR_STOP=1 -v role="${USERS[$i]}" -v pw="${PASSWORDS[$i]}" \
        -v db="${DBS[$i]}" -v super="$super" >/dev/null <<'SQL' ||
SELECT format('CREATE ROLE %I', :'role')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role') \gexec
SET password_encryption = 'scram-sha-256';
SELECT format('ALTER ROLE %I WITH LOGIN REPLICATION %s PASSWORD %L', :'role', :'super', :'pw') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'role')
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db') \gexec
SELECT format('ALTER DATABASE %I OWNER TO %I', :'db', :'role') \gexec
SQL
        die "shard ${NAMES[$i]}: could not create role ${USERS[$i]} / database ${DBS[$i]}"
}

ensure_roles_on_port() {
    local port="$1" i
    for i in "${!NAMES[@]}"; do
        if [[ "${PORTS[$i]}" == "$port" ]] && is_local_host "${HOSTS[$i]}"; then
            ensure_role_db "$i"
        fi
    done
}

# ---------------------------------------------------------------------------
# Commands

skip_remote() {
    local i
    for i in "${!NAMES[@]}"; do
        if ! is_local_host "${HOSTS[$i]}"; then
            warn "shard ${NAMES[$i]} is on ${HOSTS[$i]}, not this machine; not managed here"
        fi
    done
}

cmd_start() {
    skip_remote
    local port
    for port in $(local_ports); do
        start_cluster "$port"
        ensure_roles_on_port "$port"
    done
    say "all shards of $CONFIG are up (data under $SHARDS_BASE)"
}

cmd_stop() {
    local port
    for port in $(local_ports); do
        stop_cluster "$port"
    done
}

cmd_status() {
    local i state all_up=0
    for i in "${!NAMES[@]}"; do
        if ! is_local_host "${HOSTS[$i]}"; then
            state=remote
        elif is_running "${PORTS[$i]}"; then
            state=up
        else
            state=down
            all_up=3
        fi
        printf '%-12s %s:%-6s %-6s %s\n' "${NAMES[$i]}" "${HOSTS[$i]}" "${PORTS[$i]}" \
            "$state" "$(data_dir "${PORTS[$i]}")"
    done
    return "$all_up"
}

cmd_one() {
    local action="$1" name="$2" i port
    i="$(shard_index "$name")"
    is_local_host "${HOSTS[$i]}" || die "shard $name is on ${HOSTS[$i]}, not managed here"
    port="${PORTS[$i]}"
    if [[ "$action" == stop ]]; then
        stop_cluster "$port"
    else
        start_cluster "$port"
        ensure_roles_on_port "$port"
    fi
}

main() {
    [[ $# -ge 1 ]] || usage
    local cmd="$1" name=""
    shift
    case "$cmd" in
    start | stop | status | restart) ;;
    stop-one | start-one)
        [[ $# -ge 1 ]] || usage
        name="$1"
        shift
        ;;
    -h | --help | help) usage ;;
    *) usage ;;
    esac
    [[ $# -le 1 ]] || usage
    load_shards "${1:-./shard-config.yaml}"
    ensure_postgres
    setup_pg_user
    choose_base
    # One command at a time per base directory (tests may stop/start shards concurrently).
    exec 9>>"$SHARDS_BASE/.lock"
    flock -w 300 9 || die "another shards.sh is still running (lock $SHARDS_BASE/.lock)"
    case "$cmd" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    restart)
        cmd_stop
        cmd_start
        ;;
    stop-one) cmd_one stop "$name" ;;
    start-one) cmd_one start "$name" ;;
    esac
}

main "$@"
