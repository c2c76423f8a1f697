#!/bin/sh
# SPDX-License-Identifier: GPL-2.0
#
# Instructions per kvm_entry probe call, counted by callgrind on the
# harness build of the core (bench.c, -O2, RCU read sections as compiler
# barriers). Only instructions inside sf_probe() and its callees are
# collected (--toggle-collect), then divided by the number of calls.
#   hot:   already-marked path (the steady state)
#   first: first entry after a flush reset this CPU's cache and cleared
#          its dirty bit (lookup, test, atomic set, cache fill)
# Exits 1 if the hot path exceeds LIMIT (default 20) instructions.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
N=${N:-1000000}
LIMIT=${LIMIT:-20}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
make -s -C "$here" OUT="$tmp" "$tmp/bench" >/dev/null
bench="$tmp/bench"

count() {	# $1: mode
	valgrind --tool=callgrind --callgrind-out-file="$tmp/cg.$1" \
		--toggle-collect=sf_probe "$bench" "$1" "$N" \
		> "$tmp/out.$1" 2>&1
	ir=$(sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$tmp/out.$1")
	# One extra call warms the cache before the loop.
	awk -v ir="$ir" -v n="$N" 'BEGIN { printf "%.1f\n", ir / (n + 1) }'
}

hot=$(count hot)
first=$(count first)
echo "probe cost (callgrind, instructions per kvm_entry, N=$N, $(gcc -dumpfullversion) -O2, x86_64)"
echo "  already-marked path: $hot"
echo "  first-mark path:     $first"
if awk -v h="$hot" -v l="$LIMIT" 'BEGIN { exit !(h > l) }'; then
	echo "FAIL: already-marked path above $LIMIT instructions"
	exit 1
fi
echo "ok: already-marked path within $LIMIT instructions"
