#!/usr/bin/env bash
# Runs every test of the project: the Rust workspace (unit, property,
# fixture, real-host and end-to-end tests), the fuzz targets for a bounded
# time (scripts/fuzz.sh), then the kernel module's checks
# and the QEMU rig when they are present. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== %s\n' "$*"; }

# Every skip is appended here by the tests' skip helper (tests/src/skip.rs)
# and summarized at exit, pass or fail.
SEVPLACE_SKIP_LOG=$(mktemp -t sevplace-skips.XXXXXX)
export SEVPLACE_SKIP_LOG
skip_summary() {
  local n
  n=$(grep -c . "$SEVPLACE_SKIP_LOG" || true)
  printf '\n=== skipped tests: %s\n' "$n"
  if [ "$n" -gt 0 ]; then
    sort "$SEVPLACE_SKIP_LOG" | awk -F '\t' '{ printf "  %s (needs %s): %s\n", $1, $2, $3 }'
  fi
  rm -f "$SEVPLACE_SKIP_LOG"
}
trap skip_summary EXIT

step "dependencies"
scripts/install-deps.sh

step "cargo test --workspace"
cargo test --workspace --all-targets
cargo test --workspace --doc

step "fuzzing (cargo fuzz, ${FUZZ_SECONDS:-30} s per target)"
scripts/fuzz.sh

step "release build and Debian packages"
cargo build --release --bins
deploy/debian/check-debs.sh

if [ -x kmod/ci.sh ]; then
  step "kernel module: build against Debian kernels, sparse, checkpatch, harness, Spin"
  kmod/ci.sh
fi
if [ -x kmod/rig/run.sh ]; then
  step "kernel module: QEMU rig"
  kmod/rig/run.sh
fi
step "all tests passed"
