"""cobd's requests walked, cut and carried in C (conode/vm/cpu/native/blkreq.c), where a compiler is at hand.

A 1 MiB transfer is a chain of a descriptor per page; in Python its walk and its page-by-page copies cost more
than the guest's own work for it. The C code applies the very checks of the Python walk (queue.py) and cuts
the chain as block.py does; the device still decides everything about the request. Without a compiler, or
with guest memory the C code cannot reach (no host address or DMA function), the device stays in Python.

Data read from the disk goes straight from the host files into guest RAM and the engine is told of it
(uc_conode_dma_written), or, where the engine cannot be told (stock Unicorn), through the engine's uc_mem_write:
either way translated code on those pages is invalidated and the migration's dirty-page log sees them.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
from typing import Callable, NamedTuple, cast

from conode.vm.cpu import native_build
from conode.vm.cpu.slicer import holding_gil
from conode.vm.devices.virtio.queue import Virtqueue

log = logging.getLogger(__name__)

_BAD_INDEX, _INDIRECT, _OUTSIDE_RAM, _TOO_LONG, _LOOPS = -1, -2, -3, -4, -5  # blkreq.c's CHAIN_* codes
SHAPE_REQUEST, SHAPE_IOERR, SHAPE_SILENT = 0, 1, 2  # blk_request.shape

# int dma_write(void *handle, uint64_t address, const void *bytes, uint64_t size): uc_mem_write's signature
DMA_WRITE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64)
# int dma_done(void *handle, uint64_t address, uint64_t size): conode's engine's uc_conode_dma_written
DMA_DONE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64)


class NativeRam(NamedTuple):
    """Guest RAM as C code reaches it: where it lies in this process, and how to write it as DMA."""

    address: int  # host address of guest-physical 0
    size: int
    dma_write: int  # address of a DMA_WRITE function, which copies into RAM as a device write
    dma_done: int  # address of a DMA_DONE function, told of RAM the device wrote itself; 0: none, copy instead
    handle: int  # their first argument


class BlkRequest(ctypes.Structure):
    """Mirror of ``struct blk_request`` in blkreq.c."""

    _fields_ = [("sector", ctypes.c_uint64), ("out_bytes", ctypes.c_uint64), ("in_bytes", ctypes.c_uint64),
                ("status_at", ctypes.c_uint64), ("fault", ctypes.c_uint64), ("fault_len", ctypes.c_uint64),
                ("kind", ctypes.c_uint32), ("n_out", ctypes.c_uint32), ("n_in", ctypes.c_uint32),
                ("shape", ctypes.c_int32)]


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("CONODE_PURE_PYTHON") == "1":
        return None
    try:
        return ctypes.CDLL(str(native_build.build("blkreq")))
    except OSError as exc:
        log.warning("cobd's native request path is unavailable, the disk runs in Python (slower): %s", exc)
        return None


_P, _U64, _I32, _U32 = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int32, ctypes.c_uint32


class NativeRequests:
    """One device's C request path on *ram*, for queues of up to *queue_size* entries; the pieces of the last
    parsed request stay here until the next parse."""

    def __init__(self, lib: ctypes.CDLL, ram: NativeRam, queue_size: int, scratch: bytearray) -> None:
        # Short calls on the machine thread, inside an exit: keep the GIL (see holding_gil).
        returns_int = Callable[..., int]
        self._parse = cast(returns_int, holding_gil(lib.blk_parse, ctypes.c_int, _P, _U64, _U64, _U32, _U32, _P, _P,
                                                    _P))
        self._read = cast(returns_int, holding_gil(lib.blk_read, ctypes.c_int, _P, _P, _P, _U32, _P, _U64, _P, _U64,
                                                   _P, _U32, _P, _P, _P))
        self._write = cast(returns_int, holding_gil(lib.blk_write, ctypes.c_int, ctypes.c_int, ctypes.c_int64, _P,
                                                    _U64, _P, _U32))
        self.ram = ram
        self.request = BlkRequest()
        self._request_at = ctypes.addressof(self.request)
        self._out = (ctypes.c_uint64 * (2 * queue_size))()
        self._in = (ctypes.c_uint64 * (2 * queue_size))()
        self._scratch = scratch
        self._scratch_at = ctypes.addressof((ctypes.c_char * len(scratch)).from_buffer(scratch))

    @classmethod
    def make(cls, ram: NativeRam | None, queue_size: int, scratch: bytearray) -> NativeRequests | None:
        """The C path for this memory, or None where it cannot run (the device then stays in Python)."""
        lib = _library() if ram is not None else None
        return None if lib is None or ram is None else cls(lib, ram, queue_size, scratch)

    def parse(self, queue: Virtqueue, head: int) -> BlkRequest | None:
        """The request at *head*, or None if its chain breaks the ring's rules (the queue is then stopped)."""
        code = self._parse(self.ram.address, self.ram.size, queue.desc, queue.size, head, self._request_at,
                           ctypes.addressof(self._out), ctypes.addressof(self._in))
        if code == 0:
            return self.request
        r = self.request
        queue.fail({_BAD_INDEX: f"descriptor index {r.fault} is outside a queue of {queue.size}",
                    _INDIRECT: "the driver used indirect descriptors, which were not negotiated",
                    _OUTSIDE_RAM: f"a buffer at {r.fault:#x}+{r.fault_len} lies outside guest RAM",
                    _TOO_LONG: "a descriptor chain is longer than 4 GiB",
                    _LOOPS: f"a descriptor chain is longer than the queue ({queue.size}): it loops"}
                   .get(code, f"the descriptor chain is unusable (code {code})"))
        return None

    def out_pieces(self) -> list[tuple[int, int]]:
        """(address, length) of the bytes after the header, merged where they follow each other in RAM."""
        return [(self._out[2 * i], self._out[2 * i + 1]) for i in range(self.request.n_out)]

    def in_pieces(self) -> list[tuple[int, int]]:
        """(address, length) of the bytes before the status byte, merged likewise."""
        return [(self._in[2 * i], self._in[2 * i + 1]) for i in range(self.request.n_in)]

    def read(self, extents: list[tuple[int, int, int]]) -> None:
        """Carry host file extents (fd, offset, length) into the request's device-writable pieces."""
        count = len(extents)
        fds = (ctypes.c_int32 * count)(*(fd for fd, _, _ in extents))
        offsets = (ctypes.c_int64 * count)(*(at for _, at, _ in extents))
        lengths = (ctypes.c_uint64 * count)(*(n for _, _, n in extents))
        _check(self._read(ctypes.addressof(fds), ctypes.addressof(offsets), ctypes.addressof(lengths), count,
                          self._scratch_at, len(self._scratch), self.ram.address, self.ram.size,
                          ctypes.addressof(self._in), self.request.n_in, self.ram.dma_write, self.ram.dma_done or None,
                          self.ram.handle))

    def write(self, fd: int, offset: int) -> None:
        """Write the request's data (the pieces after the header) to *fd* at *offset*."""
        _check(self._write(fd, offset, self.ram.address, self.ram.size, ctypes.addressof(self._out),
                           self.request.n_out))


def _check(code: int) -> None:
    if code < 0:
        raise OSError(-code, os.strerror(-code) if -code != errno.EFAULT else "device DMA outside guest RAM")
