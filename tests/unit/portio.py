"""Port I/O for device tests, through the machine's own wiring: a device sits where layout.py puts it."""

from __future__ import annotations

from typing import Any

from conode.vm.builder import MachineBuilder, PortBus
from conode.vm.devices.legacy.cmos import Cmos
from conode.vm.devices.legacy.pic import PicPair
from conode.vm.devices.legacy.pit import Pit
from conode.vm.devices.legacy.uart import Uart16550


def bus_for(device: Any) -> PortBus:
    build = MachineBuilder(PortBus(), device if isinstance(device, PicPair) else PicPair())
    if isinstance(device, PicPair):
        build.attach_pic()
    elif isinstance(device, Pit):
        build.attach_pit(device)
    elif isinstance(device, Cmos):
        build.attach_cmos(device)
    elif isinstance(device, Uart16550):
        build.attach_uart(device)
    else:
        raise TypeError(f"no port wiring for {type(device).__name__}")
    return build.bus


def out(device: Any, port: int, value: int) -> None:
    bus_for(device).port_write(port, 1, value)


def inp(device: Any, port: int) -> int:
    return bus_for(device).port_read(port, 1)
