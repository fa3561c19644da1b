#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Build a Debian 12 (bookworm) i386 root image for conode guests:
#
#   sudo guest/mkimage-debian.sh [--variant full|small] [--free MiB] [--packages "p1 p2"] [--kernel] [OUTPUT]
#
# debootstrap --variant=minbase, plus python3 (both variants) and a handful of
# common tools (full), plus conode's in-guest agent as /sbin/coagent and
# guest/init as /sbin/conode-init, in an ext2 image (OUTPUT, by default
# debian-12-i386[-small].img) with --free MiB (default 512) left free for jobs.
# Boot it with `conode vm run --disk OUTPUT --disk-root -- python3 -V`. With
# --kernel the image also gets Debian's 686 kernel and an initramfs built by
# Debian's initramfs-tools, copied out as OUTPUT.vmlinuz and OUTPUT.initrd: a
# boot without anything of conode's but its agent (see guest/README.md).
#
# Reproducible as far as the archive allows: the same packages give the same
# bytes (time stamps from the suite's Release date or SOURCE_DATE_EPOCH, a
# file-system UUID and hash seed derived from it, no logs or caches). Work
# files go to ${CONODE_IMAGE_BUILD:-/tmp/conode-image-build}; downloaded
# packages are kept in ${CONODE_IMAGE_CACHE:-~/.cache/conode/debootstrap}.
# The output's size and SHA-256 are printed and written beside it
# (OUTPUT.sha256, OUTPUT.buildinfo with the package list).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
suite=bookworm
mirror=${CONODE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
variant=full
free_mib=512
extra=""
kernel=0
output=""
# The tools a job commonly reaches for, beyond minbase (which has bash, coreutils, findutils, grep, sed, mawk,
# gzip, tar, diffutils, hostname, util-linux).
full_tools="procps iproute2 iputils-ping netcat-openbsd less file xz-utils bzip2 bc ca-certificates"

started=$(date +%s)
msg() { printf '==> [%3ss] %s\n' $(($(date +%s) - started)) "$*" >&2; }
die() { printf 'mkimage-debian.sh: error: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '4,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

while (($#)); do
	case $1 in
	--variant) variant=${2:-}; shift 2 ;;
	--free) free_mib=${2:-}; shift 2 ;;
	--packages) extra=${2:-}; shift 2 ;;
	--kernel) kernel=1; shift ;;
	-h | --help) usage ;;
	-*) die "unknown option $1 (see --help)" ;;
	*) output=$1; shift ;;
	esac
done
case $variant in
full) packages="python3 $full_tools" ; name=debian-12-i386 ;;
small) packages="python3" ; name=debian-12-i386-small ;;
*) die "--variant is full or small (got '$variant')" ;;
esac
[[ $free_mib =~ ^[0-9]+$ ]] || die "--free takes a number of MiB (got '$free_mib')"
packages="$packages $extra"
output=$(realpath -m "${output:-$name.img}")

# ---------------------------------------------------------------------------
# Prerequisites
# ---------------------------------------------------------------------------
[[ $EUID == 0 ]] || die "debootstrap needs root (it unpacks as root and chroots): run this with sudo"
missing=()
for pair in debootstrap:debootstrap mke2fs:e2fsprogs debugfs:e2fsprogs cpio:cpio gzip:gzip sha256sum:coreutils chroot:coreutils; do
	command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
((${#missing[@]} == 0)) || die "missing prerequisites: install them with: apt-get install ${missing[*]}"
initramfs="$repo/conode/vm/images/initramfs.cpio.gz"
[[ -f $initramfs ]] || die "$initramfs not found: build the guest first (guest/build.sh)"

build=${CONODE_IMAGE_BUILD:-/tmp/conode-image-build}/$variant
cache=${CONODE_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/conode/debootstrap}
root="$build/rootfs"
mkdir -p "$build" "$cache"
cleanup() {  # never leave the host's file systems mounted in the tree
	for m in var/cache/apt/archives proc sys dev/pts dev; do
		mountpoint -q "$root/$m" 2>/dev/null && umount -l "$root/$m" || true
	done
}
trap cleanup EXIT
cleanup
rm -rf "$root"

# ---------------------------------------------------------------------------
# The Debian system
# ---------------------------------------------------------------------------
msg "debootstrap $suite i386 minbase + $(echo $packages) from $mirror (packages cached in $cache)"
include=$(echo $packages | tr ' ' ',')
progress() {  # debootstrap's stages, without its line per package
	while IFS= read -r line; do
		case $line in
		"I: Retrieving "* | "I: Validating "* | "I: Extracting "*) ;;
		"I: Unpacking the "* | "I: Configuring the "*) printf '    %s\n' "$line" >&2 ;;
		"I: Unpacking "* | "I: Configuring "*) ;;
		*) printf '    %s\n' "$line" >&2 ;;
		esac
	done
}
if ! debootstrap --arch=i386 --variant=minbase --include="$include" --cache-dir="$cache" \
	"$suite" "$root" "$mirror" 2>&1 | progress || [[ ! -x $root/bin/sh ]]; then
	die "debootstrap failed (log: $root/debootstrap/debootstrap.log)"
fi

# Time stamps: the suite's Release date (what the archive said when the packages were chosen), unless given.
release_file=$(ls "$root"/var/lib/apt/lists/*_Release 2>/dev/null | head -n1 || true)
if [[ -z ${SOURCE_DATE_EPOCH:-} ]]; then
	[[ -n $release_file ]] || die "no Release file in the new system to take the time stamp from; set SOURCE_DATE_EPOCH"
	SOURCE_DATE_EPOCH=$(date -u -d "$(sed -n 's/^Date: //p' "$release_file")" +%s)
fi
export SOURCE_DATE_EPOCH

if ((kernel)); then
	# Debian's initramfs for conode's PC: the drivers of its disk on PCI and of the root's file system (ext2
	# is served by ext4), listed rather than guessed from the build host's hardware; the rest loads from
	# the disk.
	msg "installing Debian's 686 kernel and building its initramfs"
	mkdir -p "$root/etc/initramfs-tools/conf.d"
	printf 'MODULES=list\n' >"$root/etc/initramfs-tools/conf.d/conode"
	printf 'virtio_pci\nvirtio_blk\next4\n' >>"$root/etc/initramfs-tools/modules"
	mount -t proc proc "$root/proc"
	mount --bind "$cache" "$root/var/cache/apt/archives"  # the package cache serves apt as it serves debootstrap
	DEBIAN_FRONTEND=noninteractive chroot "$root" apt-get install -y -qq --no-install-recommends \
		linux-image-686 initramfs-tools 2>&1 | sed "s/^/    /" >&2 || die "installing the kernel failed"
	umount "$root/var/cache/apt/archives" "$root/proc"
	vmlinuz=$(ls "$root"/boot/vmlinuz-* | head -n1)
	initrd=$(ls "$root"/boot/initrd.img-* | head -n1)
	[[ -f $vmlinuz && -f $initrd ]] || die "the kernel or its initramfs is missing from /boot"
fi

msg "configuring the guest's system"
printf 'conode\n' >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost conode\n::1\tlocalhost\n' >"$root/etc/hosts"
rm -f "$root/etc/resolv.conf"  # the host's: the guest has no DNS (names come from /etc/hosts)
mkdir -p "$root/job" "$root/etc/dpkg/dpkg.cfg.d"
# Documentation, manuals and translations are dropped, now and for what a job installs later.
cat >"$root/etc/dpkg/dpkg.cfg.d/conode-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
find "$root/usr/share/doc" -mindepth 2 ! -name copyright ! -type d -delete 2>/dev/null || true
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/*
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} + 2>/dev/null || true
# Caches and logs: rebuilt on demand, and they differ from build to build.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
	"$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old "$root/debootstrap" \
	"$root/var/cache/ldconfig/aux-cache"
find "$root/var/log" -type f -delete
: >"$root/etc/machine-id" 2>/dev/null || true

msg "installing the in-guest agent"
# The agent and init conode ships (the same bytes as in its initramfs): /sbin/coagent serves the host, and
# /sbin/conode-init starts it where no conode initramfs does (a distribution kernel: init=/sbin/conode-init).
agent_tmp=$(mktemp -d)
(cd "$agent_tmp" && gzip -dc "$initramfs" | cpio -id --quiet sbin/coagent init)
install -m 0755 "$agent_tmp/sbin/coagent" "$root/sbin/coagent"
install -m 0755 "$agent_tmp/init" "$root/sbin/conode-init"
rm -rf "$agent_tmp"

# Every file gets the same time stamp; then Python's byte code is compiled again against it (a .pyc names its
# source's mtime: without this every import in the guest would find its .pyc stale and compile again).
find "$root" -xdev -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
if [[ -x $root/usr/bin/python3 ]]; then
	msg "compiling Python's byte code"
	env -u SOURCE_DATE_EPOCH chroot "$root" /usr/bin/python3 -m compileall -q -f \
		--invalidation-mode timestamp /usr/lib/python3 /usr/lib/python3.11 >/dev/null ||
		msg "WARNING: some Python files did not compile (they will be compiled when imported)"
	find "$root" -xdev -newermt "@$SOURCE_DATE_EPOCH" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
fi

# ---------------------------------------------------------------------------
# The image
# ---------------------------------------------------------------------------
used_mib=$(du -sxm "$root" | cut -f1)
size_mib=$(((used_mib * 11 / 10 + free_mib + 63) / 64 * 64))  # +10 % for the file system's own blocks
seed=$(printf 'conode-debian-%s-%s' "$variant" "$SOURCE_DATE_EPOCH" | sha256sum | cut -c1-32)
uuid="${seed:0:8}-${seed:8:4}-4${seed:13:3}-a${seed:17:3}-${seed:20:12}"
msg "making the ext2 image: $used_mib MiB of files in $size_mib MiB"
rm -f "$output.tmp"
E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH mke2fs -q -F -t ext2 -b 4096 -m 0 -L conode-debian -U "$uuid" \
	-E "hash_seed=$uuid,root_owner=0:0" -d "$root" "$output.tmp" "${size_mib}M" >/dev/null ||
	die "mke2fs failed"
# mke2fs copies each file's access and change times from the build tree (the build's own moments): set them
# to the time stamp too, with one debugfs script (a name with a double quote keeps its own).
(
	cd "$root"
	printf 'sif / atime @%s\nsif / ctime @%s\n' "$SOURCE_DATE_EPOCH" "$SOURCE_DATE_EPOCH"
	find . -mindepth 1 ! -name '*"*' -printf '%P\n' | while IFS= read -r path; do
		printf 'sif "/%s" atime @%s\nsif "/%s" ctime @%s\n' "$path" "$SOURCE_DATE_EPOCH" "$path" "$SOURCE_DATE_EPOCH"
	done
) >"$build/times.debugfs"
debugfs -w -f "$build/times.debugfs" "$output.tmp" >/dev/null 2>"$build/times.log" ||
	die "setting the image's time stamps failed (log: $build/times.log)"
mv "$output.tmp" "$output"
if ((kernel)); then
	install -m 0644 "$vmlinuz" "$output.vmlinuz"
	install -m 0644 "$initrd" "$output.initrd"
	touch -d "@$SOURCE_DATE_EPOCH" "$output.vmlinuz" "$output.initrd"
	msg "Debian's kernel $(basename "$vmlinuz" | sed 's/^vmlinuz-//'): $output.vmlinuz, its initramfs: $output.initrd"
fi

digest=$(sha256sum "$output" | cut -d' ' -f1)
printf '%s  %s\n' "$digest" "$(basename "$output")" >"$output.sha256"
{
	echo "image: Debian 12 ($suite) i386, debootstrap --variant=minbase, variant $variant"
	echo "mirror: $mirror"
	echo "SOURCE_DATE_EPOCH: $SOURCE_DATE_EPOCH ($(date -u -d "@$SOURCE_DATE_EPOCH" '+%Y-%m-%d %H:%M:%S UTC'))"
	echo "size: $size_mib MiB ($used_mib MiB of files); sha256: $digest"
	echo "agent: /sbin/coagent from conode's initramfs $(sha256sum "$initramfs" | cut -c1-16)"
	echo "packages:"
	dpkg-query --admindir="$root/var/lib/dpkg" -W -f '  ${Package} ${Version}\n'
} >"$output.buildinfo"
allocated=$(du -m "$output" | cut -f1)
msg "done in $(($(date +%s) - started)) s: $output"
printf '%s: %s MiB (%s MiB allocated, %s MiB of files), sha256 %s\n' \
	"$output" "$size_mib" "$allocated" "$used_mib" "$digest"
