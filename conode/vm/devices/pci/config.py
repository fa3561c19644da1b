"""One PCI function's configuration space (a type-0 header), as the guest reads and writes it.

The 256 bytes hold the function's fixed identity and capabilities; a per-byte write mask (as on hardware, and
as QEMU models it) says which bits the guest may change: the command register, a few housekeeping bytes, the
Interrupt Line and the address bits of each BAR. Whatever the guest writes, only those bits change, so every
access is total. The function's INTx pin goes through here because the command register may mask it and the
status register reports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from conode.errors import SnapshotError
from conode.vm.devices.irq import IrqLine
from conode.vm.state import items, uint

CONFIG_SIZE = 256
NUM_BARS = 6
CAPABILITIES_START = 0x40

# header offsets
VENDOR_ID, DEVICE_ID, COMMAND, STATUS, REVISION, CLASS_PROG = 0x00, 0x02, 0x04, 0x06, 0x08, 0x09
CACHE_LINE_SIZE, LATENCY_TIMER, HEADER_TYPE, BAR0 = 0x0C, 0x0D, 0x0E, 0x10
SUBSYSTEM_VENDOR_ID, SUBSYSTEM_ID, CAPABILITIES_POINTER = 0x2C, 0x2E, 0x34
INTERRUPT_LINE, INTERRUPT_PIN = 0x3C, 0x3D

COMMAND_IO, COMMAND_MEMORY, COMMAND_MASTER, COMMAND_INTX_DISABLE = 0x1, 0x2, 0x4, 0x400
COMMAND_WRITABLE = COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_INTX_DISABLE
STATUS_INTERRUPT, STATUS_CAPABILITIES = 0x08, 0x10
INTX_PIN_A = 1
CAP_ID_VENDOR = 0x09


class Identity(NamedTuple):
    vendor: int
    device: int
    class_code: int  # base class, subclass, programming interface: 0xBBSSPP
    revision: int = 0
    subsystem_vendor: int = 0
    subsystem: int = 0


@dataclass(frozen=True)
class PciConfigState:
    """What the guest may have changed in a function's configuration space."""

    command: int = uint(16)
    cache_line_size: int = uint(8)
    latency_timer: int = uint(8)
    interrupt_line: int = uint(8)
    bars: tuple[int, ...] = items(exact=NUM_BARS)  # 32 bits each: checked against the function's masks


class ConfigSpace:
    """A function's configuration space: *bar_sizes* are 32-bit memory BARs (0: none), *capabilities* the
    bodies of the capability list (each starting with its ID; the next pointers are filled in here)."""

    def __init__(self, identity: Identity, bar_sizes: tuple[int, ...] = (), capabilities: tuple[bytes, ...] = (),
                 irq: IrqLine | None = None) -> None:
        self.data = bytearray(CONFIG_SIZE)
        self.wmask = bytearray(CONFIG_SIZE)
        self.bar_sizes = tuple(bar_sizes) + (0,) * (NUM_BARS - len(bar_sizes))
        self._irq = irq
        self.intx_level = False  # what the function drives on its pin, before the command register's mask
        self._put(VENDOR_ID, 2, identity.vendor)
        self._put(DEVICE_ID, 2, identity.device)
        self._put(REVISION, 1, identity.revision)
        self._put(CLASS_PROG, 3, identity.class_code)
        self._put(SUBSYSTEM_VENDOR_ID, 2, identity.subsystem_vendor)
        self._put(SUBSYSTEM_ID, 2, identity.subsystem)
        self._put(COMMAND, 2, 0, COMMAND_WRITABLE)
        self._put(CACHE_LINE_SIZE, 1, 0, 0xFF)
        self._put(LATENCY_TIMER, 1, 0, 0xFF)
        for index, size in enumerate(self.bar_sizes):
            if size:
                if size & (size - 1) or size < 16:
                    raise ValueError(f"a memory BAR's size is a power of two of at least 16 bytes, not {size}")
                self._put(BAR0 + 4 * index, 4, 0, ~(size - 1) & 0xFFFFFFF0)
        if irq is not None:
            self._put(INTERRUPT_PIN, 1, INTX_PIN_A)
            self._put(INTERRUPT_LINE, 1, irq.irq, 0xFF)  # where the host routed the pin: firmware's job on a PC
        pointer, at = CAPABILITIES_POINTER, CAPABILITIES_START
        for body in capabilities:
            if at + len(body) > CONFIG_SIZE:
                raise ValueError("the capabilities do not fit in the configuration space")
            self.data[pointer] = at
            self.data[at:at + len(body)] = body
            self.data[at + 1] = 0  # the end of the list, until another capability follows
            pointer, at = at + 1, at + (len(body) + 3) // 4 * 4
        if capabilities:
            self._put(STATUS, 2, STATUS_CAPABILITIES)

    def _put(self, offset: int, size: int, value: int, writable: int = 0) -> None:
        self.data[offset:offset + size] = value.to_bytes(size, "little")
        self.wmask[offset:offset + size] = writable.to_bytes(size, "little")

    def _get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset:offset + size], "little")

    # --- guest accesses (offset + size within the 256 bytes: the host bridge clips) ---------------------------
    def read(self, offset: int, size: int) -> int:
        value = int.from_bytes(self.data[offset:offset + size], "little")
        if self.intx_level and offset <= STATUS < offset + size:
            value |= STATUS_INTERRUPT << (8 * (STATUS - offset))
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            mask = self.wmask[offset + i]
            if mask:
                byte = (value >> (8 * i)) & 0xFF
                self.data[offset + i] = (self.data[offset + i] & ~mask) | (byte & mask)
        if offset <= COMMAND + 1 and COMMAND < offset + size:
            self._update_irq()

    # --- what the function and the bus need ---------------------------------------------------------------
    @property
    def command(self) -> int:
        return self._get(COMMAND, 2)

    def bar_base(self, index: int) -> int | None:
        """Where memory BAR *index* decodes, or None while it does not (no BAR, or memory decoding off)."""
        if not self.bar_sizes[index] or not self.command & COMMAND_MEMORY:
            return None
        return self._get(BAR0 + 4 * index, 4) & ~0xF

    def place_bar(self, index: int, base: int) -> None:
        """The host assigns BAR *index* (no firmware does it) and turns memory decoding on."""
        size = self.bar_sizes[index]
        if not size or base & (size - 1):
            raise ValueError(f"BAR {index} of size {size:#x} cannot sit at {base:#x}")
        self._put(BAR0 + 4 * index, 4, base, ~(size - 1) & 0xFFFFFFF0)
        self._put(COMMAND, 2, self.command | COMMAND_MEMORY, COMMAND_WRITABLE)

    def set_intx(self, level: bool) -> None:
        """The function drives its INTx pin."""
        self.intx_level = level
        self._update_irq()

    def _update_irq(self) -> None:
        if self._irq is not None:
            self._irq.set(self.intx_level and not self.command & COMMAND_INTX_DISABLE)

    # --- snapshots -------------------------------------------------------------------------------------------
    def get_state(self) -> PciConfigState:
        return PciConfigState(self.command, self._get(CACHE_LINE_SIZE, 1), self._get(LATENCY_TIMER, 1),
                              self._get(INTERRUPT_LINE, 1), tuple(self._get(BAR0 + 4 * i, 4)
                                                                  for i in range(NUM_BARS)))

    def set_state(self, saved: PciConfigState) -> None:
        """Restore *saved* (a checked record); raise SnapshotError if it sets bits this function keeps fixed."""
        fields = [(COMMAND, 2, saved.command), (CACHE_LINE_SIZE, 1, saved.cache_line_size),
                  (LATENCY_TIMER, 1, saved.latency_timer), (INTERRUPT_LINE, 1, saved.interrupt_line)]
        fields += [(BAR0 + 4 * i, 4, bar) for i, bar in enumerate(saved.bars)]
        for offset, size, value in fields:
            fixed = ~int.from_bytes(self.wmask[offset:offset + size], "little") & ((1 << (8 * size)) - 1)
            if value >> (8 * size) or (value ^ self._get(offset, size)) & fixed:
                raise SnapshotError(f"snapshot PCI configuration sets read-only bits at {offset:#x}; "
                                    "the file is damaged")
        for offset, size, value in fields:
            self.data[offset:offset + size] = value.to_bytes(size, "little")
        self._update_irq()
