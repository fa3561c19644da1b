"""Physical addresses with nothing behind them: reads float high (all ones) and writes are lost, as on a PC.

Kernels probe: firmware tables, option ROMs, devices that may or may not be there. On a PC such a read returns
all ones and carries on; it must never end the guest. What the guest touched is counted, and said once.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class OpenBus:
    """The MMIO answer for unbacked guest-physical addresses in one window starting at *base*."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.reads = 0
        self.writes = 0

    def _first(self, what: str, offset: int) -> None:
        if self.reads + self.writes == 1:
            log.info("the guest %s unbacked physical address %#x (reads give all ones, writes are lost; "
                     "later accesses are only counted)", what, self.base + offset)

    def read(self, offset: int, size: int) -> int:
        self.reads += 1
        self._first("read", offset)
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes += 1
        self._first("wrote", offset)
