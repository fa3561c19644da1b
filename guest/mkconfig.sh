#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Regenerate guest/kernel.config from scratch: tinyconfig plus the options
# conode needs.  Usage: guest/mkconfig.sh LINUX_SOURCE_DIR
# The result is written to guest/kernel.config (next to this script).
# Normally you do not need this: build.sh uses the checked-in kernel.config.
set -euo pipefail

src=${1:?usage: $0 LINUX_SOURCE_DIR}
here=$(cd "$(dirname "$0")" && pwd)
cd "$src"

make ARCH=i386 tinyconfig >&2

cfg() { scripts/config --file .config "$@"; }

# Console, early output and the initramfs.
cfg -e PRINTK -e EARLY_PRINTK -e PRINTK_TIME -e TTY -e SERIAL_8250 \
    -e SERIAL_8250_CONSOLE -e UNIX98_PTYS -e BLK_DEV_INITRD -e RD_GZIP \
    -e KERNEL_GZIP -d KERNEL_XZ -d KERNEL_LZMA -d KERNEL_BZIP2 -d KERNEL_LZO \
    -d KERNEL_LZ4 -d KERNEL_ZSTD
# What busybox, the agent and ordinary programs expect from the kernel.
cfg -e BINFMT_ELF -e BINFMT_SCRIPT -e DEVTMPFS -e DEVTMPFS_MOUNT -e PROC_FS \
    -e SYSFS -e TMPFS -e SHMEM -e FUTEX -e EPOLL -e SIGNALFD -e TIMERFD \
    -e EVENTFD -e MULTIUSER -e FILE_LOCKING -e POSIX_TIMERS -d ELF_CORE
# Networking (loopback and AF_UNIX are what most tools need).
cfg -e NET -e INET -e UNIX -e PACKET
# Devices: virtio over MMIO, declared on the command line by the host.
cfg -e BLOCK -e VIRTIO_MENU -e VIRTIO -e VIRTIO_MMIO \
    -e VIRTIO_MMIO_CMDLINE_DEVICES -e VIRTIO_BLK -e NETDEVICES -e NET_CORE \
    -e VIRTIO_NET -e HVC_DRIVER -e VIRTIO_CONSOLE -e EXT2_FS
# CPU and platform: keep the emulated machine as simple as possible.
cfg -d 64BIT -e M486SX -d M486 -d M686 -d MPENTIUMII -d GENERIC_CPU -d SMP \
    -d X86_LOCAL_APIC -d X86_IO_APIC -d X86_UP_APIC -d X86_UP_IOAPIC \
    -e NOHIGHMEM -d HIGHMEM4G -d HIGHMEM64G -d X86_PAE \
    -e HZ_100 -d HZ_250 -d HZ_300 -d HZ_1000 \
    -d RELOCATABLE -d RANDOMIZE_BASE --set-val PHYSICAL_START 0x1000000 \
    -d NO_HZ -d NO_HZ_IDLE -d NO_HZ_FULL -e HZ_PERIODIC \
    -d MODULES -d DEBUG_INFO -d DEBUG_KERNEL
# System calls tinyconfig drops that ordinary i386 user space needs.
# COMPAT_32BIT_TIME matters most: without the 32-bit time system calls,
# Debian's i386 busybox "sleep 2" returns at once.
cfg -e COMPAT_32BIT_TIME -e SYSVIPC -e POSIX_MQUEUE -e INOTIFY_USER \
    -e ADVISE_SYSCALLS -e MEMBARRIER -e FHANDLE
# PCI with virtio-pci, for machines that offer devices there (qemu's pc, the reference in benchmarks/). conode
# offers its devices on virtio-mmio too, and its own guests use those: the built-in command line turns PCI off,
# and a host that wants it passes pci=conf1 (a later pci= option wins).
cfg -e PCI -e PCI_GODIRECT -d PCI_GOANY -d PCI_GOBIOS -d PCI_GOMMCONFIG -e VIRTIO_PCI -d VIRTIO_PCI_LEGACY \
    -d PCI_QUIRKS -d PCIEPORTBUS -d PCI_MSI -d HOTPLUG_PCI -d VGA_ARB -d PCIEASPM -d SERIAL_8250_PCI \
    -d SERIAL_8250_EXAR -d SERIAL_8250_LPSS -d SERIAL_8250_MID -d SERIAL_8250_PERICOM -d PERF_EVENTS_INTEL_UNCORE \
    -d PERF_EVENTS_INTEL_RAPL -d PERF_EVENTS_INTEL_CSTATE \
    -e CMDLINE_BOOL --set-str CMDLINE "pci=off"
# Things tinyconfig or the options above pull in that a headless guest with
# a serial console does not use: less to build, less for the emulator to run.
cfg -d IPV6 -d INET_DIAG -d VT -d INPUT -d SERIO
# The host passes a seed from its own RNG in boot_params' setup_data. x86 parses setup_data before the command
# line, so random.trust_bootloader=on comes too late: trusting the boot loader must be the built-in default,
# or the guest's first read of /dev/urandom waits seconds for entropy.
cfg -e RANDOM_TRUST_BOOTLOADER
# The kernel's own x87 emulator, for engines whose x87 cannot be trusted (booted with no387).
cfg -e MODIFY_LDT_SYSCALL -e MATH_EMULATION

make ARCH=i386 olddefconfig >&2
cp .config "$here/kernel.config"
echo "wrote $here/kernel.config" >&2
