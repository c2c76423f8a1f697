#!/usr/bin/env bash
# Builds the packages and checks their contents with dpkg-deb -c / -I.
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$top/deploy/debian/build-debs.sh" "$out" >/dev/null
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$top/Cargo.toml" | head -1)
fail=0
expect() { # deb path...
  local deb=$1; shift
  local listing; listing=$(dpkg-deb -c "$deb")
  for p in "$@"; do
    if ! grep -q " \./${p#/}\$" <<<"$listing"; then
      echo "check-debs: $(basename "$deb") lacks $p" >&2; fail=1
    fi
  done
}
agent=$out/sevplace_${version}_amd64.deb
expect "$agent" /usr/bin/sevplaced /usr/bin/sevplacectl /lib/systemd/system/sevplaced.service \
  /etc/sevplace/sevplaced.toml /usr/share/doc/sevplace/prometheus/sevplace.rules.yml \
  /usr/share/doc/sevplace/grafana/sevplace.json
info=$(dpkg-deb -I "$agent")
grep -q "Package: sevplace" <<<"$info" || { echo "check-debs: bad control" >&2; fail=1; }
grep -q "conffiles" <<<"$info" || { echo "check-debs: no conffiles" >&2; fail=1; }
if [ -f "$top/kmod/dkms.conf" ]; then
  dkms=$out/sevflush-dkms_${version}_all.deb
  expect "$dkms" "/usr/src/sevflush-$version/dkms.conf" "/usr/src/sevflush-$version/Makefile" \
    "/usr/src/sevflush-$version/Kbuild"
  conf=$(dpkg-deb --fsys-tarfile "$dkms" | tar -xO "./usr/src/sevflush-$version/dkms.conf")
  grep -q "PACKAGE_VERSION=\"$version\"" <<<"$conf" || { echo "check-debs: dkms.conf version" >&2; fail=1; }
fi
[ "$fail" = 0 ] && echo "check-debs: packages OK ($(ls "$out" | tr '\n' ' '))"
exit "$fail"
