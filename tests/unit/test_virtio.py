import struct

import pytest

from conode.vm.devices.irq import IrqLine
from conode.vm.devices.legacy.pic import PicPair
from conode.vm.devices.virtio.console import VirtioConsole
from conode.vm.devices.virtio.host_stream import HostStream
from conode.vm.devices.virtio.mmio import (REG_INTERRUPT_ACK, REG_INTERRUPT_STATUS, REG_MAGIC, REG_QUEUE_NOTIFY,
                                           REG_STATUS, REG_VERSION, VirtioMmio)
from parts import RINGS, Ram, bring_up, out

QSIZE = 8
QUEUES = dict(enumerate(RINGS))


class Driver:
    """Just enough of a virtio driver to exercise the device side."""

    def __init__(self, transport: VirtioMmio, ram: Ram) -> None:
        self.t, self.ram = transport, ram
        self.avail_idx = {0: 0, 1: 0}
        self.next_desc = {0: 0, 1: 0}

    def bring_up(self) -> None:
        bring_up(self.t, (QSIZE, QSIZE))
        assert self.t.read(REG_STATUS, 4) == 15  # FEATURES_OK stuck, DRIVER_OK set

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
    ram.write(0xB000, b"hello")
    driver.post(1, 0xB000, 5, writable=False)
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
    driver.post(0, 0xC000, 4, writable=True)
    transport.write(REG_QUEUE_NOTIFY, 4, 0)
    assert ram.read(0xC000, 4) == b"0123" and stream.backlog == 6
    driver.post(0, 0xD000, 64, writable=True)
    transport.write(REG_QUEUE_NOTIFY, 4, 0)
    assert ram.read(0xD000, 6) == b"456789" and driver.used(0) == [(0, 4), (1, 6)]


def test_driver_without_version_1_is_refused():
    transport, *_ = make()
    transport.write(REG_STATUS, 4, 3)
    transport.write(REG_STATUS, 4, 3 | 8)
    assert not transport.read(REG_STATUS, 4) & 8


def test_transport_state_roundtrip_keeps_queue_positions():
    transport, stream, ram, _, _ = make()
    driver = Driver(transport, ram)
    driver.bring_up()
    ram.write(0xB000, b"x")
    driver.post(1, 0xB000, 1, writable=False)
    transport.write(REG_QUEUE_NOTIFY, 4, 1)
    other, other_stream, _, _, got = make()
    other.memory = ram
    other_stream.set_state(stream.get_state())
    other.set_state(transport.get_state())
    ram.write(0xB100, b"y")
    driver.post(1, 0xB100, 1, writable=False)
    other.write(REG_QUEUE_NOTIFY, 4, 1)
    assert got == b"y"


def test_host_channel_backlog_is_bounded():
    from conode.errors import ConodeError
    from conode.vm.devices.virtio.host_stream import MAX_PENDING_BYTES

    stream = HostStream(lambda data: None)
    stream.send(bytes(MAX_PENDING_BYTES - 10))
    with pytest.raises(ConodeError, match="not reading its host channel"):
        stream.send(bytes(11))
    assert stream.backlog == MAX_PENDING_BYTES - 10
    stream.take(100)
    stream.send(bytes(11))
    assert stream.backlog == MAX_PENDING_BYTES - 99
