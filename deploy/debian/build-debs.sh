#!/usr/bin/env bash
# Builds the Debian packages of sevplace with dpkg-deb (no extra tooling):
#   sevplace_<ver>_amd64.deb      sevplaced, sevplacectl, systemd unit,
#                                 /etc/sevplace/sevplaced.toml (conffile), docs
#   sevflush-dkms_<ver>_all.deb   module sources under /usr/src for DKMS
# Usage: deploy/debian/build-debs.sh [--dkms-only] [OUT_DIR]   (default: target/debian)
# The release binaries must be built first (cargo build --release), except
# with --dkms-only, which builds sevflush-dkms alone.
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
dkms_only=0
if [ "${1:-}" = --dkms-only ]; then dkms_only=1; shift; fi
out=${1:-$top/target/debian}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$top/Cargo.toml" | head -1)
bin=${SEVPLACE_BIN_DIR:-$top/target/release}
if [ $dkms_only = 0 ]; then
  for b in sevplaced sevplacectl; do
    [ -x "$bin/$b" ] || { echo "build-debs: $bin/$b is missing (cargo build --release)" >&2; exit 1; }
  done
fi
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ $dkms_only = 0 ]; then

# --- agent --------------------------------------------------------------
pkg=$work/sevplace
install -d "$pkg/DEBIAN" "$pkg/usr/bin" "$pkg/lib/systemd/system" "$pkg/etc/sevplace" \
  "$pkg/usr/share/doc/sevplace/prometheus" "$pkg/usr/share/doc/sevplace/grafana"
install -m 0755 "$bin/sevplaced" "$bin/sevplacectl" "$pkg/usr/bin/"
install -m 0644 "$top/deploy/systemd/sevplaced.service" "$pkg/lib/systemd/system/"
install -m 0644 "$top/deploy/config/sevplaced.toml" "$pkg/etc/sevplace/"
for d in operations.md configuration.md api.md architecture.md abi.md security.md; do
  [ -f "$top/docs/$d" ] && install -m 0644 "$top/docs/$d" "$pkg/usr/share/doc/sevplace/"
done
install -m 0644 "$top"/deploy/prometheus/*.yml "$pkg/usr/share/doc/sevplace/prometheus/"
install -m 0644 "$top/deploy/grafana/sevplace.json" "$pkg/usr/share/doc/sevplace/grafana/"
cat > "$pkg/DEBIAN/control" <<CTL
Package: sevplace
Version: $version
Architecture: amd64
Maintainer: sevplace maintainers <maintainers@sevplace.invalid>
Section: admin
Priority: optional
Depends: libc6 (>= 2.36)
Recommends: sevflush-dkms (= $version)
Description: L3-aware placement of AMD SEV guests and cache-flush tracking
 sevplaced pins the vCPUs of confidential guests to few L3 domains, keeps
 other tenants off them, corrects drift, and serves a gRPC API, Prometheus
 metrics and the sevplacectl CLI.
CTL
echo "/etc/sevplace/sevplaced.toml" > "$pkg/DEBIAN/conffiles"
cat > "$pkg/DEBIAN/postinst" <<'SH'
#!/bin/sh
set -e
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable sevplaced.service >/dev/null
  systemctl restart sevplaced.service || true
fi
SH
cat > "$pkg/DEBIAN/prerm" <<'SH'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
  systemctl disable --now sevplaced.service >/dev/null || true
fi
SH
chmod 0755 "$pkg/DEBIAN/postinst" "$pkg/DEBIAN/prerm"
dpkg-deb --root-owner-group -Zxz --build "$pkg" "$out/sevplace_${version}_amd64.deb" >/dev/null
fi

# --- module (DKMS) -------------------------------------------------------
if [ -f "$top/kmod/dkms.conf" ]; then
  mpkg=$work/sevflush-dkms
  src=$mpkg/usr/src/sevflush-$version
  install -d "$mpkg/DEBIAN" "$src"
  for f in "$top"/kmod/*.c "$top"/kmod/*.h "$top/kmod/Kbuild" "$top/kmod/Makefile" "$top/kmod/dkms.conf"; do
    [ -f "$f" ] && install -m 0644 "$f" "$src/"
  done
  sed -i "s/^PACKAGE_VERSION=.*/PACKAGE_VERSION=\"$version\"/" "$src/dkms.conf"
  cat > "$mpkg/DEBIAN/control" <<CTL
Package: sevflush-dkms
Version: $version
Architecture: all
Maintainer: sevplace maintainers <maintainers@sevplace.invalid>
Section: kernel
Priority: optional
Depends: dkms (>= 3.0)
Description: sevflush kernel module (DKMS): per-VM dirty-CPU tracking for AMD SEV
 Tracks the CPUs that entered each KVM guest since their last cache flush,
 exports them in /sys/kernel/sevflush, and in targeted mode flushes only
 those CPUs where KVM flushes all.
CTL
  cat > "$mpkg/DEBIAN/postinst" <<SH
#!/bin/sh
set -e
if [ "\$1" = configure ]; then
  dkms add -m sevflush -v $version >/dev/null 2>&1 || true
  # every kernel whose headers are installed, not only the running one
  for b in /lib/modules/*/build; do
    [ -e "\$b/Makefile" ] || continue
    k=\${b%/build}; k=\${k##*/}
    dkms install -m sevflush -v $version -k "\$k" ||
      echo "sevflush-dkms: the module did not build for \$k; sevplaced runs without it there" >&2
  done
fi
SH
  cat > "$mpkg/DEBIAN/prerm" <<SH
#!/bin/sh
set -e
dkms remove -m sevflush -v $version --all >/dev/null 2>&1 || true
SH
  chmod 0755 "$mpkg/DEBIAN/postinst" "$mpkg/DEBIAN/prerm"
  dpkg-deb --root-owner-group -Zxz --build "$mpkg" "$out/sevflush-dkms_${version}_all.deb" >/dev/null
fi
ls -1 "$out"/*.deb
