#!/usr/bin/env bash
# weir's whole test suite, from a fresh clone: provisions what it needs
# (PostgreSQL, the tansu broker; cached under ~/.cache/weir), then runs the
# format and lint checks and every test against the real services.
#
#   tests/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "tools"
# promtool lints the /metrics exposition and the alert rules (Debian's prometheus package).
if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
promtool --version | head -1

step "local stack"
eval "$(deploy/local/stack.sh up)"

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

step "cargo test"
# The workspace's binaries first: tests/loadtest.rs runs weir-loadtest,
# which belongs to the other crate (cargo does not build it for weir's tests).
cargo build --workspace --bins --locked
cargo test --workspace --all-targets --features weir/failpoints --locked -- --nocapture

step "all tests passed"
