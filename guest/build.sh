#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Build the conode guest: an i386 Linux kernel (bzImage) and an initramfs
# holding busybox, /init and the coagent agent, all from Debian packages.
#
#   guest/build.sh
#
# Outputs (in conode/vm/images/): bzImage, initramfs.cpio.gz, SHA256SUMS,
# BUILDINFO.  Work files go to ${CONODE_GUEST_BUILD:-/tmp/conode-guest-build};
# an existing kernel tree there is reused (incremental build) unless
# CONODE_GUEST_CLEAN=1.  SOURCE_DATE_EPOCH, if set, fixes all time stamps;
# by default the time stamp of the linux-source tarball is used, so that the
# same packages give the same initramfs bytes.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
out="$repo/conode/vm/images"
build=${CONODE_GUEST_BUILD:-/tmp/conode-guest-build}
kver_major=6.1
tarball=/usr/src/linux-source-$kver_major.tar.xz
jobs=$(nproc)

msg() { printf '==> %s\n' "$*" >&2; }
die() { printf 'build.sh: error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------
# Prerequisites: find everything missing first, then name the packages.
# ---------------------------------------------------------------------------
missing=()
need_cmd() {  # need_cmd COMMAND PACKAGE
	command -v "$1" >/dev/null 2>&1 || missing+=("$2")
}
need_cmd make make
need_cmd gcc gcc
need_cmd bc bc
need_cmd flex flex
need_cmd bison bison
need_cmd cpio cpio
need_cmd xz xz-utils
need_cmd gzip gzip
need_cmd perl perl
need_cmd sha256sum coreutils
need_cmd dpkg-query dpkg
[[ -f $tarball ]] || missing+=("linux-source-$kver_major")
[[ -f /usr/include/libelf.h ]] || missing+=(libelf-dev)
[[ -f /usr/include/openssl/opensslv.h ]] || missing+=(libssl-dev)

busybox=""
if [[ $(dpkg-query -W -f='${Status} ${Architecture}' busybox-static 2>/dev/null) == "install ok installed i386" ]]; then
	busybox=$(dpkg-query -L busybox-static:i386 | grep -m1 '/busybox$' || true)
fi
[[ -n $busybox && -x $busybox ]] || missing+=("busybox-static:i386")

# gcc -m32 -static needs the 32-bit glibc (gcc-multilib / libc6-dev-i386).
if command -v gcc >/dev/null 2>&1; then
	probe=$(mktemp -d)
	printf 'int main(void){return 0;}\n' >"$probe/t.c"
	gcc -m32 -static -o "$probe/t" "$probe/t.c" >/dev/null 2>&1 || missing+=(gcc-multilib)
	rm -rf "$probe"
fi

if ((${#missing[@]})); then
	{
		echo "build.sh: missing prerequisites: ${missing[*]}"
		echo "Install them with:"
		echo "  sudo dpkg --add-architecture i386 && sudo apt-get update"
		echo "  sudo apt-get install ${missing[*]}"
		echo "(the full list is in guest/README.md)"
	} >&2
	exit 1
fi

# The busybox binary must be a 32-bit x86 executable (ELF class 1, machine 3),
# and the host must be able to run it: we ask it for its applet list.
elf_class=$(od -An -tu1 -j4 -N1 "$busybox" | tr -d ' ')
elf_machine=$(od -An -tu2 -j18 -N2 "$busybox" | tr -d ' ')
[[ $elf_class == 1 && $elf_machine == 3 ]] || die "$busybox is not an i386 executable"
"$busybox" true 2>/dev/null || die "cannot run the i386 $busybox on this host (kernel without IA32 emulation?)"

export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(stat -c %Y "$tarball")}
# Make the kernel's version banner reproducible too.
export KBUILD_BUILD_TIMESTAMP="$(LC_ALL=C date -u -d "@$SOURCE_DATE_EPOCH")"
export KBUILD_BUILD_USER=conode KBUILD_BUILD_HOST=conode KBUILD_BUILD_VERSION=1
export LC_ALL=C

# ---------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------
mkdir -p "$build"
ksrc="$build/linux-source-$kver_major"
if [[ ${CONODE_GUEST_CLEAN:-0} == 1 ]]; then
	msg "removing $ksrc"
	rm -rf "$ksrc"
fi
if [[ ! -f $ksrc/Makefile ]]; then
	msg "extracting $tarball into $build"
	rm -rf "$ksrc"
	tar -C "$build" -xf "$tarball"
fi

msg "configuring the kernel from guest/kernel.config"
cp "$here/kernel.config" "$ksrc/.config"
make -C "$ksrc" -s ARCH=i386 olddefconfig >&2
# If olddefconfig changed anything, kernel.config no longer matches this
# kernel source: say so (the build still uses the adjusted .config).
if ! diff -q <(grep -v '^#' "$here/kernel.config" | grep -v '^$') \
	<(grep -v '^#' "$ksrc/.config" | grep -v '^$') >/dev/null; then
	msg "WARNING: olddefconfig changed the configuration; regenerate guest/kernel.config (guest/mkconfig.sh)"
fi

msg "building bzImage with $jobs jobs (this takes a few minutes)"
make -C "$ksrc" ARCH=i386 -j"$jobs" bzImage >"$build/kernel-build.log" 2>&1 ||
	{ tail -n 40 "$build/kernel-build.log" >&2; die "kernel build failed (log: $build/kernel-build.log)"; }
krelease=$(make -C "$ksrc" -s ARCH=i386 kernelrelease)
msg "kernel $krelease built"

# ---------------------------------------------------------------------------
# Agent
# ---------------------------------------------------------------------------
msg "building coagent"
gcc -m32 -static -Os -s -Wall -o "$build/coagent" "$here/agent/coagent.c"

# ---------------------------------------------------------------------------
# Initramfs
# ---------------------------------------------------------------------------
msg "assembling the initramfs"
gen="$build/gen_init_cpio"
gcc -O2 -o "$gen" "$ksrc/usr/gen_init_cpio.c"

# Stage the regular files so that their time stamps can be fixed: the cpio
# writer takes a file's mtime from the file itself.
stage="$build/rootfs-files"
rm -rf "$stage"
mkdir -p "$stage"
cp "$busybox" "$stage/busybox"
cp "$build/coagent" "$stage/coagent"
cp "$here/init" "$stage/init"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$stage/passwd"
printf 'root:x:0:\n' >"$stage/group"
printf 'conode\n' >"$stage/hostname"
printf '127.0.0.1\tlocalhost conode\n::1\tlocalhost\n' >"$stage/hosts"
# Names resolve from /etc/hosts only (coagent writes a job's guests there): the guest has no DNS.
printf 'hosts: files\n' >"$stage/nsswitch.conf"
touch -h -d "@$SOURCE_DATE_EPOCH" "$stage"/*

# Each entry is "path<TAB>gen_init_cpio line"; sorting by path puts every
# directory before its contents (a prefix sorts first), which the kernel's
# unpacker needs, and makes the order independent of how the list was made.
list="$build/initramfs.list"
{
	for d in /bin /sbin /usr /usr/bin /usr/sbin /dev /etc /proc /sys /run; do
		printf '%s\tdir %s 0755 0 0\n' "$d" "$d"
	done
	printf '/root\tdir /root 0700 0 0\n'
	printf '/tmp\tdir /tmp 1777 0 0\n'
	printf '/dev/console\tnod /dev/console 0600 0 0 c 5 1\n'
	printf '/init\tfile /init %s 0755 0 0\n' "$stage/init"
	printf '/bin/busybox\tfile /bin/busybox %s 0755 0 0\n' "$stage/busybox"
	printf '/sbin/coagent\tfile /sbin/coagent %s 0755 0 0\n' "$stage/coagent"
	printf '/etc/passwd\tfile /etc/passwd %s 0644 0 0\n' "$stage/passwd"
	printf '/etc/group\tfile /etc/group %s 0644 0 0\n' "$stage/group"
	printf '/etc/hostname\tfile /etc/hostname %s 0644 0 0\n' "$stage/hostname"
	printf '/etc/hosts\tfile /etc/hosts %s 0644 0 0\n' "$stage/hosts"
	printf '/etc/nsswitch.conf\tfile /etc/nsswitch.conf %s 0644 0 0\n' "$stage/nsswitch.conf"
	# One symlink per applet, where busybox itself says it belongs.
	"$busybox" --list-full | while read -r applet; do
		case $applet in
		bin/* | sbin/* | usr/bin/* | usr/sbin/*) ;;
		*) continue ;;  # e.g. "linuxrc": not wanted in the root
		esac
		[[ $applet == bin/busybox ]] && continue
		printf '/%s\tslink /%s /bin/busybox 0777 0 0\n' "$applet" "$applet"
	done
} | sort -t $'\t' -k1,1 -u | cut -f2- >"$list"

mkdir -p "$out"
"$gen" -t "$SOURCE_DATE_EPOCH" "$list" | gzip -9 -n >"$out/initramfs.cpio.gz.tmp"
mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
cp "$ksrc/arch/x86/boot/bzImage" "$out/bzImage"

# ---------------------------------------------------------------------------
# Checksums and build information
# ---------------------------------------------------------------------------
(cd "$out" && sha256sum bzImage initramfs.cpio.gz >SHA256SUMS)
{
	echo "kernel: Linux $krelease i386 (Debian linux-source-$kver_major $(dpkg-query -W -f='${Version}' "linux-source-$kver_major"))"
	echo "busybox: $("$busybox" 2>&1 | head -n1) (Debian busybox-static:i386 $(dpkg-query -W -f='${Version}' busybox-static))"
	echo "gcc: $(gcc --version | head -n1)"
	echo "SOURCE_DATE_EPOCH: $SOURCE_DATE_EPOCH"
	echo "built: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
} >"$out/BUILDINFO"

msg "done:"
ls -l "$out" >&2
cat "$out/BUILDINFO" >&2
