#!/usr/bin/env bash
# The shardwire demo: four local shards, the router in front of them, and demo data.
#
#   scripts/demo.sh          install what is missing, build, start the shards of
#                            shard-config.yaml, create the schema on every shard, start
#                            the router, load demo data through it, print how to connect
#   scripts/demo.sh stop     stop the router and the shards
#   scripts/demo.sh status   show the router and shards
#
# The router runs in the background; its log and pid file are in target/demo/.
# With a terminal on stdin (and CI unset) the script ends in a psql session.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROG="demo"
# shellcheck source=scripts/common.sh
source "$REPO_ROOT/scripts/common.sh"

CONFIG="$REPO_ROOT/shard-config.yaml"
RUN_DIR="$REPO_ROOT/target/demo"
PID_FILE="$RUN_DIR/router.pid"
LOG_FILE="$RUN_DIR/router.log"
SHARDWIRE_BIN="${SHARDWIRE_BIN:-$REPO_ROOT/target/release/shardwire}"
export SHARDWIRE_BIN

# Demo data sizes.
N_USERS=5000
N_ORDERS=20000
N_EVENTS=5000
N_ACCOUNTS=400

# The router's address (`listen` in the config; default 127.0.0.1:6432).
listen_addr() {
    local addr
    addr="$(awk '/^listen:/ { print $2; exit }' "$CONFIG")"
    printf '%s\n' "${addr:-127.0.0.1:6432}"
}
ROUTER_HOST="$(listen_addr)"
ROUTER_PORT="${ROUTER_HOST##*:}"
ROUTER_HOST="${ROUTER_HOST%:*}"
# What clients log in as (the first user of shard-config.yaml: app / app-secret).
DEMO_USER=app
DEMO_PASSWORD=app-secret
DEMO_DB=app

router_pid() {
    local pid
    [[ -f "$PID_FILE" ]] || return 1
    pid="$(cat "$PID_FILE")"
    # Only a live shardwire process counts (the pid may have been reused).
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null &&
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q shardwire || return 1
    printf '%s\n' "$pid"
}

router_psql() {
    PGPASSWORD="$DEMO_PASSWORD" PGCONNECT_TIMEOUT=5 psql -X -h "$ROUTER_HOST" -p "$ROUTER_PORT" \
        -U "$DEMO_USER" -d "$DEMO_DB" -v ON_ERROR_STOP=1 "$@"
}

start_router() {
    local pid
    if pid="$(router_pid)"; then
        say "router already running (pid $pid, log $LOG_FILE)"
        return 0
    fi
    mkdir -p "$RUN_DIR"
    say "starting the router: $SHARDWIRE_BIN serve --config $CONFIG (log $LOG_FILE)"
    # setsid: the router keeps running after this script (and its terminal) ends.
    setsid "$SHARDWIRE_BIN" serve --config "$CONFIG" </dev/null >>"$LOG_FILE" 2>&1 &
    echo $! >"$PID_FILE"
    local i
    for i in $(seq 1 60); do
        if ! router_pid >/dev/null; then
            tail -n 20 "$LOG_FILE" >&2 || true
            rm -f "$PID_FILE"
            die "the router exited during startup (log: $LOG_FILE)"
        fi
        if router_psql -q -At -c 'SELECT 1' </dev/null >/dev/null 2>&1; then
            say "router accepts connections on $ROUTER_HOST:$ROUTER_PORT"
            return 0
        fi
        sleep 0.5
    done
    tail -n 20 "$LOG_FILE" >&2 || true
    die "the router did not accept connections within 30 s (log: $LOG_FILE)"
}

stop_router() {
    local pid i
    if ! pid="$(router_pid)"; then
        say "router not running"
        rm -f "$PID_FILE"
        return 0
    fi
    kill -TERM "$pid"
    for i in $(seq 1 40); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.25
    done
    if kill -0 "$pid" 2>/dev/null; then
        warn "router (pid $pid) did not stop after SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$PID_FILE"
    say "router stopped"
}

# Rows already in the demo tables, counted on each shard directly.
existing_users() {
    local total=0 list name host port db user pw n
    list="$(list_shards "$CONFIG")"
    while IFS=$'\t' read -r name host port db user pw; do
        [[ -n "$name" ]] || continue
        n="$(PGPASSWORD="$pw" psql -X -At -h "$host" -p "$port" -U "$user" -d "$db" \
            -c 'SELECT count(*) FROM users' </dev/null)" || die "cannot count users on $name"
        total=$((total + n))
    done <<<"$list"
    printf '%s\n' "$total"
}

# Single-row INSERTs, generated here (no server-side generate_series through the router).
demo_data() {
    awk -v users="$N_USERS" -v orders="$N_ORDERS" -v events="$N_EVENTS" \
        -v accounts="$N_ACCOUNTS" 'BEGIN {
        split("new paid shipped delivered cancelled", status, " ")
        split("login view click purchase logout", kind, " ")
        for (i = 1; i <= users; i++)
            printf "INSERT INTO users (user_id, name, email) VALUES (%d, %s, %s);\n",
                i, "'"'"'user " i "'"'"'", "'"'"'user" i "@example.com'"'"'"
        for (i = 1; i <= orders; i++)
            printf "INSERT INTO orders (order_id, user_id, amount, status) VALUES (%d, %d, %d.%02d, %s);\n",
                i, (i * 7919) % users + 1, (i * 37 + int(i / users) * 101) % 1000, (i * 13) % 100,
                "'"'"'" status[i % 5 + 1] "'"'"'"
        for (i = 1; i <= events; i++)
            printf "INSERT INTO events (user_id, event_id, kind, payload) VALUES (%d, %d, %s, %s);\n",
                (i * 104729) % users + 1, i, "'"'"'" kind[i % 5 + 1] "'"'"'",
                "'"'"'{\"seq\": " i "}'"'"'"
        # 10000 apart: accounts fall in all four ranges of the `accounts` distribution.
        for (i = 1; i <= accounts; i++)
            printf "INSERT INTO accounts (account_id, owner, balance) VALUES (%d, %s, %d.%02d);\n",
                i * 10000, "'"'"'user " (i % users) + 1 "'"'"'", (i * 311) % 10000, i % 100
    }'
}

load_data() {
    local have
    have="$(existing_users)"
    if [[ "$have" -gt 0 ]]; then
        say "demo data already loaded ($have users); skipping"
        return 0
    fi
    say "loading $N_USERS users, $N_ORDERS orders, $N_EVENTS events and $N_ACCOUNTS accounts through the router"
    demo_data | router_psql -q >/dev/null || die "loading demo data through the router failed"
    say "demo data loaded"
}

print_usage_hint() {
    cat <<HINT

shardwire is running on $ROUTER_HOST:$ROUTER_PORT in front of 4 shards. Connect with:

    PGPASSWORD=$DEMO_PASSWORD psql -h $ROUTER_HOST -p $ROUTER_PORT -U $DEMO_USER $DEMO_DB

Try:
    SELECT * FROM users WHERE user_id = 42;                       -- one shard
    SELECT order_id, amount, status FROM orders WHERE user_id = 42 ORDER BY order_id;  -- one shard, any shape
    SELECT user_id, order_id, amount FROM orders WHERE amount > 995;  -- fan-out to all shards, rows concatenated
    SELECT count(*) FROM orders;                                  -- refused (0A000): cross-shard aggregates are not merged yet
    SELECT * FROM accounts WHERE account_id BETWEEN 990000 AND 1010000;  -- range distribution: shards s0 and s1
    SELECT * FROM countries ORDER BY code;                        -- reference table (any one shard)

Explain a routing decision offline:
    $SHARDWIRE_BIN route --config shard-config.yaml "SELECT * FROM users WHERE user_id = 42"

Stop everything with: scripts/demo.sh stop
HINT
}

cmd_start() {
    ensure_system_packages
    say "building (cargo build --release --bin shardwire)"
    (cd "$REPO_ROOT" && cargo build --release --bin shardwire) </dev/null ||
        die "build failed"
    bash "$REPO_ROOT/scripts/shards.sh" start "$CONFIG"
    load_schema "$CONFIG"
    start_router
    load_data
    print_usage_hint
    if [[ -t 0 && -t 1 && -z "${CI:-}" ]]; then
        say "opening psql (\\q to leave; the router and shards keep running)"
        PGPASSWORD="$DEMO_PASSWORD" exec psql -h "$ROUTER_HOST" -p "$ROUTER_PORT" -U "$DEMO_USER" "$DEMO_DB"
    fi
}

cmd_stop() {
    stop_router
    if [[ -x "$SHARDWIRE_BIN" ]]; then
        bash "$REPO_ROOT/scripts/shards.sh" stop "$CONFIG"
    else
        warn "$SHARDWIRE_BIN not built; cannot read the shard list to stop shards"
    fi
}

cmd_status() {
    local pid rc=0
    if pid="$(router_pid)"; then
        say "router: up (pid $pid, $ROUTER_HOST:$ROUTER_PORT, log $LOG_FILE)"
    else
        say "router: down"
        rc=3
    fi
    bash "$REPO_ROOT/scripts/shards.sh" status "$CONFIG" || rc=3
    return "$rc"
}

usage() { sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

case "${1:-start}" in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
-h | --help | help) usage ;;
*)
    usage >&2
    exit 2
    ;;
esac
