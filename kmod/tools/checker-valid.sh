#!/bin/sh
# SPDX-License-Identifier: GPL-2.0
#
# Stand-in for the kernel's scripts/checker-valid.sh, which Debian's
# headers packages of 7.x do not ship: without it kbuild turns C=2 off
# ("sparse is not available or not up to date"). chroot.sh installs it into
# the headers of a build chroot. Prints 1 when the checker ($1...) exists
# and parses __typeof_unqual__ (what 7.x headers use), else 0.
command -v "$1" >/dev/null 2>&1 || exit 1
t=$(mktemp --suffix=.c) || exit 1
trap 'rm -f "$t"' EXIT
printf 'static inline int u(const int *q)\n{\n\t__typeof_unqual__(*q) v = *q;\n\treturn v;\n}\n' >"$t"
if "$@" "$t" 2>&1 | grep -q error; then echo 0; else echo 1; fi
