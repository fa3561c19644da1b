"""The CMOS RTC (MC146818), an index port (offset 0) and a data port (offset 1): wall-clock time at boot.

The guest reads the date once at boot and then keeps time itself; the RTC's wall clock is derived from
the virtual clock, so a restored guest sees the time continue from its snapshot rather than jump.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from conode.vm import state
from conode.vm.clock import NS_PER_S
from conode.vm.state import blob, bounded


REG_SECONDS, REG_MINUTES, REG_HOURS = 0x00, 0x02, 0x04
REG_WEEKDAY, REG_DAY, REG_MONTH, REG_YEAR = 0x06, 0x07, 0x08, 0x09
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
REG_CENTURY = 0x32
REG_B_24H, REG_B_BINARY = 0x02, 0x04
SIZE = 128
INDEX = 0  # the index port's offset; the data port follows it
EPOCH_MAX_S = 1 << 40  # a wall clock far beyond any real date, still within what gmtime() can render


@dataclass(frozen=True)
class CmosState(state.Record):
    KIND = "CMOS"
    VERSION = 1

    epoch_s: int = bounded(0, EPOCH_MAX_S)
    index: int = bounded(0, SIZE - 1)
    ram: bytes = blob(exact=SIZE)


def _bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


class Cmos:
    """RTC registers; everything else in the 128-byte CMOS reads back what was written."""

    def __init__(self, now_ns: Callable[[], int], epoch_s: int | None = None) -> None:
        self._now = now_ns
        # Wall-clock seconds at guest time zero.
        self.epoch_s = int(time.time()) if epoch_s is None else epoch_s
        self.index = 0
        self.ram = bytearray(SIZE)
        self.ram[REG_B] = REG_B_24H
        self.ram[REG_D] = 0x80  # battery good

    def _time_register(self, reg: int) -> int | None:
        tm = time.gmtime(self.epoch_s + self._now() // NS_PER_S)
        values = {
            REG_SECONDS: tm.tm_sec, REG_MINUTES: tm.tm_min, REG_HOURS: tm.tm_hour,
            REG_WEEKDAY: (tm.tm_wday + 1) % 7 + 1, REG_DAY: tm.tm_mday, REG_MONTH: tm.tm_mon,
            REG_YEAR: tm.tm_year % 100, REG_CENTURY: tm.tm_year // 100,
        }
        value = values.get(reg)
        if value is None:
            return None
        return value if self.ram[REG_B] & REG_B_BINARY else _bcd(value)

    def read_port(self, offset: int) -> int:
        if offset == INDEX:
            return self.index
        reg = self.index
        if reg == REG_A:
            return self.ram[REG_A] & 0x7F  # never "update in progress"
        if reg == REG_C:
            return 0  # no RTC interrupts are generated
        value = self._time_register(reg)
        return self.ram[reg] if value is None else value

    def write_port(self, offset: int, value: int) -> None:
        if offset == INDEX:
            self.index = value & 0x7F  # bit 7 is the NMI mask
        elif self.index not in (REG_C, REG_D):
            self.ram[self.index] = value & 0xFF

    def get_state(self) -> dict:
        return state.dump(CmosState(self.epoch_s, self.index, bytes(self.ram)))

    def set_state(self, data: dict) -> None:
        """Restore :meth:`get_state` output; raise SnapshotError (and change nothing) if it is not valid."""
        saved = state.load(CmosState, data)
        self.epoch_s, self.index = saved.epoch_s, saved.index
        self.ram[:] = saved.ram
