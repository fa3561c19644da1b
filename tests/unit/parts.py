"""Machine parts for device tests: port I/O through the machine's own wiring, guest RAM as a byte array,
and a virtio driver's bring-up."""

from __future__ import annotations

import ctypes
from typing import Any

from conode.vm.builder import MachineBuilder, PortBus
from conode.vm.devices.legacy.cmos import Cmos
from conode.vm.devices.legacy.pic import PicPair
from conode.vm.devices.legacy.pit import Pit
from conode.vm.devices.legacy.uart import Uart16550
from conode.vm.devices.pci import virtio_pci as pci
from conode.vm.devices.pci.virtio_pci import VirtioPci
from conode.vm.devices.virtio.block_native import DMA_DONE, DMA_WRITE, NativeRam
from conode.vm.devices.virtio.mmio import (REG_DRIVER_FEATURES, REG_DRIVER_FEATURES_SEL, REG_QUEUE_DESC_LOW,
                                           REG_QUEUE_DEVICE_LOW, REG_QUEUE_DRIVER_LOW, REG_QUEUE_NUM,
                                           REG_QUEUE_READY, REG_QUEUE_SEL, REG_STATUS, STATUS_FEATURES_OK,
                                           VirtioMmio)

# Where a test driver puts its rings: (descriptor table, available ring, used ring) per queue.
RINGS = ((0x1000, 0x3000, 0x4000), (0x6000, 0x8000, 0x9000))


# --- port I/O: a legacy device sits where layout.py puts it -------------------------------------------------
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


# --- guest memory -----------------------------------------------------------------------------------------------
class Ram:
    """Guest memory as a plain byte array; a device access outside it fails the test."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = bytearray(size)

    def read(self, address: int, length: int) -> bytes:
        assert 0 <= address and address + length <= self.size, f"device read outside RAM: {address:#x}+{length}"
        return bytes(self.data[address:address + length])

    def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        assert 0 <= address and address + len(data) <= self.size, f"device write outside RAM: {address:#x}"
        self.data[address:address + len(data)] = data

    def window(self, address: int, length: int) -> memoryview:
        assert 0 <= address and address + length <= self.size, f"device window outside RAM: {address:#x}"
        return memoryview(self.data)[address:address + length]

    def scatter(self, pieces: list, source: bytearray) -> None:
        at = 0
        for address, length, *_ in pieces:
            self.write(address, source[at:at + length])
            at += length


class HostRam(Ram):
    """Ram that native device code reaches too: its host address, and DMA functions that check each access:
    a copying one, and with *direct* one told of what the device wrote in place."""

    def __init__(self, size: int, direct: bool = False) -> None:
        super().__init__(size)
        self.dma_writes = 0
        self.dma_done = 0

        def dma_write(handle: int, address: int, source: int, length: int) -> int:
            self.dma_writes += 1
            self.window(address, length)[:] = ctypes.string_at(source, length)
            return 0

        def dma_done(handle: int, address: int, length: int) -> int:
            self.dma_done += 1
            self.window(address, length)
            return 0

        self._functions = DMA_WRITE(dma_write), DMA_DONE(dma_done)  # kept alive with the RAM
        host = ctypes.addressof((ctypes.c_char * size).from_buffer(self.data))
        write, done = (ctypes.cast(f, ctypes.c_void_p).value or 0 for f in self._functions)
        self.native = NativeRam(host, size, write, done if direct else 0, 0)


# --- a virtio driver's first steps ----------------------------------------------------------------------------
def bring_up(transport: VirtioMmio, sizes: tuple[int, ...] = (8, 8),
             rings: tuple[tuple[int, int, int], ...] = RINGS) -> None:
    """Negotiate VIRTIO_F_VERSION_1, set up the queues at *rings*, and set DRIVER_OK, as Linux does."""
    transport.write(REG_STATUS, 4, 3)  # ACKNOWLEDGE | DRIVER
    transport.write(REG_DRIVER_FEATURES_SEL, 4, 1)
    transport.write(REG_DRIVER_FEATURES, 4, 1)  # VIRTIO_F_VERSION_1
    transport.write(REG_STATUS, 4, 3 | STATUS_FEATURES_OK)
    for q, (size, (desc, avail, used)) in enumerate(zip(sizes, rings)):
        transport.write(REG_QUEUE_SEL, 4, q)
        transport.write(REG_QUEUE_NUM, 4, size)
        transport.write(REG_QUEUE_DESC_LOW, 4, desc)
        transport.write(REG_QUEUE_DRIVER_LOW, 4, avail)
        transport.write(REG_QUEUE_DEVICE_LOW, 4, used)
        transport.write(REG_QUEUE_READY, 4, 1)
    transport.write(REG_STATUS, 4, 15)  # ... | DRIVER_OK


def pci_bring_up(function: VirtioPci, sizes: tuple[int, ...] = (8, 8),
                 rings: tuple[tuple[int, int, int], ...] = RINGS) -> None:
    """The same bring-up through a virtio-pci function's common configuration, with the widths Linux uses."""
    def write(register: int, size: int, value: int) -> None:
        function.bar_write(0, pci.COMMON + register, size, value)

    write(pci.DEVICE_STATUS, 1, 0)
    write(pci.DEVICE_STATUS, 1, 3)
    write(pci.DRIVER_FEATURE_SELECT, 4, 1)
    write(pci.DRIVER_FEATURE, 4, 1)  # VIRTIO_F_VERSION_1
    write(pci.DEVICE_STATUS, 1, 3 | STATUS_FEATURES_OK)
    for q, (size, (desc, avail, used)) in enumerate(zip(sizes, rings)):
        write(pci.QUEUE_SELECT, 2, q)
        write(pci.QUEUE_SIZE, 2, size)
        write(pci.QUEUE_DESC_LO, 4, desc)
        write(pci.QUEUE_DRIVER_LO, 4, avail)
        write(pci.QUEUE_DEVICE_LO, 4, used)
        write(pci.QUEUE_ENABLE, 2, 1)
    write(pci.DEVICE_STATUS, 1, 15)
