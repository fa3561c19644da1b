"""Wiring a machine: I/O port ranges, interrupt lines, the PCI bus and virtio slots, each attached in one call.

Addresses, ports and IRQ numbers come from :mod:`conode.vm.layout` only; a device never learns where it
sits (it decodes offsets from the base it is attached at) and gets narrow things — an interrupt line, guest
memory — never the machine.
"""

from __future__ import annotations

from typing import Callable

from conode.errors import ConodeError
from conode.vm import layout
from conode.vm.devices.irq import IrqLine
from conode.vm.devices.legacy.cmos import Cmos
from conode.vm.devices.legacy.pic import PicPair
from conode.vm.devices.legacy.pit import Pit
from conode.vm.devices.legacy.uart import Uart16550
from conode.vm.devices.open_bus import OpenBus
from conode.vm.devices.pci.host_bridge import PciHostBridge
from conode.vm.devices.pci.virtio_pci import VirtioPci
from conode.vm.devices.virtio.mmio import VirtioMmio
from conode.vm.devices.virtio.transport import DeviceClaim, VirtioDevice
from conode.vm.devices.virtio.queue import GuestMemory
from conode.vm.layout import PortRange

PortRead = Callable[[int], int]
PortWrite = Callable[[int, int], None]
SizedRead = Callable[[int, int], int]
SizedWrite = Callable[[int, int, int], None]


class PortBus:
    """The I/O port space, as the CPU's IN and OUT instructions see it."""

    def __init__(self) -> None:
        self._ports: dict[int, tuple[Callable, Callable, int, bool]] = {}

    def attach(self, ports: PortRange, read: PortRead, write: PortWrite) -> None:
        """Route *ports* to a byte-wide device's read(offset) and write(offset, value)."""
        self._attach(ports, read, write, False)

    def attach_sized(self, ports: PortRange, read: SizedRead, write: SizedWrite) -> None:
        """Route *ports* to a device that tells access widths apart: read(offset, size), write(offset, size, value)."""
        self._attach(ports, read, write, True)

    def _attach(self, ports: PortRange, read: Callable, write: Callable, sized: bool) -> None:
        for port in range(ports.base, ports.base + ports.count):
            if port in self._ports:
                raise ValueError(f"I/O port {port:#x} is attached twice")
            self._ports[port] = (read, write, ports.base, sized)

    def port_read(self, port: int, size: int) -> int:
        entry = self._ports.get(port)
        if entry is None:
            return (1 << (8 * size)) - 1  # nothing there: the bus floats high
        read, _, base, sized = entry
        return read(port - base, size) if sized else read(port - base)

    def port_write(self, port: int, size: int, value: int) -> None:
        entry = self._ports.get(port)
        if entry is not None:
            _, write, base, sized = entry
            if sized:
                write(port - base, size, value)
            else:
                write(port - base, value)


MapMmio = Callable[[int, int, Callable[[int, int], int], Callable[[int, int, int], None]], None]


class MachineBuilder:
    """Attaches devices to a machine's port bus, interrupt controller and MMIO space, one call each."""

    def __init__(self, bus: PortBus, pic: PicPair, map_mmio: MapMmio | None = None,
                 memory: GuestMemory | None = None) -> None:
        self.bus = bus
        self.pic = pic
        self._map_mmio = map_mmio
        self._memory = memory
        self.virtio: list[VirtioMmio] = []
        self.virtio_pci: list[VirtioPci] = []
        self.pci: PciHostBridge | None = None

    def irq(self, line: int) -> IrqLine:
        return IrqLine(self.pic, line)

    # --- the legacy PC devices, at their fixed places ------------------------------------------------------
    def attach_pic(self) -> None:
        self.bus.attach(layout.PORTS_PIC_MASTER, self.pic.read_master, self.pic.write_master)
        self.bus.attach(layout.PORTS_PIC_SLAVE, self.pic.read_slave, self.pic.write_slave)
        self.bus.attach(layout.PORTS_ELCR, self.pic.read_elcr, self.pic.write_elcr)

    def attach_pit(self, pit: Pit) -> None:
        self.bus.attach(layout.PORTS_PIT, pit.read_port, pit.write_port)
        self.bus.attach(layout.PORT_SYSTEM_CONTROL_B, pit.read_control_b, pit.write_control_b)

    def attach_cmos(self, cmos: Cmos) -> None:
        self.bus.attach(layout.PORTS_CMOS, cmos.read_port, cmos.write_port)

    def attach_uart(self, uart: Uart16550, ports: layout.PortRange = layout.PORTS_COM1) -> None:
        self.bus.attach(ports, uart.read_port, uart.write_port)

    # --- PCI ----------------------------------------------------------------------------------------------
    def attach_pci(self) -> PciHostBridge:
        """The host bridge on its configuration ports, and the window where BARs decode (before virtio slots)."""
        if self._map_mmio is None:
            raise ValueError("this builder has no MMIO space")
        self.pci = PciHostBridge(layout.PCI_MMIO_BASE, layout.PCI_MMIO_SIZE)
        self.bus.attach_sized(layout.PORTS_PCI_CONFIG, self.pci.read_port, self.pci.write_port)
        self._map_mmio(layout.PCI_MMIO_BASE, layout.PCI_MMIO_SIZE, self.pci.window_read, self.pci.window_write)
        return self.pci

    # --- virtio slots ---------------------------------------------------------------------------------------
    def attach_virtio(self, device: VirtioDevice) -> VirtioMmio:
        """Put *device* (holding its backend) in the next slot: a virtio-mmio window with its IRQ and command-line
        entry, and, with a PCI bus, also a virtio-pci function; the two share one claim on the device."""
        slot = len(self.virtio)
        if slot >= len(layout.VIRTIO_IRQS):
            raise ConodeError(f"the machine has room for {len(layout.VIRTIO_IRQS)} virtio devices")
        if self._map_mmio is None or self._memory is None:
            raise ValueError("this builder has no MMIO space or guest memory for virtio devices")
        claim = DeviceClaim()
        transport = VirtioMmio(device, self.irq(layout.VIRTIO_IRQS[slot]), self._memory, claim)
        base = layout.virtio_slot_base(slot)
        self._map_mmio(base, layout.VIRTIO_MMIO_SIZE, transport.read, transport.write)
        self.virtio.append(transport)
        if self.pci is not None:
            function = VirtioPci(device, self.irq(layout.VIRTIO_PCI_IRQS[slot]), self._memory,
                                 layout.virtio_pci_bar_base(slot), claim)
            self.pci.attach(layout.virtio_pci_device(slot), function)
            self.virtio_pci.append(function)
        return transport

    # --- the rest of the physical address space -------------------------------------------------------------
    def attach_open_bus(self, ram_bytes: int) -> list[OpenBus]:
        """Make every guest-physical address below 4 GiB that is neither RAM nor an attached device window read
        as all ones and ignore writes (call after the devices are attached)."""
        if self._map_mmio is None:
            raise ValueError("this builder has no MMIO space")
        devices_end = layout.virtio_slot_base(len(self.virtio))
        windows = [(ram_bytes, layout.VIRTIO_MMIO_BASE), (devices_end, layout.PHYSICAL_SPACE_END)]
        if self.pci is not None:  # the PCI window answers for itself, BARs or not
            windows[1:] = [(devices_end, layout.PCI_MMIO_BASE),
                           (layout.PCI_MMIO_BASE + layout.PCI_MMIO_SIZE, layout.PHYSICAL_SPACE_END)]
        buses = []
        for start, end in windows:
            if start < end:
                bus = OpenBus(start)
                self._map_mmio(start, end - start, bus.read, bus.write)
                buses.append(bus)
        return buses

    def kernel_cmdline(self) -> str:
        """How the guest learns of the virtio devices: ``virtio_mmio.device=<size>@<base>:<irq>`` each."""
        return " ".join(
            f"virtio_mmio.device={layout.VIRTIO_MMIO_SIZE >> 10}K@{layout.virtio_slot_base(i):#x}:"
            f"{layout.VIRTIO_IRQS[i]}"
            for i in range(len(self.virtio))
        )
