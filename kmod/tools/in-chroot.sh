#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# Runs a command inside a build chroot made by chroot.sh, with /proc
# mounted (objtool reads /proc/self) in a private mount namespace, so
# nothing stays mounted when the command ends.
#   kmod/tools/in-chroot.sh ROOT COMMAND [ARG...]
set -euo pipefail
root=${1:?usage: in-chroot.sh ROOT COMMAND [ARG...]}
shift
exec unshare --mount --propagation private -- /bin/sh -c \
	'mount -t proc proc "$0/proc" && exec chroot "$0" "$@"' "$root" "$@"
