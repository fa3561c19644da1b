"""The 8259A programmable interrupt controller pair: a master and a slave cascaded on the master's IRQ 2.

Only what Linux's i8259 driver uses: ICW1-4 initialisation, the mask register, specific and non-specific EOI,
reading IRR/ISR through OCW3, edge and level triggering (ELCR). Priorities are fixed (no rotation), as Linux
never rotates them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from conode.vm import layout, state
from conode.vm.state import one_of, uint


@dataclass(frozen=True)
class ChipState:
    """What one 8259A holds that the guest can observe."""

    irr: int = uint(8)
    isr: int = uint(8)
    imr: int = uint(8)
    level: int = uint(8)
    elcr: int = uint(8)
    vector_base: int = one_of(*range(0, 256, 8))
    read_isr: bool
    init_step: int = one_of(0, 2, 3, 4)
    expect_icw4: bool
    auto_eoi: bool


@dataclass(frozen=True)
class PicState(state.Record):
    KIND = "PIC"
    VERSION = 1

    master: ChipState
    slave: ChipState


class _Chip:
    """One 8259A."""

    def __init__(self) -> None:
        self.irr = 0  # requests waiting
        self.isr = 0  # requests being serviced
        self.imr = 0xFF  # masked lines (all masked at reset)
        self.level = 0  # current input levels, for edge detection
        self.elcr = 0  # 1 = level-triggered line
        self.vector_base = layout.VECTOR_PIC_RESET
        self.read_isr = False  # OCW3 selects ISR (else IRR) for reads of the command port
        self.init_step = 0  # 0 = initialised; 2..4 = expecting ICW2..ICW4
        self.expect_icw4 = False
        self.auto_eoi = False

    def set_input(self, line: int, level: bool) -> None:
        bit = 1 << line
        if level:
            if self.elcr & bit or not self.level & bit:
                self.irr |= bit  # edge: latch the rising edge; level: follow the input
            self.level |= bit
        else:
            self.level &= ~bit
            if self.elcr & bit:
                self.irr &= ~bit

    def highest_pending(self) -> int | None:
        """The line the chip would signal on INTR, honouring priority over lines in service."""
        pending = self.irr & ~self.imr
        if not pending:
            return None
        for line in range(8):
            bit = 1 << line
            if self.isr & bit:
                return None  # a higher-priority (lower-numbered) line is in service
            if pending & bit:
                return line
        return None

    def acknowledge(self, line: int) -> None:
        bit = 1 << line
        if not self.elcr & bit:
            self.irr &= ~bit
        if not self.auto_eoi:
            self.isr |= bit

    def write_command(self, value: int) -> None:
        if value & 0x10:  # ICW1: start initialisation
            self.init_step = 2
            self.expect_icw4 = bool(value & 1)
            self.imr = 0
            self.isr = 0
            self.irr = 0
            self.read_isr = False
            self.auto_eoi = False
        elif value & 0x08:  # OCW3
            if value & 0x02:
                self.read_isr = bool(value & 0x01)
        else:  # OCW2
            command = value >> 5
            if command == 1:  # non-specific EOI: clear the highest-priority in-service line
                for line in range(8):
                    if self.isr & (1 << line):
                        self.isr &= ~(1 << line)
                        break
            elif command == 3:  # specific EOI
                self.isr &= ~(1 << (value & 7))

    def write_data(self, value: int) -> None:
        if self.init_step == 2:
            self.vector_base = value & 0xF8
            self.init_step = 3
        elif self.init_step == 3:  # ICW3: cascade wiring, fixed in this machine
            self.init_step = 4 if self.expect_icw4 else 0
        elif self.init_step == 4:
            self.auto_eoi = bool(value & 0x02)
            self.init_step = 0
        else:
            self.imr = value

    def read_command(self) -> int:
        return self.isr if self.read_isr else self.irr


class PicPair:
    """Master and slave 8259A; *on_output* gets the INTR level after every change that may alter it."""

    def __init__(self, on_output: Callable[[bool], None] = lambda level: None) -> None:
        self.master = _Chip()
        self.slave = _Chip()
        self._on_output = on_output

    # --- lines and the CPU side --------------------------------------------------------------------------
    def set_irq(self, irq: int, level: bool) -> None:
        if irq < 8:
            self.master.set_input(irq, level)
        else:
            self.slave.set_input(irq - 8, level)
            self._update_cascade()
        self._on_output(self.has_interrupt())

    def _update_cascade(self) -> None:
        # The cascade input behaves as level-triggered: the master keeps requesting while the slave does.
        bit = 1 << layout.IRQ_CASCADE
        if self.slave.highest_pending() is not None:
            self.master.irr |= bit
        else:
            self.master.irr &= ~bit

    def has_interrupt(self) -> bool:
        """Is INTR asserted towards the CPU?"""
        return self.master.highest_pending() is not None

    def acknowledge(self) -> int:
        """The CPU's INTA cycle: return the vector to deliver and mark it in service."""
        vector = self._acknowledge()
        self._on_output(self.has_interrupt())
        return vector

    def _acknowledge(self) -> int:
        line = self.master.highest_pending()
        if line is None:  # the request went away: a spurious IRQ 7, as on hardware
            return self.master.vector_base | 7
        self.master.acknowledge(line)
        if line != layout.IRQ_CASCADE:
            return self.master.vector_base | line
        slave_line = self.slave.highest_pending()
        if slave_line is None:
            self._update_cascade()
            return self.slave.vector_base | 7
        self.slave.acknowledge(slave_line)
        self._update_cascade()
        return self.slave.vector_base | slave_line

    # --- ports: each chip decodes offset 0 (command) and 1 (data); ELCR offset 0 (master) and 1 (slave) ----
    def read_master(self, offset: int) -> int:
        return self._read_chip(self.master, offset)

    def write_master(self, offset: int, value: int) -> None:
        self._write_chip(self.master, offset, value)

    def read_slave(self, offset: int) -> int:
        return self._read_chip(self.slave, offset)

    def write_slave(self, offset: int, value: int) -> None:
        self._write_chip(self.slave, offset, value)

    def read_elcr(self, offset: int) -> int:
        return (self.slave if offset else self.master).elcr

    def write_elcr(self, offset: int, value: int) -> None:
        (self.slave if offset else self.master).elcr = value & 0xFF

    @staticmethod
    def _read_chip(chip: _Chip, offset: int) -> int:
        return chip.imr if offset else chip.read_command()

    def _write_chip(self, chip: _Chip, offset: int, value: int) -> None:
        if offset:
            chip.write_data(value & 0xFF)
        else:
            chip.write_command(value & 0xFF)
        if chip is self.slave:
            self._update_cascade()
        self._on_output(self.has_interrupt())  # an unmask or EOI may let a waiting request through

    # --- snapshots --------------------------------------------------------------------------------------------
    def get_state(self) -> dict:
        return state.dump(PicState(state.capture(ChipState, self.master), state.capture(ChipState, self.slave)))

    def set_state(self, data: dict) -> None:
        """Restore :meth:`get_state` output; raise SnapshotError (and change nothing) if it is not valid."""
        saved = state.load(PicState, data)
        state.assign(saved.master, self.master)
        state.assign(saved.slave, self.slave)
        self._on_output(self.has_interrupt())  # the INTR line is derived: recompute it
