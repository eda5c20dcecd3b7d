#!/usr/bin/env bash
# The whole test suite, on a fresh machine or a used one. Installs what the tests need
# (idempotently), then checks formatting and lints and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

# --- what the tests need beyond the Rust toolchain ---------------------------------
# The foundation's tests need only cargo; later suites (pymodbus, hl7, rdmlpython,
# PostgreSQL, Chromium) add their installs here, each guarded so reruns are no-ops.
command -v cargo >/dev/null || { echo "cargo is required" >&2; exit 1; }
command -v kill >/dev/null || { apt-get update -qq && apt-get install -y -qq procps; }

echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
