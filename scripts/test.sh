#!/usr/bin/env bash
# The whole test suite, on a fresh machine or a used one. Installs what the tests need
# (idempotently), then checks formatting and lints and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

# --- what the tests need beyond the Rust toolchain ---------------------------------
# Independent peers the tests talk to, each pinned and installed only when missing, so
# a rerun is a no-op. Python peers go into .peers/python (PYTHONPATH), never into the
# system's site-packages.
command -v cargo >/dev/null || { echo "cargo is required" >&2; exit 1; }
command -v python3 >/dev/null || { apt-get update -qq && apt-get install -y -qq python3 python3-pip; }
command -v kill >/dev/null || { apt-get update -qq && apt-get install -y -qq procps; }
# PostgreSQL server binaries: the PostgreSQL sink's tests and bench start a throwaway
# server from them (tests/src/postgres.rs, issue 6). Debian's package, any major version.
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  echo "== installing postgresql-15"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15
fi

PEERS="$PWD/.peers"
export PCRD_PEERS="$PEERS"
python_peer() { # python_peer <marker> <pip requirement>...; PEER_DIR=<dir> for a dir of its own
  local dir="$PEERS/${PEER_DIR:-python}"
  local marker="$dir/.installed-$1"; shift
  if [ ! -f "$marker" ]; then
    echo "== installing $* into $dir"
    python3 -m pip install --quiet --disable-pip-version-check --target "$dir" "$@"
    touch "$marker"
  fi
}
# schemathesis: checks the API against its OpenAPI document (tests/tests/openapi_conformance.rs).
python_peer schemathesis-4.32.5 "schemathesis==4.32.5"
# rdmlpython: independent RDML reader/writer and LinRegPCR Cq oracle (issue 3). It breaks
# on numpy 2 (np.NaN), so numpy is pinned below 2 beside it.
python_peer rdmlpython-1.7.2 "rdmlpython==1.7.2" "numpy<2"
# pymodbus: independent Modbus TCP server and client for the extractor driver and
# simulator (issue 4; tests/tests/modbus_interop.rs, benches/modbus.rs). 3.16.1 installs
# and runs on Python 3.11; its SimDevice API is what the tests' server is written with.
python_peer pymodbus-3.16.1 "pymodbus==3.16.1"
# labmcp-astm-lis: an independent ASTM E1381 analyser simulator that drives pcrd's ASTM host
# (drivers/tests/astm_interop.rs). The other PyPI ASTM packages do not work on Python 3.11
# (field notes). It brings many dependencies of its own, so it gets its own directory.
PEER_DIR=astm python_peer labmcp-astm-lis-0.1.3 "labmcp-astm-lis==0.1.3"
# hl7: an independent HL7 v2 parser and MLLP server that receives and ACKs the HL7 sink's
# messages; hl7apy: validates each message against v2.5.1 at its STRICT level (issue 6;
# tests/tests/hl7_interop.rs, benches/hl7.rs).
python_peer hl7-0.4.5 "hl7==0.4.5"
python_peer hl7apy-1.3.5 "hl7apy==1.3.5"

echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
# The panel's Linux GPIO support (feature "gpio", off by default) still builds, lints
# clean and reports a missing chip by name (docs/panel.md; no gpio-sim here for more).
cargo clippy -p pcrd-drivers -p pcrd --features pcrd/gpio --all-targets --locked -- -D warnings
cargo test -p pcrd-drivers --features gpio --locked --lib panel::gpio
echo "== cargo test"
cargo test --workspace --locked --no-fail-fast
