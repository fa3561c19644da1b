import struct

from conode.vm.devices.irq import IrqLine
from conode.vm.devices.legacy.pic import PicPair
from conode.vm.devices.virtio.console import VirtioConsole
from conode.vm.devices.virtio.host_stream import HostStream
from conode.vm.devices.virtio.mmio import (REG_DRIVER_FEATURES, REG_DRIVER_FEATURES_SEL, REG_INTERRUPT_ACK,
                                           REG_INTERRUPT_STATUS, REG_MAGIC, REG_QUEUE_DESC_LOW,
                                           REG_QUEUE_DEVICE_LOW, REG_QUEUE_DRIVER_LOW, REG_QUEUE_NOTIFY,
                                           REG_QUEUE_NUM, REG_QUEUE_READY, REG_QUEUE_SEL, REG_STATUS,
                                           REG_VERSION, VirtioMmio)
from portio import out


class Ram:
    """Guest memory as a plain byte array."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = bytearray(size)

    def read(self, address: int, length: int) -> bytes:
        return bytes(self.data[address:address + length])

    def write(self, address: int, data: bytes) -> None:
        self.data[address:address + len(data)] = data


QSIZE = 8
QUEUES = {0: (0x1000, 0x1100, 0x1200), 1: (0x2000, 0x2100, 0x2200)}


class Driver:
    """Just enough of a virtio driver to exercise the device side."""

    def __init__(self, transport: VirtioMmio, ram: Ram) -> None:
        self.t, self.ram = transport, ram
        self.avail_idx = {0: 0, 1: 0}
        self.next_desc = {0: 0, 1: 0}

    def bring_up(self) -> None:
        t = self.t
        t.write(REG_STATUS, 4, 1 | 2)
        t.write(REG_DRIVER_FEATURES_SEL, 4, 1)
        t.write(REG_DRIVER_FEATURES, 4, 1)  # VIRTIO_F_VERSION_1
        t.write(REG_STATUS, 4, 1 | 2 | 8)
        assert t.read(REG_STATUS, 4) & 8
        for q, (desc, avail, used) in QUEUES.items():
            t.write(REG_QUEUE_SEL, 4, q)
            t.write(REG_QUEUE_NUM, 4, QSIZE)
            t.write(REG_QUEUE_DESC_LOW, 4, desc)
            t.write(REG_QUEUE_DRIVER_LOW, 4, avail)
            t.write(REG_QUEUE_DEVICE_LOW, 4, used)
            t.write(REG_QUEUE_READY, 4, 1)
        t.write(REG_STATUS, 4, 1 | 2 | 8 | 4)

    def post(self, q: int, address: int, length: int, writable: bool) -> None:
        desc, avail, _ = QUEUES[q]
        index = self.next_desc[q] % QSIZE
        self.next_desc[q] += 1
        self.ram.write(desc + 16 * index, struct.pack("<QIHH", address, length, 2 if writable else 0, 0))
        slot = self.avail_idx[q] % QSIZE
        self.ram.write(avail + 4 + 2 * slot, struct.pack("<H", index))
        self.avail_idx[q] += 1
        self.ram.write(avail + 2, struct.pack("<H", self.avail_idx[q]))

    def used(self, q: int) -> list[tuple[int, int]]:
        _, _, used = QUEUES[q]
        idx = struct.unpack("<H", self.ram.read(used + 2, 2))[0]
        return [struct.unpack("<II", self.ram.read(used + 4 + 8 * i, 8)) for i in range(idx)]


def make():
    pic = PicPair()
    out(pic, 0x21, 0x00)
    received = bytearray()
    stream = HostStream(received.extend)
    ram = Ram(1 << 16)
    transport = VirtioMmio(VirtioConsole(stream), IrqLine(pic, 5), ram)
    return transport, stream, ram, pic, received


def test_identity_registers():
    transport, *_ = make()
    assert transport.read(REG_MAGIC, 4) == 0x74726976 and transport.read(REG_VERSION, 4) == 2


def test_guest_to_host_bytes_and_interrupt():
    transport, stream, ram, pic, received = make()
    driver = Driver(transport, ram)
    driver.bring_up()
    ram.write(0x8000, b"hello")
    driver.post(1, 0x8000, 5, writable=False)
    transport.write(REG_QUEUE_NOTIFY, 4, 1)
    assert received == b"hello"
    assert driver.used(1) == [(0, 0)]
    assert transport.read(REG_INTERRUPT_STATUS, 4) == 1 and pic.has_interrupt()
    transport.write(REG_INTERRUPT_ACK, 4, 1)
    assert transport.read(REG_INTERRUPT_STATUS, 4) == 0


def test_host_to_guest_waits_for_buffers_and_splits():
    transport, stream, ram, pic, _ = make()
    driver = Driver(transport, ram)
    driver.bring_up()
    stream.send(b"0123456789")
    assert stream.backlog == 10  # no receive buffer yet
    driver.post(0, 0x9000, 4, writable=True)
    transport.write(REG_QUEUE_NOTIFY, 4, 0)
    assert ram.read(0x9000, 4) == b"0123" and stream.backlog == 6
    driver.post(0, 0xA000, 64, writable=True)
    transport.write(REG_QUEUE_NOTIFY, 4, 0)
    assert ram.read(0xA000, 6) == b"456789" and driver.used(0) == [(0, 4), (1, 6)]


def test_driver_without_version_1_is_refused():
    transport, *_ = make()
    transport.write(REG_STATUS, 4, 3)
    transport.write(REG_STATUS, 4, 3 | 8)
    assert not transport.read(REG_STATUS, 4) & 8


def test_transport_state_roundtrip_keeps_queue_positions():
    transport, stream, ram, _, _ = make()
    driver = Driver(transport, ram)
    driver.bring_up()
    ram.write(0x8000, b"x")
    driver.post(1, 0x8000, 1, writable=False)
    transport.write(REG_QUEUE_NOTIFY, 4, 1)
    other, other_stream, _, _, got = make()
    other.memory = ram
    other_stream.set_state(stream.get_state())
    other.set_state(transport.get_state())
    ram.write(0x8100, b"y")
    driver.post(1, 0x8100, 1, writable=False)
    other.write(REG_QUEUE_NOTIFY, 4, 1)
    assert got == b"y"
