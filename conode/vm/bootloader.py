"""The Linux/x86 32-bit boot protocol: place a bzImage, its initramfs and command line in guest RAM.

We skip the kernel's 16-bit real-mode setup: like a boot loader using the 32-bit protocol, we fill in
``struct boot_params`` (the "zero page") ourselves — setup header, e820 memory map, command line and initrd
location — and start the CPU at the protected-mode entry point with flat segments and ESI pointing at it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from conode.errors import GuestImageError
from conode.vm import layout

HDR_MAGIC = b"HdrS"
MIN_PROTOCOL = 0x0206  # the first version with cmdline_size; every 2.6.22+ kernel has it

# Offsets inside struct boot_params / the setup header (Documentation/arch/x86/boot.rst).
OFF_ALT_MEM_K = 0x1E0
OFF_E820_ENTRIES = 0x1E8
OFF_SETUP_SECTS = 0x1F1
OFF_HEADER_JUMP = 0x201
OFF_HEADER_MAGIC = 0x202
OFF_VERSION = 0x206
OFF_TYPE_OF_LOADER = 0x210
OFF_LOADFLAGS = 0x211
OFF_CODE32_START = 0x214
OFF_RAMDISK_IMAGE = 0x218
OFF_RAMDISK_SIZE = 0x21C
OFF_CMD_LINE_PTR = 0x228
OFF_INITRD_ADDR_MAX = 0x22C
OFF_CMDLINE_SIZE = 0x238
OFF_SETUP_DATA = 0x250
OFF_PREF_ADDRESS = 0x258
OFF_INIT_SIZE = 0x260
OFF_E820_TABLE = 0x2D0
E820_MAX_ENTRIES = 128
E820_RAM, E820_RESERVED = 1, 2
LOADED_HIGH = 0x01
SETUP_RNG_SEED = 9
RNG_SEED_BYTES = 32


@dataclass(frozen=True)
class KernelImage:
    """A parsed bzImage."""

    setup_header: bytes  # from OFF_SETUP_SECTS to the end of the header
    protected_mode: bytes  # the 32-bit part, loaded at code32_start
    protocol: int
    code32_start: int
    initrd_addr_max: int
    cmdline_size: int
    decompress_end: int  # the kernel unpacks itself below this address: the initrd must lie above it

    @classmethod
    def parse(cls, data: bytes, name: str = "kernel") -> "KernelImage":
        if len(data) < 0x1000 or data[OFF_HEADER_MAGIC : OFF_HEADER_MAGIC + 4] != HDR_MAGIC:
            raise GuestImageError(f"{name} is not a Linux bzImage (no 'HdrS' boot header); rebuild the guest image")
        protocol = struct.unpack_from("<H", data, OFF_VERSION)[0]
        if protocol < MIN_PROTOCOL:
            raise GuestImageError(f"{name} uses boot protocol {protocol >> 8}.{protocol & 0xFF}; need 2.06 or newer")
        if not data[OFF_LOADFLAGS] & LOADED_HIGH:
            raise GuestImageError(f"{name} is a zImage that loads low; conode needs a bzImage")
        setup_sects = data[OFF_SETUP_SECTS] or 4
        header_end = OFF_HEADER_MAGIC + data[OFF_HEADER_JUMP]
        pm_offset = (setup_sects + 1) * 512
        if pm_offset >= len(data):
            raise GuestImageError(f"{name} is truncated: its setup code claims {setup_sects} sectors")
        code32_start, = struct.unpack_from("<I", data, OFF_CODE32_START)
        initrd_addr_max, = struct.unpack_from("<I", data, OFF_INITRD_ADDR_MAX)
        cmdline_size, = struct.unpack_from("<I", data, OFF_CMDLINE_SIZE)
        if protocol >= 0x020A:  # pref_address and init_size say where and how large the unpacked kernel is
            pref_address, = struct.unpack_from("<Q", data, OFF_PREF_ADDRESS)
            init_size, = struct.unpack_from("<I", data, OFF_INIT_SIZE)
            decompress_end = pref_address + init_size
        else:
            decompress_end = 0x1000000 + 4 * (len(data) - pm_offset)
        return cls(
            setup_header=data[OFF_SETUP_SECTS:header_end],
            protected_mode=data[pm_offset:],
            protocol=protocol,
            code32_start=code32_start,
            initrd_addr_max=initrd_addr_max or layout.INITRD_MAX_END,
            cmdline_size=cmdline_size,
            decompress_end=decompress_end,
        )


def e820_map(ram_size: int) -> list[tuple[int, int, int]]:
    """(address, size, type) entries: conventional memory, the legacy hole, then the rest as RAM."""
    return [
        (0, layout.LOW_MEMORY_END, E820_RAM),
        (layout.LOW_MEMORY_END, layout.HIGH_MEMORY_START - layout.LOW_MEMORY_END, E820_RESERVED),
        (layout.HIGH_MEMORY_START, ram_size - layout.HIGH_MEMORY_START, E820_RAM),
    ]


def boot_gdt() -> bytes:
    """Null, null, then flat 4 GiB code (0x10) and data (0x18) segments, as the protocol requires."""
    return struct.pack("<4Q", 0, 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF)


@dataclass(frozen=True)
class BootPlan:
    """Where everything went; the CPU starts at *entry* with ESI = *boot_params*."""

    entry: int
    boot_params: int
    initrd_address: int
    initrd_size: int


def load_linux(ram: memoryview, kernel: KernelImage, initrd: bytes, cmdline: str,
               rng_seed: bytes | None = None) -> BootPlan:
    """Write kernel, initrd, command line, boot GDT and boot_params into *ram* (guest-physical).

    *rng_seed* (from the host's RNG) seeds the guest kernel's random pool at boot through a SETUP_RNG_SEED
    entry, so the guest does not stall for seconds gathering entropy on its first read of /dev/urandom.
    """
    ram_size = len(ram)
    encoded = cmdline.encode() + b"\0"
    limit = min(kernel.cmdline_size + 1 if kernel.cmdline_size else 256, layout.CMDLINE_MAX)
    if len(encoded) > limit:
        raise GuestImageError(f"kernel command line is {len(encoded)} bytes; this kernel takes at most {limit}")
    kernel_end = kernel.code32_start + len(kernel.protected_mode)
    top = min(ram_size, kernel.initrd_addr_max + 1)
    initrd_address = (top - len(initrd)) & ~(layout.PAGE_SIZE - 1)
    if initrd_address < max(kernel_end, kernel.decompress_end):
        raise GuestImageError(
            f"guest memory of {ram_size >> 20} MiB is too small for this kernel and a "
            f"{len(initrd) >> 10} KiB initramfs; give it more with --mem"
        )

    ram[kernel.code32_start:kernel_end] = kernel.protected_mode
    ram[initrd_address:initrd_address + len(initrd)] = initrd
    ram[layout.CMDLINE:layout.CMDLINE + len(encoded)] = encoded
    gdt = boot_gdt()
    ram[layout.BOOT_GDT:layout.BOOT_GDT + len(gdt)] = gdt

    params = bytearray(layout.PAGE_SIZE)
    params[OFF_SETUP_SECTS:OFF_SETUP_SECTS + len(kernel.setup_header)] = kernel.setup_header
    params[OFF_TYPE_OF_LOADER] = 0xFF  # "undefined" boot loader
    params[OFF_LOADFLAGS] |= LOADED_HIGH
    struct.pack_into("<I", params, OFF_RAMDISK_IMAGE, initrd_address)
    struct.pack_into("<I", params, OFF_RAMDISK_SIZE, len(initrd))
    struct.pack_into("<I", params, OFF_CMD_LINE_PTR, layout.CMDLINE)
    struct.pack_into("<I", params, OFF_ALT_MEM_K, (ram_size - layout.HIGH_MEMORY_START) >> 10)
    entries = e820_map(ram_size)
    params[OFF_E820_ENTRIES] = len(entries)
    for i, (address, size, kind) in enumerate(entries):
        struct.pack_into("<QQI", params, OFF_E820_TABLE + 20 * i, address, size, kind)
    if rng_seed and kernel.protocol >= 0x0209:  # setup_data exists since boot protocol 2.09
        entry = struct.pack("<QII", 0, SETUP_RNG_SEED, len(rng_seed)) + rng_seed
        ram[layout.SETUP_DATA:layout.SETUP_DATA + len(entry)] = entry
        struct.pack_into("<Q", params, OFF_SETUP_DATA, layout.SETUP_DATA)
    ram[layout.BOOT_PARAMS:layout.BOOT_PARAMS + len(params)] = params
    return BootPlan(kernel.code32_start, layout.BOOT_PARAMS, initrd_address, len(initrd))
