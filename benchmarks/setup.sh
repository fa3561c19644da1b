#!/bin/sh
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Install what the benchmarks compare conode with, from Debian:
#   qemu-system-x86        qemu-system-i386, run on the same kernel and initramfs (TCG)
#   busybox-static:i386    the guest's own busybox, run natively on the host
# and fetches (without installing them) the Debian i386 programs of real_software.py with the libraries they
# load, unpacked into one tree: $CONODE_CACHE_DIR/debian-i386 (default ~/.cache/conode/debian-i386).
# Idempotent: whatever is already installed or fetched is skipped. Needs root (or sudo) to install.
set -eu

# real_software.py's programs; the libraries they need are found from Debian's own dependencies.
REAL_SOFTWARE="xz-utils bzip2 zstd openssl bc gawk python3.11-minimal"
DEBIAN_TREE="${CONODE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/conode}/debian-i386"

need_pkgs=""
add() { need_pkgs="$need_pkgs $1"; }

installed() {
	dpkg-query -W -f '${Status}\n' "$1" 2>/dev/null | grep -q '^install ok installed$'
}

command -v qemu-system-i386 >/dev/null 2>&1 || installed qemu-system-x86 || add qemu-system-x86
installed busybox-static:i386 || add busybox-static:i386

# The i386 packages of $REAL_SOFTWARE and, recursively, the i386 packages they depend on (the libraries: the
# architecture-independent ones, such as readline-common, hold no code and are left out).
i386_closure() {
	todo="$REAL_SOFTWARE"
	seen=""
	while [ -n "$todo" ]; do
		next=""
		for pkg in $todo; do
			case " $seen " in *" $pkg "*) continue ;; esac
			seen="$seen $pkg"
			deps=$(apt-cache depends --no-recommends --no-suggests --no-enhances --no-breaks --no-conflicts \
				--no-replaces "$pkg:i386" | sed -n 's/^ *|\{0,1\}\(Pre\)\{0,1\}Depends: \([^ :<]*\):i386$/\2/p')
			next="$next $deps"
		done
		todo="$next"
	done
	echo $seen
}

fetch_real_software() {
	if [ -f "$DEBIAN_TREE/.complete" ]; then
		echo "setup: the Debian i386 programs are already in $DEBIAN_TREE" >&2
		return 0
	fi
	if ! apt-cache show libc6:i386 >/dev/null 2>&1; then
		echo "setup: apt knows no i386 packages: run 'dpkg --add-architecture i386 && apt-get update' as root" >&2
		return 1
	fi
	pkgs=$(i386_closure)
	echo "setup: fetching into $DEBIAN_TREE:$(printf ' %s' $pkgs)" >&2
	rm -rf "$DEBIAN_TREE"
	mkdir -p "$DEBIAN_TREE/debs" "$DEBIAN_TREE/root"
	# shellcheck disable=SC2046  # one argument per package
	(cd "$DEBIAN_TREE/debs" && apt-get download $(printf '%s:i386 ' $pkgs))
	for deb in "$DEBIAN_TREE"/debs/*.deb; do
		dpkg-deb -x "$deb" "$DEBIAN_TREE/root"
	done
	touch "$DEBIAN_TREE/.complete"
}

if [ -z "$need_pkgs" ]; then
	echo "setup: qemu-system-i386 and busybox-static:i386 are already installed" >&2
	fetch_real_software
	echo "setup: done" >&2
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
fetch_real_software
echo "setup: done" >&2
