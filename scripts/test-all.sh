#!/usr/bin/env bash
# Runs every test of the project: the Rust workspace (unit, property,
# fixture, real-host and end-to-end tests), the fuzz targets for a bounded
# time (scripts/fuzz.sh), then the kernel module's checks
# and the QEMU rig when they are present. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== %s\n' "$*"; }

step "dependencies"
scripts/install-deps.sh

step "cargo test --workspace"
cargo test --locked --workspace --all-targets
cargo test --locked --workspace --doc

step "fuzzing (cargo fuzz, ${FUZZ_SECONDS:-30} s per target)"
scripts/fuzz.sh

step "release build and Debian packages"
cargo build --locked --release --bins
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
