"""Split virtqueues (virtio 1.x, section 2.7): the rings a driver and a device share in guest memory."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

from conode.errors import GuestCrashed

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


class GuestMemory(Protocol):
    """What a device may do with guest RAM: read it, and write it as DMA."""

    def read(self, address: int, length: int) -> bytes: ...

    def write(self, address: int, data: bytes) -> None: ...


@dataclass
class Buffer:
    """One descriptor of a chain: a guest-physical buffer the device may read or write."""

    address: int
    length: int
    writable: bool


@dataclass
class DescriptorChain:
    head: int
    buffers: list[Buffer]

    def readable(self) -> list[Buffer]:
        return [b for b in self.buffers if not b.writable]

    def writable(self) -> list[Buffer]:
        return [b for b in self.buffers if b.writable]


class Virtqueue:
    """The device side of one split virtqueue."""

    def __init__(self, memory: GuestMemory, size: int, desc: int, avail: int, used: int) -> None:
        self._mem = memory
        self.size = size
        self.desc = desc
        self.avail = avail
        self.used = used
        self.next_avail = 0  # the device's position in the avail ring (free-running u16)
        self.next_used = 0  # the device's position in the used ring (free-running u16)

    def _avail_idx(self) -> int:
        return _U16.unpack(self._mem.read(self.avail + 2, 2))[0]

    def has_available(self) -> bool:
        return self._avail_idx() != self.next_avail

    def pop(self) -> DescriptorChain | None:
        """The next chain the driver made available, or None."""
        if self._avail_idx() == self.next_avail:
            return None
        slot = self.next_avail % self.size
        head = _U16.unpack(self._mem.read(self.avail + 4 + 2 * slot, 2))[0]
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return DescriptorChain(head, self._walk(head))

    def _walk(self, head: int) -> list[Buffer]:
        buffers: list[Buffer] = []
        table, table_size, index = self.desc, self.size, head
        for _ in range(self.size + 1):
            if index >= table_size:
                raise GuestCrashed(f"virtqueue descriptor index {index} out of range {table_size}")
            address, length, flags, nxt = _DESC.unpack(self._mem.read(table + 16 * index, 16))
            if flags & VIRTQ_DESC_F_INDIRECT:
                table, table_size, index = address, length // 16, 0
                continue
            buffers.append(Buffer(address, length, bool(flags & VIRTQ_DESC_F_WRITE)))
            if not flags & VIRTQ_DESC_F_NEXT:
                return buffers
            index = nxt
        raise GuestCrashed("virtqueue descriptor chain loops")

    def push_used(self, head: int, written: int) -> None:
        """Return a chain to the driver, saying how many bytes the device wrote into it."""
        slot = self.next_used % self.size
        self._mem.write(self.used + 4 + 8 * slot, _USED_ELEM.pack(head, written))
        self.next_used = (self.next_used + 1) & 0xFFFF
        self._mem.write(self.used + 2, _U16.pack(self.next_used))

    def interrupt_wanted(self) -> bool:
        flags = _U16.unpack(self._mem.read(self.avail, 2))[0]
        return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT

    def get_state(self) -> dict:
        return {"size": self.size, "desc": self.desc, "avail": self.avail, "used": self.used,
                "next_avail": self.next_avail, "next_used": self.next_used}

    @classmethod
    def from_state(cls, memory: GuestMemory, state: dict) -> "Virtqueue":
        queue = cls(memory, state["size"], state["desc"], state["avail"], state["used"])
        queue.next_avail = state["next_avail"]
        queue.next_used = state["next_used"]
        return queue


def read_chain(memory: GuestMemory, chain: DescriptorChain) -> bytes:
    """Concatenate the device-readable buffers of a chain."""
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
