#!/usr/bin/env bash
# Installs what the build and the tests need on Debian 12, idempotently:
# apt packages (only the missing ones) and rustup components. Needs root
# for apt; without root it only reports what is missing.
set -euo pipefail

APT_PACKAGES=(
  build-essential pkg-config python3 curl ca-certificates
  python3-venv # the grpcio client tests (tests/tests/python_client.rs)
  util-linux   # taskset
  prometheus   # promtool: checks /metrics output and alert rules
  systemd      # systemd-analyze: verifies the unit file
  qemu-system-x86  # real QEMU VMs for the discovery/pinning tests and the kernel rig
  faketime     # libfaketime: wall-clock jumps under the real daemon (tests/tests/clock.rs)
  python3-venv # the OpenStack Placement venv of the fleet tests (scripts/placement-venv.sh)
  mariadb-server  # private mariadbd for concurrent Placement tests (tests/src/openstack.rs)
)
if [ -n "${SEVPLACE_EXTRA_APT:-}" ]; then
  # shellcheck disable=SC2206
  APT_PACKAGES+=(${SEVPLACE_EXTRA_APT})
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: missing apt packages (run as root to install): ${missing[*]}" >&2
    exit 1
  fi
  echo "install-deps: apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if command -v rustup >/dev/null 2>&1; then
  for c in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
  done
fi

# Build chroots (debootstrap minbase of trixie and sid, cached in
# /var/cache/sevplace-kmod) for the kernels whose userland is newer than
# Debian 12: kmod/ci.sh and kmod/rig/run.sh build sevflush.ko inside them.
# Both at once: each is mostly download and unpack time.
if [ "$(id -u)" -eq 0 ] && [ -x kmod/tools/chroot.sh ]; then
  kmod/tools/kernels.sh >/dev/null   # package lists first, once
  kmod/tools/chroot.sh bpo >/dev/null & bpo=$!
  kmod/tools/chroot.sh sid >/dev/null & sid=$!
  wait "$bpo"
  wait "$sid"
  echo "install-deps: build chroots for trixie-backports and sid ready"
fi

# cargo-fuzz for scripts/fuzz.sh (runs on stable with RUSTC_BOOTSTRAP=1).
if command -v cargo >/dev/null 2>&1 && ! cargo fuzz --version >/dev/null 2>&1; then
  echo "install-deps: cargo install cargo-fuzz --locked"
  cargo install cargo-fuzz --locked --quiet
fi

# The real OpenStack Placement for the fleet tests (tests/tests/fleet.rs):
# a venv under ~/.cache/sevplace, made once (about 40 s).
scripts_dir="$(cd "$(dirname "$0")" && pwd)"
"$scripts_dir/placement-venv.sh" >/dev/null
