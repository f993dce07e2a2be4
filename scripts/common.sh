# Helpers shared by scripts/demo.sh and scripts/test.sh (sourced, not run).
#
# Expects REPO_ROOT and PROG to be set by the caller, and `set -euo pipefail`.

say() { printf '%s: %s\n' "$PROG" "$*"; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
die() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}

# Rust lives in ~/.cargo/bin on this kind of machine; a CI shell may not have it on PATH.
if ! command -v cargo >/dev/null 2>&1 && [[ -x "${HOME:-/root}/.cargo/bin/cargo" ]]; then
    PATH="${HOME:-/root}/.cargo/bin:$PATH"
    export PATH
fi

as_root() {
    if [[ "$(id -u)" -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        die "need root to run: $*"
    fi
}

# bindgen (pg_query's build) loads libclang at build time.
have_libclang() {
    if command -v dpkg-query >/dev/null 2>&1 &&
        dpkg-query -W -f='${Status}' libclang-dev 2>/dev/null | grep -q 'install ok installed'; then
        return 0
    fi
    compgen -G '/usr/lib/llvm-*/lib/libclang*.so*' >/dev/null 2>&1 ||
        compgen -G '/usr/lib*/libclang*.so*' >/dev/null 2>&1
}

have_pg15_server() {
    local d
    for d in "$(pg_config --bindir 2>/dev/null || true)" /usr/lib/postgresql/15/bin; do
        if [[ -n "$d" && -x "$d/initdb" && -x "$d/postgres" ]] &&
            "$d/postgres" --version 2>/dev/null | grep -q ' 15\.'; then
            return 0
        fi
    done
    return 1
}

# Install (with apt-get, non-interactively) whatever of clang, libclang-dev and
# PostgreSQL (server and psql) is missing.
ensure_system_packages() {
    local missing=()
    command -v clang >/dev/null 2>&1 || missing+=(clang)
    have_libclang || missing+=(libclang-dev)
    if ! have_pg15_server || ! command -v psql >/dev/null 2>&1; then
        missing+=(postgresql)
    fi
    command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (https://rustup.rs) first"
    if [[ ${#missing[@]} -eq 0 ]]; then
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 ||
        die "missing ${missing[*]} and apt-get is unavailable; install them and re-run"
    say "installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update -q </dev/null || die "apt-get update failed"
    as_root apt-get install -y -q "${missing[@]}" </dev/null ||
        die "apt-get install ${missing[*]} failed"
}

# Print `name<TAB>host<TAB>port<TAB>database<TAB>user<TAB>password` lines for CONFIG.
list_shards() {
    "$SHARDWIRE_BIN" check --config "$1" --list-shards ||
        die "$1 is not a valid config (see above)"
}

# Create the demo schema (scripts/schema.sql) directly on every shard of CONFIG.
load_schema() {
    local cfg="$1" list name host port db user pw
    list="$(list_shards "$cfg")"
    while IFS=$'\t' read -r name host port db user pw; do
        [[ -n "$name" ]] || continue
        PGPASSWORD="$pw" PGOPTIONS="-c client_min_messages=warning" psql -X -q -h "$host" -p "$port" -U "$user" -d "$db" \
            -v ON_ERROR_STOP=1 -f "$REPO_ROOT/scripts/schema.sql" </dev/null >/dev/null ||
            die "could not create the schema on shard $name ($host:$port)"
        say "schema ready on shard $name ($host:$port/$db)"
    done <<<"$list"
}
