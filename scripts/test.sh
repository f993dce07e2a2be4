#!/usr/bin/env bash
# The whole check, as CI runs it (.ci/run): install what is missing, start the test
# shards of tests/shard-config.test.yaml with the demo schema, then
#   cargo fmt --check
#   cargo clippy --all-targets -- -D warnings
#   cargo test --all-targets
#   scripts/bench.sh --smoke
# Every step runs even if an earlier one fails; the exit status is non-zero if any did.
# Shards this script started are stopped on exit; shards that were already running (a
# developer's, or another session's) are left running.
#
# Works on a fresh clone, as root, with CI=true and no stdin.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROG="test"
# shellcheck source=scripts/common.sh
source "$REPO_ROOT/scripts/common.sh"
cd "$REPO_ROOT"

TEST_CONFIG="tests/shard-config.test.yaml"
# The test build's binary is enough to read the config; no release build needed here.
SHARDWIRE_BIN="${SHARDWIRE_BIN:-${CARGO_TARGET_DIR:-$REPO_ROOT/target}/debug/shardwire}"
export SHARDWIRE_BIN

ensure_system_packages

say "building the shardwire binary (cargo build --bin shardwire)"
cargo build --bin shardwire </dev/null || die "build failed"

STARTED_SHARDS=0
stop_shards() {
    if [[ "$STARTED_SHARDS" == 1 ]]; then
        bash scripts/shards.sh stop "$TEST_CONFIG" || warn "could not stop the test shards"
    fi
}
trap stop_shards EXIT

if bash scripts/shards.sh status "$TEST_CONFIG" >/dev/null 2>&1; then
    say "test shards already running; they will be left running"
    bash scripts/shards.sh start "$TEST_CONFIG" # ensures roles and databases
else
    STARTED_SHARDS=1
    bash scripts/shards.sh start "$TEST_CONFIG"
fi
load_schema "$TEST_CONFIG"

failed=()
run() {
    say "running: $*"
    if ! "$@" </dev/null; then
        failed+=("$*")
    fi
}

export RUST_BACKTRACE=1
run cargo fmt --check
run cargo clippy --all-targets -- -D warnings
run cargo test --all-targets
# The benchmark end to end in seconds (direct, PgBouncer, shardwire on one and four
# shards): fails if any run through shardwire had errors. Uses the debug binary.
run env SHARDWIRE_BIN="$SHARDWIRE_BIN" bash scripts/bench.sh --smoke

if [[ ${#failed[@]} -gt 0 ]]; then
    printf '%s: FAILED: %s\n' "$PROG" "${failed[@]}" >&2
    exit 1
fi
say "all checks passed"
