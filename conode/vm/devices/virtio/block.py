"""cobd: a virtio-blk device (/dev/vda in the guest) on a disk backend (conode/vm/disk).

Requests complete synchronously, in the notify that posted them: nothing is in flight between slices, so the
device saves no state of its own (its queues are the transport's, its bytes the disk's). Every request is the
guest's word and is checked: an unknown type gets UNSUPP; a chain in the wrong shape, a sector range outside
the disk, a length that is not whole sectors, a request larger than advertised, a write to a read-only disk,
a write past the guest's disk budget or one the host cannot carry out gets IOERR — for that request only.
The queue is stopped only when the ring itself is broken (the transport's rule).
"""

from __future__ import annotations

import struct
from typing import Callable, Protocol, Sequence

from conode.vm.devices.virtio.block_native import SHAPE_IOERR, SHAPE_REQUEST, NativeRequests
from conode.vm.devices.virtio.queue import Buffer, DescriptorChain, GuestMemory, Virtqueue, write_chain
from conode.vm.devices.virtio.transport import QUEUE_SIZE_MAX, Activation
from conode.vm.disk.overlay import Buffer as Bytes
from conode.vm.disk.overlay import DiskIOError

VIRTIO_ID_BLOCK = 2
REQUESTQ = 0

F_SIZE_MAX, F_SEG_MAX, F_RO, F_BLK_SIZE, F_FLUSH, F_TOPOLOGY, F_DISCARD, F_WRITE_ZEROES = (
    1 << 1, 1 << 2, 1 << 5, 1 << 6, 1 << 9, 1 << 10, 1 << 13, 1 << 14)
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2

SECTOR = 512
ID_BYTES = 20
# The request queue's size, and the data buffers in one request: Linux adds the header and the status, and
# without indirect descriptors the whole chain must fit in the ring. A ring twice the usual size lets a 1 MiB
# O_DIRECT transfer (256 scattered 4 KiB pages) be one request.
QUEUE_SIZE = 2 * QUEUE_SIZE_MAX
SEG_MAX = QUEUE_SIZE - 2
SIZE_MAX = 64 << 10  # bytes in one data buffer
MAX_REQUEST_BYTES = SEG_MAX * SIZE_MAX  # the most a driver that honours the two above can ask for at once
READ_CHUNK = 1 << 20  # a read passes through a scratch buffer of this size (host memory per disk), a chunk at a time
MAX_RANGE_SEGMENTS = 16  # discard and write-zeroes ranges in one request
MAX_DISCARD_SECTORS = 1 << 22  # 2 GiB per range: punching holes is cheap
MAX_WRITE_ZEROES_SECTORS = (32 << 20) // SECTOR  # zeros are written into the overlay: bound the work
PHYSICAL_BLOCK_EXP = 3  # 4 KiB physical blocks (the overlay's clusters) under 512-byte logical sectors

_HEADER = struct.Struct("<IIQ")
_RANGE = struct.Struct("<QII")


class Disk(Protocol):
    """What the device needs of a disk backend (conode.vm.disk.overlay.CowDisk); failures raise DiskIOError."""

    size: int
    read_only: bool

    def read(self, offset: int, buffer: memoryview) -> None: ...

    def read_with(self, offset: int, length: int, get: Callable[[list[tuple[int, int, int]]], None]) -> None:
        """get((host fd, file offset, length), ...) reads [offset, offset+length) from the host's files."""
        ...

    def write(self, offset: int, parts: Sequence[Bytes]) -> None: ...

    def write_with(self, offset: int, length: int, put: Callable[[int, int], None]) -> None:
        """put(host fd, file offset) writes the *length* bytes for [offset, offset+length) into a host file."""
        ...

    def flush(self) -> None: ...

    def discard(self, offset: int, length: int) -> None: ...

    def write_zeroes(self, offset: int, length: int) -> None: ...


class _Refused(Exception):
    """A request the device answers with a status other than OK (never leaves the device)."""

    def __init__(self, status: int) -> None:
        self.status = status


def _cut(buffers: Sequence[Buffer], skip: int, length: int) -> list[tuple[int, int]]:
    """(address, length) pieces of the bytes [skip, skip+length) of *buffers*, in order; buffers that follow
    each other in guest RAM (pages the guest allocated together) become one piece: one copy, one iovec.
    (The hot path: a buffer per page; the current piece is kept in locals, not rebuilt.)"""
    pieces: list[tuple[int, int]] = []
    start = end = -1  # the piece being extended (no guest address is negative)
    for address, size, _ in buffers:
        if length <= 0:
            break
        if skip >= size:
            skip -= size
            continue
        take = size - skip
        if take > length:  # noqa: PLR1730 (min() is a call; this runs per page)
            take = length
        address += skip
        if address != end:
            if end >= 0:
                pieces.append((start, end - start))
            start = end = address
        end += take
        skip, length = 0, length - take
    if end >= 0:
        pieces.append((start, end - start))
    return pieces


class _ChainData:
    """A request's data buffers as the Python walk found them, moved by the device through guest memory."""

    def __init__(self, memory: GuestMemory, out_data: list[tuple[int, int]], data_in: list[Buffer],
                 scratch: bytearray) -> None:
        self._memory, self._out, self._in, self._scratch = memory, out_data, data_in, scratch

    def fill(self, disk: Disk, offset: int, length: int) -> None:
        """Read the disk's [offset, offset+length) into the device-writable buffers."""
        scratch = self._scratch
        for done in range(0, length, READ_CHUNK):
            take = min(READ_CHUNK, length - done)
            disk.read(offset + done, memoryview(scratch)[:take])
            self._memory.scatter(_cut(self._in, done, take), scratch)

    def drain(self, disk: Disk, offset: int, length: int) -> None:
        """Write the device-readable data (after the header) to the disk at *offset*."""
        ram = self._memory.window(0, self._memory.size)  # sliced per piece: the walk put every buffer inside RAM
        disk.write(offset, [ram[address:address + size] for address, size in self._out])

    def out_pieces(self) -> list[tuple[int, int]]:
        return self._out

    def in_buffers(self) -> list[Buffer]:
        return self._in


class _NativeData:
    """A request's data as the C walk cut it (block_native), moved in C between the host files and RAM."""

    def __init__(self, native: NativeRequests) -> None:
        self._native = native

    def fill(self, disk: Disk, offset: int, length: int) -> None:
        disk.read_with(offset, length, self._native.read)

    def drain(self, disk: Disk, offset: int, length: int) -> None:
        disk.write_with(offset, length, self._native.write)

    def out_pieces(self) -> list[tuple[int, int]]:
        return self._native.out_pieces()

    def in_buffers(self) -> list[Buffer]:
        return [Buffer(address, length, True) for address, length in self._native.in_pieces()]


_Data = _ChainData | _NativeData


class VirtioBlock:
    """A virtio-blk disk with one request queue, on *disk* (which it reads and writes, never closes).

    *disk_id* is what GET_ID returns (at most 20 bytes; /sys/block/vda/serial in the guest).
    """

    device_id = VIRTIO_ID_BLOCK
    num_queues = 1
    queue_size_max = QUEUE_SIZE

    def __init__(self, disk: Disk, disk_id: bytes = b"cobd") -> None:
        self.disk = disk
        self._id = disk_id[:ID_BYTES].ljust(ID_BYTES, b"\0")
        self._active: Activation | None = None
        self._native: NativeRequests | None = None
        self._scratch = bytearray(READ_CHUNK)
        self.features = F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_TOPOLOGY
        self.features |= F_RO if disk.read_only else F_DISCARD | F_WRITE_ZEROES
        self._config = struct.pack(
            "<QII4xIBBHI4xIIIIIB3x",
            disk.size // SECTOR, SIZE_MAX, SEG_MAX,  # capacity, size_max, seg_max, (geometry)
            SECTOR, PHYSICAL_BLOCK_EXP, 0, 1 << PHYSICAL_BLOCK_EXP, 1 << PHYSICAL_BLOCK_EXP,  # blk_size, topology
            MAX_DISCARD_SECTORS, MAX_RANGE_SEGMENTS, 1 << PHYSICAL_BLOCK_EXP,  # (writeback), discard
            MAX_WRITE_ZEROES_SECTORS, MAX_RANGE_SEGMENTS, 0)  # write zeroes (may not unmap)

    def config_read(self, offset: int, size: int) -> int:
        if offset < 0 or size not in (1, 2, 4, 8) or offset + size > len(self._config):
            return 0
        return int.from_bytes(self._config[offset:offset + size], "little")

    def activate(self, activation: Activation) -> None:
        self._active = activation
        self._native = NativeRequests.make(getattr(activation.memory, "native", None), QUEUE_SIZE, self._scratch)

    def reset(self) -> None:
        self._active = None
        self._native = None

    def notify(self, queue_index: int) -> None:
        active = self._active
        queue = active.queues[REQUESTQ] if active and queue_index == REQUESTQ else None
        if active is None or queue is None:
            return
        served = False
        if self._native is not None:
            while (head := queue.pop_head()) is not None:
                written = self._serve_native(active.memory, self._native, queue, head)
                if written is None:
                    break  # the chain broke the ring: the queue is stopped
                queue.push_used(head, written)
                served = True
        else:
            while (chain := queue.pop()) is not None:
                queue.push_used(chain.head, self._serve(active.memory, chain))
                served = True
        if served:
            active.signal_used(REQUESTQ)

    # --- one request -----------------------------------------------------------------------------------------
    def _serve_native(self, memory: GuestMemory, native: NativeRequests, queue: Virtqueue, head: int) -> int | None:
        """Carry out the request at *head* through the C walk; the bytes written into its chain, or None if the
        chain broke the ring's rules."""
        request = native.parse(queue, head)
        if request is None:
            return None
        if request.shape != SHAPE_REQUEST:
            if request.shape == SHAPE_IOERR:
                memory.write(request.status_at, bytes([S_IOERR]))
                return 1
            return 0
        status_at = request.status_at
        return self._carry_out(memory, status_at, request.kind, request.sector, _NativeData(native),
                               request.out_bytes, request.in_bytes)

    def _serve(self, memory: GuestMemory, chain: DescriptorChain) -> int:
        """Carry out one request; return the bytes written into the chain (data and status)."""
        readable, writable = chain.readable(), chain.writable()
        if not writable or any(b.writable for b in chain.buffers[:len(readable)]) or writable[-1].length == 0:
            # No status byte, or device-writable buffers before device-readable ones: not a request.
            if writable and writable[-1].length:
                last = writable[-1]
                memory.write(last.address + last.length - 1, bytes([S_IOERR]))
                return 1
            return 0
        status_buffer = writable[-1]
        status_at = status_buffer.address + status_buffer.length - 1
        data_in = writable[:-1] + ([Buffer(status_buffer.address, status_buffer.length - 1, True)]
                                   if status_buffer.length > 1 else [])
        in_bytes = sum(b.length for b in data_in)
        out_bytes = sum(b.length for b in readable)
        if out_bytes < _HEADER.size:
            memory.write(status_at, bytes([S_IOERR]))
            return 1
        kind, _, sector = _HEADER.unpack(b"".join(memory.read(a, n) for a, n in _cut(readable, 0, _HEADER.size)))
        data = _ChainData(memory, _cut(readable, _HEADER.size, out_bytes - _HEADER.size), data_in, self._scratch)
        return self._carry_out(memory, status_at, kind, sector, data, out_bytes - _HEADER.size, in_bytes)

    def _carry_out(self, memory: GuestMemory, status_at: int, kind: int, sector: int, data: _Data, out_bytes: int,
                   in_bytes: int) -> int:
        """Do what the request asks, write its status byte; the bytes written into its chain (data and status)."""
        written = 0
        try:
            written = self._request(memory, kind, sector, data, out_bytes, in_bytes)
            status = S_OK
        except _Refused as refused:
            status = refused.status
        except DiskIOError:
            status = S_IOERR
        memory.write(status_at, bytes([status]))
        return written + 1

    def _request(self, memory: GuestMemory, kind: int, sector: int, data: _Data, out_bytes: int,
                 in_bytes: int) -> int:
        disk = self.disk
        if kind == T_IN:
            if out_bytes or in_bytes > MAX_REQUEST_BYTES:
                raise _Refused(S_IOERR)
            data.fill(disk, self._range(sector, in_bytes), in_bytes)
            return in_bytes
        if kind == T_OUT:
            if in_bytes or out_bytes > MAX_REQUEST_BYTES or disk.read_only:
                raise _Refused(S_IOERR)
            data.drain(disk, self._range(sector, out_bytes), out_bytes)
            return 0
        if kind == T_FLUSH:
            if not disk.read_only:
                disk.flush()
            return 0
        if kind == T_GET_ID:
            if in_bytes == 0:
                raise _Refused(S_IOERR)
            return write_chain(memory, DescriptorChain(0, tuple(data.in_buffers())), self._id)
        if kind in (T_DISCARD, T_WRITE_ZEROES) and not disk.read_only:
            self._ranges(memory, kind, data.out_pieces(), out_bytes, in_bytes)
            return 0
        raise _Refused(S_UNSUPP)

    def _range(self, sector: int, length: int) -> int:
        """The byte offset of *sector*, if [sector, +length) is whole sectors inside the disk."""
        offset = sector * SECTOR
        if length % SECTOR or offset + length > self.disk.size:
            raise _Refused(S_IOERR)
        return offset

    def _ranges(self, memory: GuestMemory, kind: int, out_data: list[tuple[int, int]], out_bytes: int,
                in_bytes: int) -> None:
        count, rest = divmod(out_bytes, _RANGE.size)
        if in_bytes or rest or not 1 <= count <= MAX_RANGE_SEGMENTS:
            raise _Refused(S_IOERR)
        table = b"".join(memory.read(address, length) for address, length in out_data)
        limit = MAX_DISCARD_SECTORS if kind == T_DISCARD else MAX_WRITE_ZEROES_SECTORS
        ranges = [_RANGE.unpack_from(table, i * _RANGE.size) for i in range(count)]
        for sector, sectors, flags in ranges:
            if sectors > limit or flags & ~1 or (kind == T_DISCARD and flags):
                raise _Refused(S_UNSUPP if flags else S_IOERR)
            self._range(sector, sectors * SECTOR)
        for sector, sectors, _ in ranges:
            if kind == T_DISCARD:
                self.disk.discard(sector * SECTOR, sectors * SECTOR)
            else:
                self.disk.write_zeroes(sector * SECTOR, sectors * SECTOR)
