#!/usr/bin/env bash
# Runs pcrd's foundation benchmarks (BENCHMARKS.md) and records the machine they ran on.
#
#   scripts/bench.sh                      # everything (~6 minutes on 2 cores, plus the build)
#   scripts/bench.sh batch single         # only some sections: disk batch single footprint
#   PCRD_BENCH_RUNS=5 scripts/bench.sh    # more runs per figure (default 3)
#
# Installs wrk (Debian package) if it is missing. The log goes to
# target/bench/foundation-<UTC time>.log; its `BENCH ...` lines are the figures.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v wrk >/dev/null 2>&1; then
    echo "bench.sh: installing wrk" >&2
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq wrk
fi

mkdir -p target/bench
log="target/bench/foundation-$(date -u +%Y%m%dT%H%M%SZ).log"
{
    echo "# date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "# commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "# cpu: $(lscpu | sed -n 's/^Model name: *//p') x $(nproc)"
    echo "# kernel: $(uname -sr)"
    echo "# rustc: $(rustc --version)"
    echo "# wrk: $(wrk --version 2>&1 | head -1)"
    tmp="${TMPDIR:-/tmp}"
    echo "# scratch: $tmp on $(df -T "$tmp" | awk 'NR==2 {print $1, $2}')"
    dev="$(df --output=source "$tmp" | tail -1)"
    echo "# disk: $(lsblk -dno NAME,ROTA,SIZE,MODEL "$dev" 2>/dev/null || echo "$dev") (ROTA=1: reported rotational)"
    echo "# memory: $(free -m | awk '/^Mem:/ {print $2 " MiB"}')"
} | tee "$log"

cargo bench -p pcrd-tests --bench foundation -- "$@" 2>&1 | tee -a "$log"
echo "bench.sh: log in $log"
