"""Which guest RAM pages changed: what a pre-copy migration must send again.

Two ways, one interface (:class:`DirtyTracker`):

- conode's engine logs writes itself (patch ``0011-dirty-page-log``): while the log is on, a page not yet written
  in the current round keeps its TLB entries on the slow store path, which marks the page; taking the log clears
  it and re-arms every entry. Guest stores, the page-table walker's accessed/dirty bits and host writes through
  Unicorn (device DMA) are all marked. Each page costs one slow store per round, as in QEMU's own migration.
- stock Unicorn has no such log, and write-protecting RAM there is no way out: every ``uc_mem_protect`` that lifts
  one page splits Unicorn's memory region, about 6 ms a page and growing with the number of regions, i.e. seconds
  for a guest that writes a few MiB. Instead the tracker keeps a copy of what it last handed out and compares RAM
  with it (libc ``memcmp``, a MiB at a time, then page by page where a MiB differs): about 12 ms per 128 MiB and
  nothing at all while the guest runs. It sees every change, whoever made it, and only changes (a page written
  with the value it held is not reported).

Pages are read for sending through :meth:`DirtyTracker.read`, so that the comparing tracker's copy is always
exactly what the other side received.
"""

from __future__ import annotations

import ctypes
from abc import ABC, abstractmethod
from collections.abc import Iterator

from unicorn.unicorn_py3.unicorn import uclib

from conode.errors import EngineError
from conode.vm.cpu.unicorn_cpu import GuestRam, UnicornCpu
from conode.vm.layout import PAGE_SIZE

_COMPARE_BLOCK = 256 * PAGE_SIZE  # 1 MiB: memcmp's stride before it looks at single pages

_libc = ctypes.CDLL(None)
_memcmp = _libc.memcmp
_memcmp.restype = ctypes.c_int
_memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]


def engine_logs_dirty_pages() -> bool:
    """Whether the loaded Unicorn is conode's engine with the dirty-page log."""
    return hasattr(uclib, "uc_conode_dirty_take")


def pages_of(bitmap: bytes | bytearray) -> Iterator[int]:
    """The page numbers set in *bitmap* (bit i of byte i // 8), in order."""
    for byte_index, byte in enumerate(bitmap):
        if byte:
            base = byte_index << 3
            for bit in range(8):
                if byte >> bit & 1:
                    yield base + bit


class DirtyTracker(ABC):
    """Pages of guest RAM changed since tracking started or since the last :meth:`take`."""

    name: str
    needs_machine_thread: bool  # take() must run where the CPU is not running (between slices, or paused)

    def __init__(self, ram: GuestRam) -> None:
        self.ram = ram
        self.pages = ram.size // PAGE_SIZE

    @abstractmethod
    def start(self) -> None:
        """Begin tracking; the first :meth:`take` reports every page that may differ from zeroed RAM."""

    @abstractmethod
    def take(self) -> bytearray:
        """A bitmap of the pages changed since the last take (or since start), and start a new round."""

    def read(self, first: int, count: int) -> bytes:
        """The contents of pages [first, first+count), as handed to the other side."""
        return bytes(self.ram.view[first * PAGE_SIZE:(first + count) * PAGE_SIZE])

    def stop(self) -> None:
        """End tracking and release what it holds."""


class EngineDirtyLog(DirtyTracker):
    """conode's engine's own log of written pages."""

    name = "engine log"
    needs_machine_thread = True

    def __init__(self, cpu: UnicornCpu) -> None:
        super().__init__(cpu.ram)
        if not engine_logs_dirty_pages():
            raise EngineError("this Unicorn has no dirty-page log; rebuild the fast engine (`conode engine build`)")
        self._handle = cpu.uc._uch
        self._first = False
        uclib.uc_conode_dirty_log.argtypes = [ctypes.c_void_p, ctypes.c_bool]
        uclib.uc_conode_dirty_take.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_char_p]

    def start(self) -> None:
        if uclib.uc_conode_dirty_log(self._handle, True) != 0:
            raise EngineError("the engine refused to start its dirty-page log")
        self._first = True

    def take(self) -> bytearray:
        bitmap = (ctypes.c_char * ((self.pages + 7) // 8))()
        if uclib.uc_conode_dirty_take(self._handle, 0, self.pages * PAGE_SIZE, bitmap) != 0:
            raise EngineError("the engine refused to hand over its dirty-page log (is it on?)")
        if self._first:  # the first round: every page, since the other side starts from zeroed RAM
            self._first = False
            return bytearray(b"\xff" * (self.pages // 8)) + (
                bytearray([(1 << (self.pages % 8)) - 1]) if self.pages % 8 else bytearray())
        return bytearray(bitmap.raw)

    def stop(self) -> None:
        uclib.uc_conode_dirty_log(self._handle, False)


class CompareDirtyLog(DirtyTracker):
    """Changes found by comparing RAM with a copy of what was last read through the tracker."""

    name = "comparison"
    needs_machine_thread = False  # RAM may change while it compares: a page changed later is found next round

    def __init__(self, ram: GuestRam) -> None:
        super().__init__(ram)
        self._copy: bytearray | None = None
        self._ram_at = 0
        self._copy_at = 0

    def start(self) -> None:
        self._copy = bytearray(self.ram.size)  # the other side starts from zeroed RAM
        self._ram_at = self.ram.host_address
        self._copy_at = ctypes.addressof(ctypes.c_char.from_buffer(self._copy))

    def take(self) -> bytearray:
        if self._copy is None:
            raise EngineError("dirty-page tracking is not started")
        bitmap = bytearray((self.pages + 7) // 8)
        ram_at, copy_at, size = self._ram_at, self._copy_at, self.ram.size
        for block in range(0, size, _COMPARE_BLOCK):
            length = min(_COMPARE_BLOCK, size - block)
            if not _memcmp(ram_at + block, copy_at + block, length):
                continue
            for offset in range(block, block + length, PAGE_SIZE):
                if _memcmp(ram_at + offset, copy_at + offset, PAGE_SIZE):
                    page = offset // PAGE_SIZE
                    bitmap[page >> 3] |= 1 << (page & 7)
        return bitmap

    def read(self, first: int, count: int) -> bytes:
        data = super().read(first, count)
        if self._copy is not None:
            self._copy[first * PAGE_SIZE:first * PAGE_SIZE + len(data)] = data
        return data

    def stop(self) -> None:
        self._copy = None


def dirty_tracker(cpu: UnicornCpu) -> DirtyTracker:
    """The engine's log where the engine has one, else comparison."""
    return EngineDirtyLog(cpu) if engine_logs_dirty_pages() else CompareDirtyLog(cpu.ram)
