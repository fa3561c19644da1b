"""The PCI host bridge (configuration mechanism #1) and the virtio-pci transport, through the machine's wiring:
port I/O on 0xCF8-0xCFF, BAR accesses at guest-physical addresses, interrupts on the PIC."""

from __future__ import annotations

import struct

import pytest

from conode.errors import SnapshotError
from conode.vm import layout
from conode.vm.builder import MachineBuilder, PortBus
from conode.vm.devices.legacy.pic import PicPair
from conode.vm.devices.pci import virtio_pci as pci
from conode.vm.devices.pci.config import COMMAND_INTX_DISABLE, STATUS_INTERRUPT
from conode.vm.devices.virtio.console import VirtioConsole
from conode.vm.devices.virtio.host_stream import HostStream
from conode.vm.devices.virtio.mmio import REG_QUEUE_NOTIFY, REG_STATUS
from conode.vm.devices.virtio.transport import STATUS_FEATURES_OK
from parts import RINGS, Ram, bring_up, out, pci_bring_up

BAR0 = layout.virtio_pci_bar_base(0)
SLOT = layout.virtio_pci_device(0)
IRQ = layout.VIRTIO_PCI_IRQS[0]


class Machine:
    """A PIC, the PCI bus and one virtio console, wired by the machine builder; MMIO windows kept by address."""

    def __init__(self) -> None:
        self.windows: dict[int, tuple[int, object, object]] = {}
        self.pic = PicPair()
        self.ram = Ram(1 << 16)
        self.received = bytearray()
        self.stream = HostStream(self.received.extend)
        build = MachineBuilder(PortBus(), self.pic, self._map, self.ram)
        build.attach_pic()
        self.bridge = build.attach_pci()
        self.mmio = build.attach_virtio(VirtioConsole(self.stream))
        self.function = build.virtio_pci[0]
        self.bus = build.bus
        out(self.pic, 0x21, 0x00)  # unmask everything
        out(self.pic, 0xA1, 0x00)

    def _map(self, base, size, read, write) -> None:
        self.windows[base] = (size, read, write)

    def _window(self, address: int):
        for base, (size, read, write) in self.windows.items():
            if base <= address < base + size:
                return address - base, read, write
        raise AssertionError(f"nothing mapped at {address:#x}")

    def mem_read(self, address: int, size: int) -> int:
        offset, read, _ = self._window(address)
        return read(offset, size)

    def mem_write(self, address: int, size: int, value: int) -> None:
        offset, _, write = self._window(address)
        write(offset, size, value)

    def config_read(self, device: int, register: int, size: int, bus: int = 0, function: int = 0) -> int:
        self.bus.port_write(0xCF8, 4, 1 << 31 | bus << 16 | device << 11 | function << 8 | register & 0xFC)
        return self.bus.port_read(0xCFC + (register & 3), size)

    def config_write(self, device: int, register: int, size: int, value: int) -> None:
        self.bus.port_write(0xCF8, 4, 1 << 31 | device << 11 | register & 0xFC)
        self.bus.port_write(0xCFC + (register & 3), size, value)

    def irq_level(self) -> bool:
        return bool(self.pic.slave.level & 1 << (IRQ - 8))


# --- configuration mechanism #1 ------------------------------------------------------------------------------
def test_linux_detects_mechanism_1_as_its_type1_check_does():
    m = Machine()
    m.bus.port_write(0xCFB, 1, 0x01)  # a byte write to 0xCFB is not the address register
    saved = m.bus.port_read(0xCF8, 4)
    m.bus.port_write(0xCF8, 4, 0x80000000)
    assert m.bus.port_read(0xCF8, 4) == 0x80000000
    m.bus.port_write(0xCF8, 4, saved)
    # pci_sanity_check: some device on bus 0 is a host bridge
    assert any(m.config_read(devfn >> 3, 0x0A, 2, function=devfn & 7) == 0x0600 for devfn in range(256))


def test_the_address_register_keeps_only_its_defined_bits():
    m = Machine()
    m.bus.port_write(0xCF8, 4, 0xFFFFFFFF)
    assert m.bus.port_read(0xCF8, 4) == 0x80FFFFFC
    assert m.bus.port_read(0xCF8, 1) == 0xFF and m.bus.port_read(0xCF8, 2) == 0xFFFF


@pytest.mark.parametrize("size", [1, 2, 4])
def test_nothing_there_reads_all_ones_and_ignores_writes(size):
    m = Machine()
    ones = (1 << 8 * size) - 1
    assert m.config_read(7, 0, size) == ones  # empty slot
    assert m.config_read(0, 0, size, bus=1) == ones  # another bus
    assert m.config_read(SLOT, 0, size, function=3) == ones  # another function
    m.bus.port_write(0xCF8, 4, SLOT << 11)  # enable bit clear
    assert m.bus.port_read(0xCFC, size) == ones
    m.config_write(7, 0x3C, size, 0)
    assert m.config_read(SLOT, 0, 4) == 0x10431AF4


def test_the_functions_identify_themselves():
    m = Machine()
    assert m.config_read(0, 0, 4) == 0x12378086 and m.config_read(0, 0x08, 4) >> 8 == 0x060000
    assert m.config_read(SLOT, 0, 2) == 0x1AF4 and m.config_read(SLOT, 2, 2) == 0x1040 + 3
    assert m.config_read(SLOT, 0x08, 1) >= 1  # a modern-only device
    assert m.config_read(SLOT, 0x0B, 1) == 0x07  # a communication controller
    assert m.config_read(SLOT, 0x0E, 1) == 0  # one function, type-0 header
    assert m.config_read(SLOT, 0x3D, 1) == 1 and m.config_read(SLOT, 0x3C, 1) == IRQ  # INTA, routed
    assert m.config_read(SLOT, 0x3E, 2) == m.config_read(SLOT, 0x3C, 4) >> 16  # lanes: 0xCFE is register 0x3E


def test_the_capabilities_name_the_four_regions_of_bar_0():
    m = Machine()
    assert m.config_read(SLOT, 0x06, 2) & 0x10
    found, at = {}, m.config_read(SLOT, 0x34, 1)
    while at:
        assert m.config_read(SLOT, at, 1) == 0x09  # vendor-specific
        cfg_type, bar = m.config_read(SLOT, at + 3, 1), m.config_read(SLOT, at + 4, 1)
        found[cfg_type] = (bar, m.config_read(SLOT, at + 8, 4), m.config_read(SLOT, at + 12, 4))
        if cfg_type == pci.CAP_NOTIFY:
            assert m.config_read(SLOT, at + 16, 4) == 0  # notify_off_multiplier
        at = m.config_read(SLOT, at + 1, 1)
    assert found == {pci.CAP_COMMON: (0, pci.COMMON, pci.COMMON_LENGTH), pci.CAP_ISR: (0, pci.ISR, pci.ISR_LENGTH),
                     pci.CAP_DEVICE: (0, pci.DEVICE, pci.REGION_SIZE),
                     pci.CAP_NOTIFY: (0, pci.NOTIFY, pci.NOTIFY_LENGTH)}


def test_read_only_registers_ignore_writes():
    m = Machine()
    before = bytes(m.function.config.data)
    for register in range(0, 0x100, 4):
        if register not in (0x04, 0x0C, 0x10, 0x3C):
            m.config_write(SLOT, register, 4, 0xFFFFFFFF)
    assert bytes(m.function.config.data) == before


def test_bar_sizing_and_moving_within_the_window():
    m = Machine()
    assert m.config_read(SLOT, 0x10, 4) == BAR0
    assert m.mem_read(BAR0 + pci.COMMON + pci.NUM_QUEUES, 2) == 2
    m.config_write(SLOT, 0x04, 2, 0)  # Linux turns decoding off while it sizes the BAR
    m.config_write(SLOT, 0x10, 4, 0xFFFFFFFF)
    assert m.config_read(SLOT, 0x10, 4) == ~(pci.BAR_SIZE - 1) & 0xFFFFFFFF
    assert m.config_read(SLOT, 0x14, 4) == 0  # no second BAR
    moved = BAR0 + 0x40000
    m.config_write(SLOT, 0x10, 4, moved)
    assert m.mem_read(BAR0 + pci.COMMON + pci.NUM_QUEUES, 2) == 0xFFFF  # decoding is off
    m.config_write(SLOT, 0x04, 2, 0x0002)
    assert m.mem_read(moved + pci.COMMON + pci.NUM_QUEUES, 2) == 2
    assert m.mem_read(BAR0 + pci.COMMON + pci.NUM_QUEUES, 2) == 0xFFFF  # nothing left behind
    m.mem_write(BAR0, 4, 0x1234)  # ignored, counted by the window's open bus


# --- the transport -------------------------------------------------------------------------------------------
def post(m: Machine, q: int, address: int, length: int, writable: bool, index: int = 0) -> None:
    desc, avail, _ = RINGS[q]
    m.ram.write(desc + 16 * index, struct.pack("<QIHH", address, length, 2 if writable else 0, 0))
    idx = struct.unpack("<H", m.ram.read(avail + 2, 2))[0]
    m.ram.write(avail + 4 + 2 * (idx % 8), struct.pack("<H", index))
    m.ram.write(avail + 2, struct.pack("<H", idx + 1))


def test_a_driver_moves_bytes_both_ways_with_intx_on_the_pic():
    m = Machine()
    common = BAR0 + pci.COMMON
    m.mem_write(common + pci.DEVICE_FEATURE_SELECT, 4, 1)
    assert m.mem_read(common + pci.DEVICE_FEATURE, 4) == 1  # VIRTIO_F_VERSION_1
    pci_bring_up(m.function)
    assert m.mem_read(common + pci.DEVICE_STATUS, 1) == 15
    assert m.mem_read(common + pci.QUEUE_MSIX_VECTOR, 2) == pci.NO_VECTOR  # no MSI-X: INTx it is
    m.ram.write(0xA000, b"hello")
    post(m, 1, 0xA000, 5, writable=False)
    m.mem_write(BAR0 + pci.NOTIFY, 2, 1)
    assert bytes(m.received) == b"hello"
    assert m.irq_level() and m.config_read(SLOT, 0x06, 2) & STATUS_INTERRUPT
    assert m.mem_read(BAR0 + pci.ISR, 1) == 1  # reading the ISR status acknowledges it
    assert not m.irq_level() and not m.config_read(SLOT, 0x06, 2) & STATUS_INTERRUPT
    assert m.mem_read(BAR0 + pci.ISR, 1) == 0
    m.config_write(SLOT, 0x04, 2, 0x0002 | COMMAND_INTX_DISABLE)
    post(m, 0, 0xB000, 16, writable=True)
    m.stream.send(b"world")
    m.mem_write(BAR0 + pci.NOTIFY, 2, 0)
    assert m.ram.read(0xB000, 5) == b"world"
    assert not m.irq_level() and m.config_read(SLOT, 0x06, 2) & STATUS_INTERRUPT  # pending, masked
    m.config_write(SLOT, 0x04, 2, 0x0002)
    assert m.irq_level()


def test_features_the_device_does_not_offer_are_refused():
    m = Machine()
    common = BAR0 + pci.COMMON
    m.mem_write(common + pci.DEVICE_STATUS, 1, 3)
    m.mem_write(common + pci.DRIVER_FEATURE_SELECT, 4, 0)
    m.mem_write(common + pci.DRIVER_FEATURE, 4, 1 << 1)  # VIRTIO_CONSOLE_F_MULTIPORT: not offered
    m.mem_write(common + pci.DEVICE_STATUS, 1, 3 | STATUS_FEATURES_OK)
    assert not m.mem_read(common + pci.DEVICE_STATUS, 1) & STATUS_FEATURES_OK


def test_one_device_is_driven_over_one_transport_at_a_time():
    m = Machine()
    bring_up(m.mmio)  # conode's kernel took the device over virtio-mmio
    pci_bring_up(m.function)  # a second driver tries over PCI: FEATURES_OK does not stick, its reset is its own
    assert not m.mem_read(BAR0 + pci.COMMON + pci.DEVICE_STATUS, 1) & STATUS_FEATURES_OK
    m.ram.write(0xA000, b"mmio")
    post(m, 1, 0xA000, 4, writable=False)
    m.mem_write(BAR0 + pci.NOTIFY, 2, 1)
    assert m.received == b""  # the PCI function is not live
    m.mmio.write(REG_QUEUE_NOTIFY, 4, 1)
    assert bytes(m.received) == b"mmio"  # the virtio-mmio driver still owns a working device
    m.mmio.write(REG_STATUS, 4, 0)  # it lets go
    pci_bring_up(m.function)
    assert m.mem_read(BAR0 + pci.COMMON + pci.DEVICE_STATUS, 1) == 15
    bring_up(m.mmio)
    assert not m.mmio.read(REG_STATUS, 4) & STATUS_FEATURES_OK


def test_a_transport_saved_and_restored_keeps_its_claim():
    m = Machine()
    pci_bring_up(m.function)
    saved = (m.bridge.get_state(), m.mmio.get_state(), m.function.get_state())
    other = Machine()
    other.bridge.set_state(saved[0])
    other.mmio.set_state(saved[1])
    other.function.set_state(saved[2])
    assert other.function.get_state() == saved[2]
    bring_up(other.mmio)
    assert not other.mmio.read(REG_STATUS, 4) & STATUS_FEATURES_OK


@pytest.mark.parametrize("field, value", [("bars", [BAR0 | 0x100, 0, 0, 0, 0, 0]), ("bars", [BAR0, 0x1000, 0, 0, 0, 0]),
                                          ("command", 0x0100), ("bars", [1 << 32, 0, 0, 0, 0, 0])])
def test_saved_configuration_with_fixed_bits_changed_is_refused(field, value):
    saved = Machine().function.get_state()
    saved["config"][field] = value
    with pytest.raises(SnapshotError, match="PCI configuration sets read-only bits"):
        Machine().function.set_state(saved)
