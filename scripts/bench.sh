#!/usr/bin/env bash
# Benchmark: direct PostgreSQL vs PgBouncer vs shardwire (1 and 4 shards), with pgbench.
#
#   scripts/bench.sh [--rounds N] [--duration SECONDS] [--scale N]   full run → BENCHMARKS.md
#   scripts/bench.sh --smoke                                         seconds long; exit ≠ 0 if
#                                                                    any run against shardwire
#                                                                    had errors (CI)
#   scripts/bench.sh --hold                                          set everything up, print
#                                                                    the targets' ports and
#                                                                    pids, and wait (for perf,
#                                                                    strace, ad-hoc pgbench)
#
# Builds the release binary, starts the benchmark's own PostgreSQL 15 clusters with
# scripts/shards.sh (one shard on 15433, four on 15434-15437; shared_buffers 256MB,
# max_connections 300, and — like every cluster of shards.sh — fsync, synchronous_commit
# and full_page_writes off), loads pgbench data, starts PgBouncer (Debian's, transaction
# pooling, pool size = shardwire's pool.size) on 16432, shardwire with
# scripts/bench/one-shard.yaml on 16433 and with scripts/bench/four-shard.yaml on 16434,
# and, for the -S runs, a third shardwire on 16435 with the four-shard config pointed at
# the one server (same routing and pools as on four shards, one PostgreSQL: it tells the
# router's share of the four-shard figures from PostgreSQL's), then runs interleaved rounds (PgBouncer and shardwire, and shardwire on one and on four
# shards, always run back to back, and the order flips every round; each timed run
# follows one unrecorded second of the same run) of:
#   -S (select-only) with -M simple / extended / prepared, 16 clients, 2 threads
#   a point read (scripts/bench/point-read.sql) at 1 client
#   the TPC-B-like default at 8 clients (not through 4 shards: see four-shard.yaml)
#   a connect storm, -C -S with 10 clients × 50 transactions = 500 connections
# and then, through shardwire (1 shard, restarted with pool.size 16): 10,000 idle clients
# held open (router RSS per client) and 1,000 concurrent -S clients for 30 s;
# and prints one table (medians over rounds, ratios, latency percentiles from pgbench's
# per-transaction logs, each proxy's CPU per transaction from /proc/<pid>/stat).
# Everything it started is stopped on exit, also on failure or Ctrl-C.
#
# Environment (flags win): BENCH_ROUNDS (5), BENCH_DURATION (10 s), BENCH_SCALE (10),
# BENCH_IDLE (10000), BENCH_CONCURRENT (1000), BENCH_CONCURRENT_SECS (30) (0 = skip),
# BENCH_OUT (BENCHMARKS.md in the repo; full mode only), BENCH_KEEP=1 keeps the work
# directory (pgbench outputs, configs, logs) instead of deleting it. SHARDWIRE_BIN=path
# benchmarks that binary instead of building a release one (e.g. CI's debug build for
# --smoke; the numbers of a debug build mean nothing).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROG="bench"
# shellcheck source=scripts/common.sh
source "$REPO_ROOT/scripts/common.sh"
cd "$REPO_ROOT"

usage() {
    sed -n '2,/^set -e/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}

SMOKE=0
HOLD=0
ROUNDS="${BENCH_ROUNDS:-}"
DURATION="${BENCH_DURATION:-}"
SCALE="${BENCH_SCALE:-}"
while [[ $# -gt 0 ]]; do
    case "$1" in
    --smoke) SMOKE=1 ;;
    --hold) HOLD=1 ;;
    --rounds) ROUNDS="${2:?--rounds needs a number}"; shift ;;
    --rounds=*) ROUNDS="${1#*=}" ;;
    --duration) DURATION="${2:?--duration needs seconds}"; shift ;;
    --duration=*) DURATION="${1#*=}" ;;
    --scale) SCALE="${2:?--scale needs a number}"; shift ;;
    --scale=*) SCALE="${1#*=}" ;;
    -h | --help) usage ;;
    *) usage ;;
    esac
    shift
done

if [[ "$SMOKE" == 1 ]]; then
    ROUNDS="${ROUNDS:-1}" DURATION="${DURATION:-2}" SCALE="${SCALE:-1}"
    S_CLIENTS=4 S_THREADS=2 TPCB_CLIENTS=2 STORM_CLIENTS=4 STORM_TXNS=5
    IDLE_N="${BENCH_IDLE:-200}" CONC_N="${BENCH_CONCURRENT:-50}" CONC_SECS="${BENCH_CONCURRENT_SECS:-2}"
else
    ROUNDS="${ROUNDS:-5}" DURATION="${DURATION:-10}" SCALE="${SCALE:-10}"
    S_CLIENTS=16 S_THREADS=2 TPCB_CLIENTS=8 STORM_CLIENTS=10 STORM_TXNS=50
    IDLE_N="${BENCH_IDLE:-10000}" CONC_N="${BENCH_CONCURRENT:-1000}" CONC_SECS="${BENCH_CONCURRENT_SECS:-30}"
fi
for v in IDLE_N CONC_N CONC_SECS; do
    [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a number (got '${!v}')"
done
for v in ROUNDS DURATION SCALE; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (got '${!v}')"
done

ONE_CFG=scripts/bench/one-shard.yaml
FOUR_CFG=scripts/bench/four-shard.yaml
DB=bench DB_USER=bench DB_PASSWORD=bench-secret
DIRECT_PORT=15433 FOUR_PORTS=(15434 15435 15436 15437)
PGB_PORT=16432 SW1_PORT=16433 SW4_PORT=16434 SW4X1_PORT=16435
FOUR_SLOTS=("0 255" "256 511" "512 767" "768 1023")
PG_SETTINGS=("shared_buffers=256MB" "max_connections=300")
# The four shards share the one server's memory: each holds a quarter of the data, and
# gets a quarter of its shared_buffers (fits the 35 MB of a shard's accounts).
FOUR_PG_SETTINGS=("shared_buffers=64MB" "max_connections=300")
export PGPASSWORD="$DB_PASSWORD" PGCONNECT_TIMEOUT=10
CLK_TCK="$(getconf CLK_TCK)"
export CLK_TCK

# ---------------------------------------------------------------------------
# Cleanup: everything this run started, by pid or by the scripts that started it.

WORK=""
SW_PIDS=()
IDLE_PID=""
PGB_PID=""
STOP_CONFIGS=()

cleanup() {
    local rc=$? pid cfg
    trap - EXIT INT TERM
    if [[ -n "$IDLE_PID" ]]; then
        kill "$IDLE_PID" 2>/dev/null || true
    fi
    for pid in "${SW_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    if [[ -n "$PGB_PID" ]]; then
        kill "$PGB_PID" 2>/dev/null || true
    fi
    for pid in "${SW_PIDS[@]}" $PGB_PID; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    for cfg in "${STOP_CONFIGS[@]}"; do
        bash scripts/shards.sh stop "$cfg" >/dev/null 2>&1 || warn "could not stop the shards of $cfg"
    done
    if [[ -n "$WORK" && -d "$WORK" ]]; then
        if [[ "${BENCH_KEEP:-0}" == 1 ]]; then
            say "work directory kept: $WORK"
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------
# Setup

ensure_tools() {
    ensure_system_packages
    local missing=()
    command -v pgbouncer >/dev/null 2>&1 || [[ -x /usr/sbin/pgbouncer ]] || missing+=(pgbouncer)
    command -v python3 >/dev/null 2>&1 || missing+=(python3)
    command -v pgbench >/dev/null 2>&1 || missing+=(postgresql-contrib)
    [[ ${#missing[@]} -eq 0 ]] && return 0
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and apt-get is unavailable"
    say "installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    # The Debian package would start a system PgBouncer on 6432; keep services down.
    local policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]] && [[ "$(id -u)" -eq 0 ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && policy=1
    fi
    as_root apt-get update -q </dev/null || die "apt-get update failed"
    as_root apt-get install -y -q "${missing[@]}" </dev/null || {
        [[ "$policy" == 1 ]] && rm -f /usr/sbin/policy-rc.d
        die "apt-get install ${missing[*]} failed"
    }
    [[ "$policy" == 1 ]] && rm -f /usr/sbin/policy-rc.d
    return 0
}

PGBOUNCER_BIN=""
find_pgbouncer() {
    PGBOUNCER_BIN="$(command -v pgbouncer 2>/dev/null || echo /usr/sbin/pgbouncer)"
    [[ -x "$PGBOUNCER_BIN" ]] || die "pgbouncer not found"
}

psql_at() { # port sql...
    local port="$1"
    shift
    psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U "$DB_USER" -d "$DB" "$@" </dev/null
}

# Start the shards of a config (recording that we must stop them), then apply the
# benchmark settings with ALTER SYSTEM and restart if any differed.
start_cluster() { # config settings-array-name port...
    local cfg="$1" port restart=0 s name val cur
    local -n settings="$2"
    shift 2
    STOP_CONFIGS+=("$cfg")
    bash scripts/shards.sh start "$cfg" >/dev/null || die "could not start the shards of $cfg"
    for port in "$@"; do
        for s in "${settings[@]}"; do
            name="${s%%=*}" val="${s#*=}"
            cur="$(psql_at "$port" -tAc "SHOW $name")" || die "cannot reach PostgreSQL on $port"
            if [[ "$cur" != "$val" ]]; then
                psql_at "$port" -c "ALTER SYSTEM SET $name = '$val'" >/dev/null
                restart=1
            fi
        done
    done
    if [[ "$restart" == 1 ]]; then
        say "applying benchmark settings (${settings[*]}) to $cfg: restarting"
        bash scripts/shards.sh restart "$cfg" >/dev/null || die "could not restart the shards of $cfg"
    fi
}

# Load pgbench data at $SCALE into one server; with "LO HI", keep only the
# pgbench_accounts rows of hash slots LO..HI. A table comment marks a finished load, so a
# re-run with the same scale and slots skips it.
slot_sql() { echo "((((hashint8extended(aid, 0) % 1024) + 1024) % 1024))"; }
load_pgbench() {
    local port="$1" slots="${2:-}" mark have
    mark="shardwire-bench v2 scale=$SCALE slots=${slots:-all}"
    have="$(psql_at "$port" -tAc "SELECT obj_description('pgbench_accounts'::regclass, 'pg_class')" 2>/dev/null || true)"
    if [[ "$have" == "$mark" ]]; then
        say "port $port: pgbench data already loaded ($mark)"
    else
        say "port $port: loading pgbench data ($mark)"
        pgbench -h 127.0.0.1 -p "$port" -U "$DB_USER" -i -s "$SCALE" -I dtGvp -q "$DB" \
            </dev/null >"$WORK/load-$port.log" 2>&1 || {
            cat "$WORK/load-$port.log" >&2
            die "pgbench -i failed on port $port"
        }
        if [[ -n "$slots" ]]; then
            local lo="${slots% *}" hi="${slots#* }"
            # (-c, not a here-document: psql_at reads stdin from /dev/null)
            psql_at "$port" -c "DELETE FROM pgbench_accounts WHERE $(slot_sql) NOT BETWEEN $lo AND $hi" \
                -c "VACUUM FULL pgbench_accounts" >/dev/null
        fi
        psql_at "$port" -c "VACUUM ANALYZE" -c "COMMENT ON TABLE pgbench_accounts IS '$mark'" >/dev/null
    fi
    if [[ -n "$slots" ]]; then
        # A shard that holds rows of other shards' slots would make the 4-shard figures
        # meaningless (and once did, silently): check, every run.
        local lo="${slots% *}" hi="${slots#* }" stray
        stray="$(psql_at "$port" -tAc "SELECT count(*) FROM pgbench_accounts WHERE $(slot_sql) NOT BETWEEN $lo AND $hi")"
        [[ "$stray" == 0 ]] || die "port $port holds $stray pgbench_accounts rows outside slots $lo-$hi"
    fi
    # TPC-B-like runs only append to pgbench_history; start every run from an empty one.
    psql_at "$port" -c "TRUNCATE pgbench_history" -c "CHECKPOINT" >/dev/null
}

wait_ready() { # port what pid
    local port="$1" what="$2" pid="${3:-}" i
    for i in $(seq 100); do
        if psql_at "$port" -tAc "SELECT 1" >/dev/null 2>&1; then
            return 0
        fi
        if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
            break
        fi
        sleep 0.2
    done
    die "$what on port $port did not come up (log: see $WORK)"
}

start_pgbouncer() {
    local dir="$WORK/pgbouncer" pool
    pool="$(sed -n 's/^ *size: *\([0-9]*\).*/\1/p' "$ONE_CFG" | head -n1)"
    [[ -n "$pool" ]] || die "no pool.size in $ONE_CFG"
    POOL_SIZE="$pool"
    mkdir -p "$dir"
    # The role's SCRAM verifier, as stored by the server: PgBouncer then checks clients
    # without deriving a key per connection (as a production setup would), and logs in
    # to the server with the client's SCRAM proof (pass-through). Plaintext if the
    # verifier cannot be read.
    local secret
    secret="$(psql_at "$DIRECT_PORT" -tAc \
        "SELECT rolpassword FROM pg_authid WHERE rolname = current_user" 2>/dev/null || true)"
    [[ "$secret" == SCRAM-SHA-256\$* ]] || secret="$DB_PASSWORD"
    PGB_AUTH="$([[ "$secret" == SCRAM-SHA-256\$* ]] && echo "the role's SCRAM verifier from pg_authid" || echo "the plaintext password")"
    printf '"%s" "%s"\n' "$DB_USER" "$secret" >"$dir/userlist.txt"
    cat >"$dir/pgbouncer.ini" <<EOF
[databases]
$DB = host=127.0.0.1 port=$DIRECT_PORT dbname=$DB

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $dir/userlist.txt
pool_mode = transaction
default_pool_size = $pool
max_client_conn = 2000
logfile = $dir/pgbouncer.log
log_connections = 0
log_disconnections = 0
EOF
    if [[ "$(id -u)" -eq 0 ]]; then
        chown -R postgres: "$dir"
        chmod 700 "$dir"
    fi
    # In the foreground as our own child (setpriv execs, so $! is PgBouncer itself): its
    # CPU is read from /proc/$!/stat, and the exit trap stops and reaps it.
    local run=()
    if [[ "$(id -u)" -eq 0 ]]; then
        run=(setpriv --reuid=postgres --regid=postgres --init-groups)
    fi
    (cd / && exec "${run[@]}" "$PGBOUNCER_BIN" -q "$dir/pgbouncer.ini") </dev/null >/dev/null 2>&1 &
    PGB_PID=$!
    wait_ready "$PGB_PORT" pgbouncer "$PGB_PID"
}

start_shardwire() { # config port log → sets LAST_PID
    local cfg="$1" port="$2" log="$3"
    "$SW_BIN" serve --config "$cfg" --listen "127.0.0.1:$port" --log-level warn \
        </dev/null >"$log" 2>&1 &
    LAST_PID=$!
    SW_PIDS+=("$LAST_PID")
    wait_ready "$port" "shardwire ($cfg)" "$LAST_PID"
}

# utime and stime of a process, in clock ticks (fields 14 and 15 of /proc/<pid>/stat;
# the command name in field 2 may hold spaces, so count from the closing parenthesis).
proc_ticks() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || { echo -; return; }
    stat="${stat##*) }"
    # shellcheck disable=SC2086
    set -- $stat
    echo "${12} ${13}"
}

# ---------------------------------------------------------------------------
# Runs

declare -A TARGET_PORT TARGET_PID
RUNS=""

run_one() { # workload target round -- pgbench options
    local wl="$1" target="$2" round="$3" dir port pid before after rc
    shift 4
    dir="$RUNS/$wl/$target/r$round"
    mkdir -p "$dir"
    port="${TARGET_PORT[$target]}" pid="${TARGET_PID[$target]:-}"
    local cmd=(pgbench -h 127.0.0.1 -p "$port" -U "$DB_USER" -n "$@")
    printf '%s ' "${cmd[@]}" "-l --log-prefix=<dir>/log $DB" >"$dir/cmd"
    if [[ "$SMOKE" == 0 ]]; then
        # One unrecorded second of the same run first: the target's connections and
        # caches warm up, and what the previous run left behind (a connect storm's
        # exiting backends) settles before the measured run starts.
        local warm=() a prev=""
        for a in "$@"; do
            if [[ "$prev" == -T ]]; then warm+=(1); else warm+=("$a"); fi
            prev="$a"
        done
        if [[ " $* " == *" -T "* ]]; then
            timeout -k 5 60 pgbench -h 127.0.0.1 -p "$port" -U "$DB_USER" -n "${warm[@]}" "$DB" \
                </dev/null >/dev/null 2>&1 || true
        fi
    fi
    before=- after=-
    [[ -n "$pid" ]] && before="$(proc_ticks "$pid")"
    rc=0
    timeout -k 10 "$((DURATION * 4 + CONC_SECS * 2 + 120))" "${cmd[@]}" -l --log-prefix="$dir/log" "$DB" \
        </dev/null >"$dir/out" 2>"$dir/err" || rc=$?
    [[ -n "$pid" ]] && after="$(proc_ticks "$pid")"
    echo "$rc" >"$dir/rc"
    if [[ "$before" != - && "$after" != - ]]; then echo "$before $after" >"$dir/cpu"; else echo - >"$dir/cpu"; fi
    python3 "$REPO_ROOT/scripts/bench/report.py" summarize "$dir"
    local tps
    tps="$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$dir/out")"
    printf '%s: round %s  %-11s %-12s tps %-10s%s\n' "$PROG" "$round" "$wl" "$target" "${tps:-?}" \
        "$([[ "$rc" == 0 ]] || echo "  (exit $rc: $(grep -m1 -iE 'error|abort' "$dir/err" "$dir/out" 2>/dev/null | cut -c1-150))")"
}

# PostgreSQL alone, no router: the -S simple load ($S_CLIENTS clients) as four pgbench
# runs of a quarter of the clients each, against the four shard servers at once and
# against the one server, next to each other in every round. What four servers on this
# machine give against one is the most the 4-shard router can give against 1 shard. (On
# a shard, 3 of 4 random aids find no row, which is cheaper: if anything, this flatters
# the four servers.)
servers_pair() { # round
    local r="$1" t dir i rc ports pids
    for t in $(rotated "$r" servers-1 servers-4); do
        dir="$RUNS/servers/$t/r$r"
        mkdir -p "$dir"
        if [[ "$t" == servers-1 ]]; then
            ports=("$DIRECT_PORT" "$DIRECT_PORT" "$DIRECT_PORT" "$DIRECT_PORT")
        else
            ports=("${FOUR_PORTS[@]}")
        fi
        pids=()
        for i in 0 1 2 3; do
            timeout -k 10 "$((DURATION * 4 + 60))" pgbench -h 127.0.0.1 -p "${ports[$i]}" \
                -U "$DB_USER" -n -S -M simple -c "$((S_CLIENTS / 4))" -j 1 -T "$DURATION" "$DB" \
                </dev/null >"$dir/out.$i" 2>&1 &
            pids+=($!)
        done
        rc=0
        for i in "${pids[@]}"; do wait "$i" || rc=$?; done
        echo "$rc" >"$dir/rc"
        [[ "$rc" == 0 ]] || warn "PostgreSQL alone ($t): a pgbench run failed (see $dir)"
        awk '/^tps = / {s += $3; n++} END {if (n == 4) printf "%.1f\n", s}' "$dir"/out.* >"$dir/tps"
        printf '%s: round %s  %-11s %-12s tps %s\n' "$PROG" "$r" S-servers "$t" "$(cat "$dir/tps")"
    done
}

# The targets in the order given on odd rounds, reversed on even ones: neighbours stay
# neighbours (their ratio is least disturbed by the shared machine's slow minutes), and
# each goes first as often as the other.
rotated() { # round target...
    local r="$1" i
    shift
    local t=("$@")
    if ((r % 2)); then
        printf '%s\n' "${t[@]}"
    else
        for ((i = ${#t[@]} - 1; i >= 0; i--)); do
            printf '%s\n' "${t[$i]}"
        done
    fi
}

run_round() {
    local r="$1" t mode wl
    local all=(direct pgbouncer shardwire shardwire-4)
    for mode in simple extended prepared; do
        wl="S-$mode"
        for t in $(rotated "$r" "${all[@]}" shardwire-4x1); do
            run_one "$wl" "$t" "$r" -- -S -M "$mode" -c "$S_CLIENTS" -j "$S_THREADS" -T "$DURATION"
        done
    done
    servers_pair "$r"
    for t in $(rotated "$r" "${all[@]}"); do
        run_one point "$t" "$r" -- -f "$REPO_ROOT/scripts/bench/point-read.sql" -s "$SCALE" \
            -M simple -c 1 -j 1 -T "$DURATION"
    done
    for t in $(rotated "$r" direct pgbouncer shardwire); do
        run_one tpcb "$t" "$r" -- -b tpcb-like -M simple -c "$TPCB_CLIENTS" -j 2 -T "$DURATION"
    done
    for t in $(rotated "$r" "${all[@]}"); do
        run_one storm "$t" "$r" -- -S -M simple -C -c "$STORM_CLIENTS" -j 2 -t "$STORM_TXNS"
    done
}

# Issue 3 item 4: many clients. Restart the 1-shard router with pool.size 16, hold
# $IDLE_N idle clients open (scripts/bench/idle_clients.py: real startup + SCRAM) and read
# its RSS before, with all of them connected, and after they left; then run pgbench with
# $CONC_N clients for $CONC_SECS s over that pool of 16.
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

connections_test() {
    local cfg="$WORK/one-shard-pool16.yaml" old="${TARGET_PID[shardwire]}" pid rss0 rss1 rss2 line
    sed 's/^\(  size:\) *[0-9]*/\1 16/' "$ONE_CFG" >"$cfg"
    grep -q '^  size: 16' "$cfg" || { warn "could not set pool.size 16 in a copy of $ONE_CFG"; return 1; }
    say "connections: restarting shardwire (1 shard) with pool.size 16"
    kill "$old" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$old" 2>/dev/null || break; sleep 0.1; done
    wait "$old" 2>/dev/null || true
    start_shardwire "$cfg" "$SW1_PORT" "$WORK/shardwire-1-pool16.log"
    pid="$LAST_PID"
    TARGET_PID[shardwire]="$pid"
    psql_at "$SW1_PORT" -tAc "SELECT abalance FROM pgbench_accounts WHERE aid = 1" >/dev/null ||
        { warn "the restarted router does not answer"; return 1; }
    rss0="$(rss_kb "$pid")"

    say "connections: opening $IDLE_N idle clients"
    python3 "$REPO_ROOT/scripts/bench/idle_clients.py" 127.0.0.1 "$SW1_PORT" "$DB_USER" \
        "$DB_PASSWORD" "$DB" "$IDLE_N" 200 </dev/null >"$WORK/idle.out" 2>"$WORK/idle.err" &
    IDLE_PID=$!
    for _ in $(seq 6000); do
        grep -q '^connected' "$WORK/idle.out" 2>/dev/null && break
        kill -0 "$IDLE_PID" 2>/dev/null || break
        sleep 0.1
    done
    line="$(grep -m1 '^connected' "$WORK/idle.out" 2>/dev/null || echo "connected 0 $IDLE_N ?")"
    sleep 1
    rss1="$(rss_kb "$pid")"
    kill "$IDLE_PID" 2>/dev/null || true
    wait "$IDLE_PID" 2>/dev/null || true
    IDLE_PID=""
    sleep 2
    rss2="$(rss_kb "$pid")"
    read -r _ ok failed secs <<<"$line"
    say "connections: $ok connected, $failed failed in $secs s; RSS ${rss0} kB → ${rss1} kB → ${rss2} kB"
    {
        echo "pool=16"
        echo "idle_n=$IDLE_N"
        echo "idle_ok=$ok"
        echo "idle_failed=$failed"
        echo "idle_secs=$secs"
        echo "idle_error=$(head -n1 "$WORK/idle.err" | cut -c1-200)"
        echo "rss0_kb=$rss0"
        echo "rss1_kb=$rss1"
        echo "rss2_kb=$rss2"
        echo "conc_n=$CONC_N"
        echo "conc_secs=$CONC_SECS"
    } >"$RUNS/connections.env"

    say "connections: $CONC_N concurrent clients for $CONC_SECS s"
    run_one conc shardwire 1 -- -S -M simple -c "$CONC_N" -j 2 -T "$CONC_SECS"
}

# ---------------------------------------------------------------------------
# The report

machine_description() {
    local model mem pgv pgbv
    model="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)"
    mem="$(awk '/^MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
    pgv="$(postgres_version)"
    pgbv="$("$PGBOUNCER_BIN" --version 2>/dev/null | head -n1)"
    cat <<EOF
- date: $(date -u '+%Y-%m-%d %H:%M UTC')
- CPU: $(nproc) × ${model:-unknown}
- memory: $mem
- kernel: $(uname -sr)
- load average at start: $LOAD_AT_START
- PostgreSQL: $pgv; $(pgbench --version)
- PgBouncer: $pgbv
- shardwire: git $SW_REV, $SW_BUILD ($(rustc --version 2>/dev/null || echo rustc))
EOF
}

postgres_version() {
    psql_at "$DIRECT_PORT" -tAc "SELECT version()" 2>/dev/null | sed 's/ on .*//' || echo unknown
}

write_report() { # file
    local file="$1" wl label
    {
        echo "# shardwire benchmarks"
        echo
        echo "Written by \`scripts/bench.sh\` (do not edit by hand; re-run it). One run; every"
        echo "figure is the median over $ROUNDS interleaved rounds, with the min–max of the"
        echo "rounds beside it. PgBouncer and shardwire, and shardwire on one and on four shards,"
        echo "always run back to back, and the order flips every round, so the checks also give"
        echo "the ratio within each round. Each timed run follows one unrecorded second of the"
        echo "same run. The machine is shared and noisy: compare the ratios, not the absolute"
        echo "numbers."
        echo
        echo "## Machine"
        echo
        machine_description
        echo
        echo "## Results"
        echo
        echo "scale $SCALE, $ROUNDS rounds of ${DURATION} s per timed run; pool size $POOL_SIZE"
        echo "server connections for PgBouncer and shardwire alike. Latency columns: pgbench's"
        echo "\`latency average\`, and p50/p99 of its per-transaction log (\`-l\`); proxy CPU is"
        echo "the proxy process's utime+stime (/proc/<pid>/stat) over the run divided by the"
        echo "transactions processed (the checks also give the two apart: user time is the"
        echo "proxy's own work, system time the kernel's for its sends and receives, for waking"
        echo "the process at the other end and for switching the proxy out and in again)."
        echo "\"shardwire 4 shards\" is compared with direct PostgreSQL"
        echo "on one server and with shardwire on one shard (notes). \"shardwire 4 shards on 1"
        echo "server\" runs the four-shard config with every shard pointed at the one server:"
        echo "the same routing and the same four pools, one PostgreSQL. Its ratio to shardwire 1"
        echo "shard is the router's own cost of four shards; the ratio of shardwire 4 shards to"
        echo "it is what four PostgreSQL servers on this machine cost. For comparison, every"
        echo "round also runs PostgreSQL alone with four servers against one: the \`-S\` simple"
        echo "load as four pgbench runs of a quarter of the clients each, against the four shard"
        echo "servers at once, and against the one server (\`servers_pair\` in scripts/bench.sh)."
        echo
        echo "A client's unnamed statement (\`-M extended\` sends Parse \"\" before every"
        echo "execution) is kept by shardwire as a named statement on each server connection"
        echo "(\`pool.reuse_unnamed_statements\`, on by default), so PostgreSQL parses and plans it"
        echo "once per connection; PgBouncer forwards each Parse, which PostgreSQL parses anew."
        echo "Likewise a simple-protocol point SELECT whose only literal pins the shard key (\`-S\`"
        echo "\`-M simple\`, the \`-c 1\` point read) runs as a kept statement with the key bound as"
        echo "\`\$1\` (\`pool.prepare_point_queries\`, on by default); PgBouncer forwards the text."
        echo
        python3 "$REPO_ROOT/scripts/bench/report.py" table "$RUNS"
        echo
        if [[ -s "$RUNS/connections.env" ]]; then
            echo "## Many clients (issue 3 item 4)"
            echo
            echo "shardwire 1 shard restarted with pool.size 16 after the rounds; idle clients are"
            echo "opened by \`scripts/bench/idle_clients.py\` (startup + SCRAM, then idle), RSS is"
            echo "VmRSS of the router process."
            echo
            python3 "$REPO_ROOT/scripts/bench/report.py" connections "$RUNS" || true
            echo
            echo "\`pgbench -h 127.0.0.1 -p $SW1_PORT -U $DB_USER -n -S -M simple -c $CONC_N -j 2 -T $CONC_SECS $DB\`"
            echo
        fi
        echo "## Setup"
        echo
        echo "- PostgreSQL 15 clusters from \`scripts/shards.sh\` with ALTER SYSTEM"
        echo "  ${PG_SETTINGS[*]} (the four shards: ${FOUR_PG_SETTINGS[*]}, a quarter of the"
        echo "  memory for a quarter of the data); shards.sh runs every cluster with fsync,"
        echo "  synchronous_commit and full_page_writes **off** (not crash safe; the same for"
        echo "  every target). One server on $DIRECT_PORT (direct, PgBouncer, shardwire 1 shard);"
        echo "  four on ${FOUR_PORTS[*]} for shardwire 4 shards."
        echo "- Data: \`pgbench -i -s $SCALE -I dtGvp\` on every server; on the four shards each"
        echo "  keeps only its own hash slots of pgbench_accounts:"
        echo "  \`DELETE FROM pgbench_accounts WHERE ((((hashint8extended(aid, 0) % 1024) + 1024) % 1024) NOT BETWEEN lo AND hi)\`"
        echo "  (s0 0-255, s1 256-511, s2 512-767, s3 768-1023), then \`VACUUM FULL\`."
        echo "- PgBouncer $PGB_PORT: \`pgbouncer -q pgbouncer.ini\` as the postgres user;"
        echo "  userlist.txt holds $PGB_AUTH; pgbouncer.ini:"
        echo
        echo '```ini'
        sed "s#$WORK/pgbouncer#<dir>#g" "$WORK/pgbouncer/pgbouncer.ini"
        echo '```'
        echo
        echo "- shardwire $SW1_PORT: \`shardwire serve --config $ONE_CFG --listen 127.0.0.1:$SW1_PORT --log-level warn\`"
        echo "- shardwire $SW4_PORT: \`shardwire serve --config $FOUR_CFG --listen 127.0.0.1:$SW4_PORT --log-level warn\`"
        echo "- shardwire $SW4X1_PORT (4 shards on 1 server, \`-S\` runs only): $FOUR_CFG with every"
        echo "  shard's port set to $DIRECT_PORT, \`--listen 127.0.0.1:$SW4X1_PORT\`"
        echo
        echo "## Commands"
        echo
        echo "Targets: direct = port $DIRECT_PORT, PgBouncer = $PGB_PORT, shardwire 1 shard ="
        echo "$SW1_PORT, shardwire 4 shards = $SW4_PORT, shardwire 4 shards on 1 server = $SW4X1_PORT"
        echo "(\`-p\` below is the first target's);"
        echo "PGPASSWORD=$DB_PASSWORD."
        echo
        echo '```sh'
        while IFS=$'\t' read -r wl label; do
            local first
            first="$(find "$RUNS/$wl" -path '*/r1/cmd' | sort | head -n1)"
            [[ -n "$first" ]] || continue
            echo "# $label"
            sed "s#$REPO_ROOT/##g; s/ *$//" "$first"
            echo
        done <"$RUNS/workloads.tsv"
        echo '```'
        echo
        echo "\`scripts/bench/point-read.sql\`:"
        echo
        echo '```'
        cat "$REPO_ROOT/scripts/bench/point-read.sql"
        echo '```'
    } >"$file"
}

# ---------------------------------------------------------------------------

main() {
    LOAD_AT_START="$(cut -d' ' -f1-3 /proc/loadavg)"
    # The source the binary is built from (read now: writing the report dirties the tree).
    SW_REV="$(git -C "$REPO_ROOT" describe --always --dirty --abbrev=12 2>/dev/null || echo unknown)"
    ensure_tools
    find_pgbouncer
    # Thousands of client sockets (pgbench, idle_clients.py, the routers, PgBouncer).
    ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

    WORK="$(mktemp -d /tmp/shardwire-bench.XXXXXX)"
    chmod 755 "$WORK"
    RUNS="$WORK/runs"
    mkdir -p "$RUNS"

    # One benchmark at a time on this machine (the ports are fixed).
    exec 8>>/tmp/shardwire-bench.lock
    flock -n 8 || die "another scripts/bench.sh is running (lock /tmp/shardwire-bench.lock)"

    local built
    if [[ -n "${SHARDWIRE_BIN:-}" ]]; then
        [[ -x "$SHARDWIRE_BIN" ]] || die "SHARDWIRE_BIN=$SHARDWIRE_BIN is not an executable"
        built="$SHARDWIRE_BIN"
        SW_BUILD="given binary $SHARDWIRE_BIN"
        say "using SHARDWIRE_BIN=$built (no build)"
    else
        say "building shardwire (cargo build --release --bin shardwire)"
        cargo build --release --bin shardwire </dev/null || die "release build failed"
        built="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/shardwire"
        SW_BUILD="release build"
    fi
    # A private copy: a concurrent build cannot swap the binary under the benchmark.
    SW_BIN="$WORK/shardwire"
    cp "$built" "$SW_BIN"
    export SHARDWIRE_BIN="$SW_BIN"

    say "starting PostgreSQL (one server on $DIRECT_PORT, four shards on ${FOUR_PORTS[*]})"
    start_cluster "$ONE_CFG" PG_SETTINGS "$DIRECT_PORT"
    start_cluster "$FOUR_CFG" FOUR_PG_SETTINGS "${FOUR_PORTS[@]}"

    load_pgbench "$DIRECT_PORT"
    local i
    for i in "${!FOUR_PORTS[@]}"; do
        load_pgbench "${FOUR_PORTS[$i]}" "${FOUR_SLOTS[$i]}"
    done

    say "starting PgBouncer on $PGB_PORT and shardwire on $SW1_PORT (1 shard) and $SW4_PORT (4 shards)"
    start_pgbouncer
    start_shardwire "$ONE_CFG" "$SW1_PORT" "$WORK/shardwire-1.log"
    local sw1="$LAST_PID"
    start_shardwire "$FOUR_CFG" "$SW4_PORT" "$WORK/shardwire-4.log"
    local sw4="$LAST_PID"
    # The four-shard config with every shard on the one server (which holds all rows).
    local port
    sed -e "s/^listen: .*/listen: 127.0.0.1:$SW4X1_PORT/" "$FOUR_CFG" >"$WORK/four-on-one.yaml"
    for port in "${FOUR_PORTS[@]}"; do
        sed -i "s/port: $port,/port: $DIRECT_PORT,/" "$WORK/four-on-one.yaml"
    done
    [[ "$(grep -c "port: $DIRECT_PORT," "$WORK/four-on-one.yaml")" == "${#FOUR_PORTS[@]}" ]] ||
        die "could not point $FOUR_CFG's shards at port $DIRECT_PORT"
    start_shardwire "$WORK/four-on-one.yaml" "$SW4X1_PORT" "$WORK/shardwire-4x1.log"
    local sw4x1="$LAST_PID"

    TARGET_PORT=([direct]="$DIRECT_PORT" [pgbouncer]="$PGB_PORT" [shardwire]="$SW1_PORT"
        [shardwire-4]="$SW4_PORT" [shardwire-4x1]="$SW4X1_PORT")
    TARGET_PID=([pgbouncer]="$PGB_PID" [shardwire]="$sw1" [shardwire-4]="$sw4" [shardwire-4x1]="$sw4x1")

    if [[ "$HOLD" == 1 ]]; then
        say "holding; Ctrl-C stops everything. PGPASSWORD=$DB_PASSWORD, user $DB_USER, database $DB"
        local t
        for t in direct pgbouncer shardwire shardwire-4 shardwire-4x1; do
            say "  $t: port ${TARGET_PORT[$t]}${TARGET_PID[$t]:+, pid ${TARGET_PID[$t]}}"
        done
        # In the background and waited for, so a signal to this script ends it at once;
        # without the lock's descriptor, so a sleep left behind does not hold the lock.
        while true; do
            sleep 3600 8>&- &
            wait $! || true
        done
    fi

    printf '%s\t%s\n' \
        S-simple "\`-S\` simple, $S_CLIENTS clients" \
        S-extended "\`-S\` extended, $S_CLIENTS clients" \
        S-prepared "\`-S\` prepared, $S_CLIENTS clients" \
        point "point read, 1 client" \
        tpcb "TPC-B-like, $TPCB_CLIENTS clients" \
        storm "connect storm \`-C\`, $((STORM_CLIENTS * STORM_TXNS)) connections" \
        >"$RUNS/workloads.tsv"

    if [[ "$SMOKE" == 0 ]]; then
        say "warm-up: 2 s of -S on every target (not recorded)"
        local t
        for t in direct pgbouncer shardwire shardwire-4 shardwire-4x1; do
            pgbench -h 127.0.0.1 -p "${TARGET_PORT[$t]}" -U "$DB_USER" -n -S -c "$S_CLIENTS" \
                -j "$S_THREADS" -T 2 "$DB" </dev/null >/dev/null 2>&1 || warn "warm-up against $t failed"
        done
    fi

    local r
    for ((r = 1; r <= ROUNDS; r++)); do
        say "round $r of $ROUNDS"
        run_round "$r"
    done
    if [[ "$IDLE_N" -gt 0 || "$CONC_N" -gt 0 ]]; then
        connections_test || warn "the many-clients test could not run"
        sw1="${TARGET_PID[shardwire]}"
    fi

    local report
    if [[ "$SMOKE" == 1 ]]; then
        report="$WORK/BENCHMARKS.smoke.md"
    else
        report="${BENCH_OUT:-$REPO_ROOT/BENCHMARKS.md}"
    fi
    write_report "$report"
    echo
    sed -n '/^## Results/,/^## Setup/p' "$report" | sed '$d'
    [[ "$SMOKE" == 1 ]] || say "wrote $report"

    # Router crashes or errors show up in their logs.
    for f in "$WORK"/shardwire-*.log; do
        if [[ -s "$f" ]]; then
            say "$(basename "$f") (last lines):"
            tail -n 5 "$f" | sed 's/^/    /'
        fi
    done
    for pid in "$sw1" "$sw4" "$sw4x1"; do
        kill -0 "$pid" 2>/dev/null || die "a shardwire process ($pid) died during the benchmark"
    done

    local bad
    if ! bad="$(python3 "$REPO_ROOT/scripts/bench/report.py" errors "$RUNS")"; then
        printf '%s\n' "$bad" >&2
        if [[ "$SMOKE" == 1 ]]; then
            die "pgbench runs against shardwire (or direct PostgreSQL) had errors"
        fi
        warn "some runs against shardwire (or direct PostgreSQL) had errors (see the table)"
    fi
    if ! python3 "$REPO_ROOT/scripts/bench/report.py" connections "$RUNS" >/dev/null; then
        [[ "$SMOKE" == 1 ]] && die "the many-clients test had failed connections or errors"
        warn "the many-clients test had failed connections or errors (see the report)"
    fi
    say "done"
}

# One line: bash has read it whole before main runs, so editing this file during a
# run cannot feed the running shell new commands.
main; exit
