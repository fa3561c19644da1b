"""cocon: the guest console, a 16550A UART at COM1.

Kernel printk polls the line status register; user-space tty output is interrupt driven (THR-empty
interrupts), so both paths are modelled. The 16-byte FIFOs are modelled as a large receive buffer (the
host rarely overruns the guest; beyond RX_BUFFER_BYTES bytes are dropped, as in an overrun) and as immediate
transmission on the send side.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

from conode.vm import state
from conode.vm.devices.irq import IrqLine
from conode.vm.state import bits, blob, uint

# Register offsets from the base port.
RBR_THR_DLL, IER_DLM, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)

IER_RDI, IER_THRI, IER_RLSI, IER_MSI = 1, 2, 4, 8
IIR_NO_INT, IIR_THRI, IIR_RDI = 0x01, 0x02, 0x04
IIR_FIFO_ENABLED = 0xC0
LSR_DR, LSR_THRE, LSR_TEMT = 0x01, 0x20, 0x40
LCR_DLAB = 0x80
MCR_OUT2, MCR_LOOP = 0x08, 0x10
FCR_WRITABLE = 0xC9  # FIFO enable, DMA mode, trigger level
RX_BUFFER_BYTES = 64 << 10  # received bytes the guest has not read yet; more are lost (an overrun)
RX_REFILL_BELOW = 4096  # a host stream behind the UART (on_rx_room) tops the buffer up below this


@dataclass(frozen=True)
class UartState(state.Record):
    KIND = "UART"
    VERSION = 1

    ier: int = uint(4)
    lcr: int = uint(8)
    mcr: int = uint(5)
    scr: int = uint(8)
    fcr: int = bits(FCR_WRITABLE)
    divisor: int = uint(16)
    thr_interrupt: bool
    rx: bytes = blob(max_len=RX_BUFFER_BYTES)


class Uart16550:
    """A 16550A whose transmitted bytes go to *output* and whose interrupt goes to *irq*."""

    def __init__(self, irq: IrqLine, output: Callable[[bytes], None]) -> None:
        self._irq = irq
        self._output = output
        self.rx: deque[int] = deque()
        self.ier = 0
        self.lcr = 0
        self.mcr = 0
        self.scr = 0
        self.fcr = 0
        self.divisor = 12  # 9600 baud until the guest sets its own
        self.thr_interrupt = False  # "THR empty" is pending until IIR is read or THR written
        self.on_rx_room: Callable[[], None] = lambda: None  # the guest drained the receive buffer low

    # --- host side -----------------------------------------------------------------------------------------
    @property
    def rx_room(self) -> int:
        return RX_BUFFER_BYTES - len(self.rx)

    def feed(self, data: bytes) -> None:
        """Bytes typed at the console, for the guest to read (beyond the buffer: lost, as in an overrun)."""
        self.rx.extend(data[: RX_BUFFER_BYTES - len(self.rx)])
        self._update_irq()

    # --- guest side ----------------------------------------------------------------------------------------
    def read_port(self, offset: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                return self.divisor & 0xFF
            value = self.rx.popleft() if self.rx else 0
            if len(self.rx) < RX_REFILL_BELOW:
                self.on_rx_room()
            self._update_irq()
            return value
        if offset == IER_DLM:
            return (self.divisor >> 8) & 0xFF if dlab else self.ier
        if offset == IIR_FCR:
            iir = self._iir()
            if iir == IIR_THRI:
                self.thr_interrupt = False  # reading IIR acknowledges a THR-empty interrupt
                self._update_irq()
            return iir | (IIR_FIFO_ENABLED if self.fcr & 1 else 0)
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            return LSR_THRE | LSR_TEMT | (LSR_DR if self.rx else 0)
        if offset == MSR:
            if self.mcr & MCR_LOOP:  # loopback: outputs read back as inputs (the driver's probe)
                m = self.mcr
                return ((m & 0x02) << 3) | ((m & 0x01) << 5) | ((m & 0x04) << 4) | ((m & 0x08) << 4)
            return 0xB0  # DCD, DSR, CTS: a cable is always attached
        return self.scr

    def write_port(self, offset: int, value: int) -> None:
        value &= 0xFF
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                self.divisor = (self.divisor & 0xFF00) | value
                return
            if self.mcr & MCR_LOOP:
                if len(self.rx) < RX_BUFFER_BYTES:
                    self.rx.append(value)
            else:
                self._output(bytes((value,)))
            # The byte leaves at once, so the holding register is empty again straight away.
            self.thr_interrupt = True
            self._update_irq()
        elif offset == IER_DLM:
            if dlab:
                self.divisor = (self.divisor & 0x00FF) | (value << 8)
                return
            enabling_thri = value & IER_THRI and not self.ier & IER_THRI
            self.ier = value & 0x0F
            if enabling_thri:
                self.thr_interrupt = True  # THR is empty: enabling the interrupt raises it
            self._update_irq()
        elif offset == IIR_FCR:
            self.fcr = value & FCR_WRITABLE
            if value & 0x02:
                self.rx.clear()
            self._update_irq()
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self.mcr = value & 0x1F
            self._update_irq()
        elif offset == SCR:
            self.scr = value

    def _iir(self) -> int:
        if self.ier & IER_RDI and self.rx:
            return IIR_RDI
        if self.ier & IER_THRI and self.thr_interrupt:
            return IIR_THRI
        return IIR_NO_INT

    def _update_irq(self) -> None:
        # On a PC the UART's interrupt reaches the PIC only while OUT2 is set.
        self._irq.set(self._iir() != IIR_NO_INT and bool(self.mcr & MCR_OUT2))

    # --- snapshots ------------------------------------------------------------------------------------------
    def get_state(self) -> dict:
        return state.dump(UartState(self.ier, self.lcr, self.mcr, self.scr, self.fcr, self.divisor,
                                    self.thr_interrupt, bytes(self.rx)))

    def set_state(self, data: dict) -> None:
        """Restore :meth:`get_state` output; raise SnapshotError (and change nothing) if it is not valid."""
        saved = state.load(UartState, data)
        state.assign(saved, self)
        self.rx = deque(saved.rx)
        self._update_irq()  # the interrupt line is derived: recompute it
