"""The 8254 programmable interval timer, driven by the virtual clock.

Channel 0 drives IRQ 0 (the guest's periodic tick and, read back, its clocksource); channel 2 is gated and
read through system control port B. The counters are never stepped: their values and the next
interrupt are computed from guest time, so the timer costs nothing between events and survives snapshots as
a handful of numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from conode.vm import state
from conode.vm.clock import NS_PER_S
from conode.vm.devices.irq import IrqLine
from conode.vm.state import GUEST_NS_MAX, bounded, items, one_of, uint

PIT_HZ = 1_193_182
COMMAND = 3  # the mode/command register's offset
CONTROL_B_OUT2 = 0x20  # system control port B: channel 2's output


@dataclass(frozen=True)
class ChannelState:
    mode: int = one_of(0, 1, 2, 3, 4, 5)
    access: int = one_of(1, 2, 3)
    reload: int = bounded(1, 0x10000)
    start_ns: int = bounded(0, GUEST_NS_MAX)
    armed: bool
    write_low: int | None = uint(8)
    read_high_next: bool
    latched: int | None = uint(16)
    latched_high_next: bool
    fired: int = bounded(0, GUEST_NS_MAX)
    gate: bool


@dataclass(frozen=True)
class PitState(state.Record):
    KIND = "PIT"
    VERSION = 1

    channels: tuple[ChannelState, ...] = items(exact=3)
    speaker: int = uint(2)


class _Channel:
    def __init__(self) -> None:
        self.mode = 0
        self.access = 3  # 1 = low byte, 2 = high byte, 3 = low then high
        self.reload = 0x10000
        self.start_ns = 0  # guest time when the current count was loaded
        self.armed = False  # a count has been written since the last mode command
        self.write_low: int | None = None  # first byte of a low/high write
        self.read_high_next = False  # next read (access 3) returns the high byte
        self.latched: int | None = None  # counter latched by a latch command
        self.latched_high_next = False
        self.fired = 0  # interrupts raised since start_ns (for the periodic modes)
        self.gate = True

    def ticks(self, now_ns: int) -> int:
        return (now_ns - self.start_ns) * PIT_HZ // NS_PER_S

    def count(self, now_ns: int) -> int:
        if not self.armed:
            return 0
        elapsed = self.ticks(now_ns)
        if self.mode in (2, 3):
            return (self.reload - elapsed % self.reload) & 0xFFFF  # a full 0x10000 count reads as 0
        return (self.reload - elapsed) & 0xFFFF

    def output(self, now_ns: int) -> bool:
        if not self.armed:
            return True
        elapsed = self.ticks(now_ns)
        if self.mode in (2, 3):
            return (elapsed % self.reload) < self.reload // 2 if self.mode == 3 else True
        return elapsed >= self.reload

    def event_ns(self, index: int) -> int:
        """Guest time of the index-th terminal count (1-based) since the count was loaded."""
        return self.start_ns + -(-index * self.reload * NS_PER_S // PIT_HZ)


class Pit:
    """An 8254 whose channel 0 output is wired to *irq*."""

    def __init__(self, irq: IrqLine, now_ns: Callable[[], int]) -> None:
        self._irq = irq
        self._now = now_ns
        self.channels = [_Channel(), _Channel(), _Channel()]
        self.speaker = 0  # bits 0-1 of system control port B

    # --- time ----------------------------------------------------------------------------------------------
    def next_event_ns(self) -> int | None:
        """Guest time of channel 0's next interrupt, or None when it will not interrupt."""
        ch = self.channels[0]
        if not ch.armed:
            return None
        if ch.mode in (2, 3):
            return ch.event_ns(ch.fired + 1)
        if ch.mode in (0, 4) and ch.fired == 0:
            return ch.event_ns(1)
        return None

    def update(self) -> None:
        """Raise IRQ 0 for the terminal counts reached by now. Missed periods collapse into one edge."""
        ch = self.channels[0]
        due = self.next_event_ns()
        now = self._now()
        if due is None or now < due:
            return
        if ch.mode in (2, 3):
            ch.fired = ch.ticks(now) // ch.reload
        else:
            ch.fired = 1
        self._irq.pulse()

    # --- ports: offsets 0-2 are the channels, 3 the mode/command register; system control B apart -----------
    def read_control_b(self, offset: int) -> int:
        out2 = self.channels[2].output(self._now())
        return self.speaker | (CONTROL_B_OUT2 if out2 else 0)

    def write_control_b(self, offset: int, value: int) -> None:
        self.speaker = value & 0x03
        self.channels[2].gate = bool(value & 1)

    def read_port(self, offset: int) -> int:
        if offset == COMMAND:
            return 0xFF  # write-only
        ch = self.channels[offset]
        if ch.latched is not None:
            value = ch.latched
            if ch.access == 3 and not ch.latched_high_next:
                ch.latched_high_next = True
                return value & 0xFF
            ch.latched = None
            ch.latched_high_next = False
            return (value >> 8) & 0xFF if ch.access in (2, 3) else value & 0xFF
        value = ch.count(self._now())
        if ch.access == 1:
            return value & 0xFF
        if ch.access == 2:
            return (value >> 8) & 0xFF
        ch.read_high_next = not ch.read_high_next
        return value & 0xFF if ch.read_high_next else (value >> 8) & 0xFF

    def write_port(self, offset: int, value: int) -> None:
        value &= 0xFF
        if offset == COMMAND:
            self._command(value)
            return
        ch = self.channels[offset]
        if ch.access == 1:
            self._load(ch, value)
        elif ch.access == 2:
            self._load(ch, value << 8)
        elif ch.write_low is None:
            ch.write_low = value
        else:
            low, ch.write_low = ch.write_low, None
            self._load(ch, low | (value << 8))

    def _command(self, value: int) -> None:
        select = value >> 6
        if select == 3:  # read-back: latch the counts of the selected channels
            for i in range(3):
                if value & (2 << i) and not value & 0x20:
                    ch = self.channels[i]
                    ch.latched = ch.count(self._now())
            return
        ch = self.channels[select]
        access = (value >> 4) & 3
        if access == 0:  # counter latch
            if ch.latched is None:
                ch.latched = ch.count(self._now())
                ch.latched_high_next = False
            return
        ch.access = access
        ch.mode = (value >> 1) & 7
        if ch.mode > 5:
            ch.mode -= 4  # modes 6 and 7 are aliases of 2 and 3
        ch.armed = False
        ch.write_low = None
        ch.read_high_next = False

    def _load(self, ch: _Channel, count: int) -> None:
        ch.reload = count or 0x10000
        ch.start_ns = self._now()
        ch.fired = 0
        ch.armed = True

    # --- snapshots --------------------------------------------------------------------------------------------
    def get_state(self) -> dict:
        return state.dump(PitState(tuple(state.capture(ChannelState, c) for c in self.channels), self.speaker))

    def set_state(self, data: dict) -> None:
        """Restore :meth:`get_state` output; raise SnapshotError (and change nothing) if it is not valid."""
        saved = state.load(PitState, data)
        for channel, channel_state in zip(self.channels, saved.channels):
            state.assign(channel_state, channel)
        self.speaker = saved.speaker
