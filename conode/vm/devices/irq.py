"""An interrupt line: the only thing a device gets to signal interrupts."""

from __future__ import annotations

from typing import Protocol


class InterruptController(Protocol):
    def set_irq(self, irq: int, level: bool) -> None: ...


class IrqLine:
    """One input *irq* of an interrupt controller (the PIC pair), remembering its level."""

    def __init__(self, controller: InterruptController, irq: int) -> None:
        self._controller = controller
        self.irq = irq
        self.level = False

    def set(self, level: bool) -> None:
        if level != self.level:
            self.level = level
            self._controller.set_irq(self.irq, level)

    def pulse(self) -> None:
        """An edge: what a PIT tick is to the PIC."""
        self.set(False)
        self.set(True)
        self.set(False)
