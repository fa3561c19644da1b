"""Split virtqueues (virtio 1.x, section 2.7): the rings a driver and a device share in guest memory.

Everything in the rings is written by the guest, so every read is checked: the rings must lie in RAM at the
alignment the specification requires (checked when the queue is made ready), every buffer must lie in RAM,
a chain may not be longer than the queue, and the driver may not make more buffers available than the queue
holds. A queue that breaks a rule stops — :meth:`Virtqueue.pop` returns None from then on — and reports the
fault once through *on_error*, for the transport to ask the driver for a reset (DEVICE_NEEDS_RESET), as the
specification has a device do. The host never raises on guest data and never walks more than the queue size.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, NamedTuple, Protocol, Sequence

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
_RING_HEADER = 4  # flags and idx, u16 each
_DESC_ALIGN, _AVAIL_ALIGN, _USED_ALIGN = 16, 2, 4
_MAX_CHAIN_BYTES = (1 << 32) - 1  # the used ring's length field is 32 bits


class GuestMemory(Protocol):
    """What a device may do with guest RAM: read it, and write it as DMA. [0, size) is RAM."""

    size: int

    def read(self, address: int, length: int) -> bytes: ...

    def write(self, address: int, data: bytes | bytearray | memoryview) -> None: ...

    def window(self, address: int, length: int) -> memoryview:
        """RAM [address, address+length) without a copy, for the device to read (a disk write from it)."""
        ...

    def scatter(self, pieces: Sequence[tuple[int, int]], source: bytearray) -> None:
        """Write *source*, in order, into the RAM pieces (address, length): a disk read into its buffers."""
        ...


class Buffer(NamedTuple):
    """One descriptor of a chain: a guest-physical buffer (inside RAM) the device may read or write.
    (A tuple: a disk request's chain has a buffer per page, made in the hot path.)"""

    address: int
    length: int
    writable: bool


@dataclass(frozen=True)
class DescriptorChain:
    head: int
    buffers: tuple[Buffer, ...]

    def readable(self) -> list[Buffer]:
        return [b for b in self.buffers if not b.writable]

    def writable(self) -> list[Buffer]:
        return [b for b in self.buffers if b.writable]

    def readable_bytes(self) -> int:
        return sum(b.length for b in self.buffers if not b.writable)


def layout_error(memory_size: int, size: int, desc: int, avail: int, used: int, max_size: int) -> str | None:
    """Why a queue of *size* entries with rings at these addresses cannot be used, or None if it can."""
    if not 1 <= size <= max_size or size & (size - 1):
        return f"queue size {size} is not a power of two up to {max_size}"
    rings = (("descriptor table", desc, 16 * size, _DESC_ALIGN),
             ("available ring", avail, _RING_HEADER + 2 * size, _AVAIL_ALIGN),
             ("used ring", used, _RING_HEADER + 8 * size, _USED_ALIGN))
    for name, address, length, align in rings:
        if address % align:
            return f"{name} at {address:#x} is not {align}-byte aligned"
        if address + length > memory_size:
            return f"{name} at {address:#x}+{length} lies outside guest RAM"
    return None


class Virtqueue:
    """The device side of one split virtqueue whose layout :func:`layout_error` accepted."""

    def __init__(self, memory: GuestMemory, size: int, desc: int, avail: int, used: int,
                 on_error: Callable[[str], None], next_avail: int = 0, next_used: int = 0) -> None:
        self._mem = memory
        self.size = size
        self.desc = desc
        self.avail = avail
        self.used = used
        self.next_avail = next_avail  # the device's position in the avail ring (free-running u16)
        self.next_used = next_used  # the device's position in the used ring (free-running u16)
        self.broken = False
        self._on_error = on_error

    def fail(self, message: str) -> None:
        """Stop the queue for a driver error (a device may call it too, for a chain it cannot take)."""
        if not self.broken:
            self.broken = True
            self._on_error(message)

    def _avail_idx(self) -> int:
        return _U16.unpack(self._mem.read(self.avail + 2, 2))[0]

    def has_available(self) -> bool:
        return not self.broken and self._avail_idx() != self.next_avail

    def pop(self) -> DescriptorChain | None:
        """The next chain the driver made available, or None (none, or the queue is stopped)."""
        head = self.pop_head()
        if head is None:
            return None
        buffers = self._walk(head)
        return None if buffers is None else DescriptorChain(head, buffers)

    def pop_head(self) -> int | None:
        """The head of the next chain the driver made available, not yet walked (a device that walks chains
        itself must apply :meth:`_walk`'s rules), or None (none, or the queue is stopped)."""
        if self.broken:
            return None
        idx = self._avail_idx()
        if idx == self.next_avail:
            return None
        if (idx - self.next_avail) & 0xFFFF > self.size:
            self.fail(f"the driver made {(idx - self.next_avail) & 0xFFFF} buffers available in a queue of "
                      f"{self.size}")
            return None
        slot = self.next_avail % self.size
        head: int = _U16.unpack(self._mem.read(self.avail + _RING_HEADER + 2 * slot, 2))[0]
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return head

    def _walk(self, head: int) -> tuple[Buffer, ...] | None:
        # The disk's hot path (a descriptor per 4 KiB page): names bound locally, Buffers made without the
        # NamedTuple's Python-level constructor.
        size, memory_size = self.size, self._mem.size
        table = self._mem.window(self.desc, 16 * size)  # read in place: a chain may be as long as the queue
        unpack, make = _DESC.unpack_from, tuple.__new__
        buffers: list[Buffer] = []
        append = buffers.append
        index, total = head, 0
        for _ in range(size):
            if index >= size:
                self.fail(f"descriptor index {index} is outside a queue of {size}")
                return None
            address, length, flags, nxt = unpack(table, 16 * index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                self.fail("the driver used indirect descriptors, which were not negotiated")
                return None
            if address + length > memory_size:
                self.fail(f"a buffer at {address:#x}+{length} lies outside guest RAM")
                return None
            total += length
            if total > _MAX_CHAIN_BYTES:
                self.fail("a descriptor chain is longer than 4 GiB")
                return None
            append(make(Buffer, (address, length, flags & VIRTQ_DESC_F_WRITE != 0)))
            if not flags & VIRTQ_DESC_F_NEXT:
                return tuple(buffers)
            index = nxt
        self.fail(f"a descriptor chain is longer than the queue ({size}): it loops")
        return None

    def push_used(self, head: int, written: int) -> None:
        """Return a chain to the driver, saying how many bytes the device wrote into it."""
        if self.broken:
            return
        slot = self.next_used % self.size
        self._mem.write(self.used + _RING_HEADER + 8 * slot, _USED_ELEM.pack(head, written))
        self.next_used = (self.next_used + 1) & 0xFFFF
        self._mem.write(self.used + 2, _U16.pack(self.next_used))

    def interrupt_wanted(self) -> bool:
        flags = _U16.unpack(self._mem.read(self.avail, 2))[0]
        return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT


def read_chain(memory: GuestMemory, chain: DescriptorChain) -> bytes:
    """Concatenate the device-readable buffers of a chain (the caller bounds the chain's size first)."""
    return b"".join(memory.read(b.address, b.length) for b in chain.readable())


def write_chain(memory: GuestMemory, chain: DescriptorChain, data: bytes) -> int:
    """Fill the device-writable buffers of a chain with a prefix of *data*; return bytes written."""
    written = 0
    for buf in chain.writable():
        if written >= len(data):
            break
        part = data[written:written + buf.length]
        memory.write(buf.address, part)
        written += len(part)
    return written
