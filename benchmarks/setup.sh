#!/bin/sh
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Install what the benchmarks compare conode with, from Debian:
#   qemu-system-x86        qemu-system-i386, run on the same kernel and initramfs (TCG)
#   busybox-static:i386    the guest's own busybox, run natively on the host
# Idempotent: whatever is already installed is skipped. Needs root (or sudo).
set -eu

need_pkgs=""
add() { need_pkgs="$need_pkgs $1"; }

installed() {
	dpkg-query -W -f '${Status}\n' "$1" 2>/dev/null | grep -q '^install ok installed$'
}

command -v qemu-system-i386 >/dev/null 2>&1 || installed qemu-system-x86 || add qemu-system-x86
installed busybox-static:i386 || add busybox-static:i386

if [ -z "$need_pkgs" ]; then
	echo "setup: qemu-system-i386 and busybox-static:i386 are already installed" >&2
	exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
	if command -v sudo >/dev/null 2>&1; then
		SUDO=sudo
	else
		echo "setup: need root to install:$need_pkgs" >&2
		exit 1
	fi
fi

case "$need_pkgs" in
*:i386*)
	if ! dpkg --print-foreign-architectures | grep -qx i386; then
		echo "setup: enabling the i386 architecture" >&2
		$SUDO dpkg --add-architecture i386
	fi
	;;
esac

# The i386 security index sometimes fails to download; what is needed is usually still there.
echo "setup: apt-get update" >&2
$SUDO apt-get update || echo "setup: apt-get update reported errors; trying the install anyway" >&2

echo "setup: installing$need_pkgs" >&2
# shellcheck disable=SC2086  # the list is meant to be split
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y $need_pkgs

command -v qemu-system-i386 >/dev/null 2>&1 || { echo "setup: qemu-system-i386 still missing" >&2; exit 1; }
echo "setup: done" >&2
