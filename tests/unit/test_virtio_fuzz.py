"""The virtio-mmio transport and console under a hostile driver: random registers, descriptors and rings.

Whatever the guest writes, the host side raises nothing, stays within bounded memory and time, and a driver
error stops the queue with DEVICE_NEEDS_RESET, as the virtio specification has a device do.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conode.vm.devices.irq import IrqLine
from conode.vm.devices.legacy.pic import PicPair
from conode.vm.devices.virtio.console import MAX_TRANSMIT_CHAIN, VirtioConsole
from conode.vm.devices.virtio.host_stream import HostStream
from conode.vm.devices.virtio.mmio import (REG_CONFIG, REG_INTERRUPT_ACK, REG_QUEUE_NOTIFY, REG_STATUS,
                                           STATUS_NEEDS_RESET, VirtioMmio)
from conode.vm.devices.virtio.transport import QUEUE_SIZE_MAX
from parts import RINGS, Ram, bring_up

RAM_SIZE = 1 << 16
REGISTERS = [0x000, 0x004, 0x008, 0x00C, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x044, 0x050,
             0x060, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094, 0x0A0, 0x0A4, 0x0FC, REG_CONFIG, REG_CONFIG + 4]


class Rig:
    def __init__(self) -> None:
        self.pic = PicPair()
        self.ram = Ram(RAM_SIZE)
        self.received = 0
        self.stream = HostStream(self._receive)
        self.transport = VirtioMmio(VirtioConsole(self.stream), IrqLine(self.pic, 5), self.ram)

    def _receive(self, data: bytes) -> None:
        assert len(data) <= QUEUE_SIZE_MAX * MAX_TRANSMIT_CHAIN  # one notify moves a bounded amount
        self.received += len(data)


u32 = st.one_of(st.integers(0, 0xFFFFFFFF), st.sampled_from([0, 1, 2, 3, 4, 7, 8, 15, 16, 255, 256, 257, 4096,
                                                              RAM_SIZE - 1, RAM_SIZE, 0x7FFFFFFF, 0xFFFFFFFF]))
def mostly(usual: st.SearchStrategy, rare: st.SearchStrategy) -> st.SearchStrategy:
    """*usual* nine times in ten: plausible values reach deep into the device, the rest probe the edges."""
    return st.integers(0, 9).flatmap(lambda n: rare if n == 0 else usual)


address = mostly(st.integers(0, RAM_SIZE + 64), st.integers(0, 0xFFFFFFFFFFFFFFFF))
descriptor = st.tuples(address, mostly(st.integers(0, 64), u32), mostly(st.sampled_from([0, 1, 2, 3]),
                                                                          st.integers(0, 0xFFFF)),
                       mostly(st.integers(0, 9), st.integers(0, 0xFFFF)))

# a chain as a driver would post it (linked i -> i+1, or as the random flags say), then a notify
post_op = st.tuples(st.just("post"), st.integers(0, 1), st.integers(0, 7),
                    st.lists(descriptor, min_size=1, max_size=6), st.booleans())
operation = st.one_of(
    post_op, post_op, post_op, post_op,
    st.tuples(st.just("write"), st.sampled_from(REGISTERS), u32),
    st.tuples(st.just("read"), st.sampled_from(REGISTERS)),
    st.tuples(st.just("notify"), st.integers(0, 3)),
    st.tuples(st.just("ack"), st.integers(0, 3)),
    st.tuples(st.just("poke"), st.integers(0, RAM_SIZE - 1), st.binary(min_size=1, max_size=32)),
    st.tuples(st.just("descriptor"), st.integers(0, 1), mostly(st.integers(0, 9), st.integers(0, 300)),
              descriptor),
    st.tuples(st.just("avail"), st.integers(0, 1), mostly(st.integers(0, 12), st.integers(0, 0xFFFF)),
              st.lists(mostly(st.integers(0, 9), st.integers(0, 0xFFFF)), max_size=8)),
    st.tuples(st.just("send"), st.binary(max_size=300)),
)

# Valid layouts mostly, so that random descriptors reach the device; sometimes bogus ones.
ring_layout = mostly(st.just(RINGS),
                     st.tuples(*[st.tuples(u32, u32, u32)] * 2))
queue_size = mostly(st.sampled_from([8, 16, 64, 256, 1, 2]), u32)


def post(rig: Rig, layouts: tuple, queue: int, first: int, chain: list, linked: bool) -> None:
    desc, avail, _ = layouts[queue]
    ram = rig.ram.data
    for i, (addr, length, flags, nxt) in enumerate(chain):
        if linked:
            flags, nxt = (flags | 1 if i < len(chain) - 1 else flags & ~1), first + i + 1
        at = desc + 16 * (first + i)
        if at + 16 <= RAM_SIZE:
            ram[at:at + 16] = struct.pack("<QIHH", addr, length & 0xFFFFFFFF, flags & 0xFFFF, nxt & 0xFFFF)
    live = rig.transport.queues[queue]
    if avail + 4 <= RAM_SIZE:
        idx = struct.unpack_from("<H", ram, avail + 2)[0]
        slot = avail + 4 + 2 * (idx % (live.size if live else 8))
        if slot + 2 <= RAM_SIZE:
            struct.pack_into("<H", ram, slot, first)
        struct.pack_into("<H", ram, avail + 2, (idx + 1) & 0xFFFF)
    rig.transport.write(REG_QUEUE_NOTIFY, 4, queue)


def run(rig: Rig, layouts: tuple, ops: list) -> None:
    t, ram = rig.transport, rig.ram
    for op in ops:
        kind = op[0]
        if kind == "post":
            post(rig, layouts, *op[1:])
        elif kind == "write":
            t.write(op[1], 4, op[2])
        elif kind == "read":
            t.read(op[1], 4)
        elif kind == "notify":
            t.write(REG_QUEUE_NOTIFY, 4, op[1])
        elif kind == "ack":
            t.write(REG_INTERRUPT_ACK, 4, op[1])
        elif kind == "poke":
            at = op[1]
            ram.data[at:at + len(op[2])] = op[2][: RAM_SIZE - at]
        elif kind == "descriptor":
            table = layouts[op[1]][0] + 16 * op[2]
            if table + 16 <= RAM_SIZE:
                addr, length, flags, nxt = op[3]
                ram.data[table:table + 16] = struct.pack("<QIHH", addr, length & 0xFFFFFFFF, flags, nxt)
        elif kind == "avail":
            avail = layouts[op[1]][1]
            entries = op[3]
            if avail + 4 + 2 * len(entries) <= RAM_SIZE:
                ram.data[avail + 2:avail + 4] = struct.pack("<H", op[2])
                for i, head in enumerate(entries):
                    ram.data[avail + 4 + 2 * i:avail + 6 + 2 * i] = struct.pack("<H", head)
        elif kind == "send":
            rig.stream.send(op[1])


def check(rig: Rig) -> None:
    broken = [q for q in rig.transport.queues if q is not None and q.broken]
    if broken:
        assert rig.transport.read(REG_STATUS, 4) & STATUS_NEEDS_RESET
    assert rig.stream.backlog <= 300 * 200  # nothing the host sent is duplicated


FUZZ = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(sizes=st.tuples(queue_size, queue_size), layouts=ring_layout,
       ops=st.lists(operation, min_size=5, max_size=60))
def test_hostile_driver_after_a_bring_up(sizes, layouts, ops):
    rig = Rig()
    bring_up(rig.transport, sizes, layouts)
    run(rig, layouts, ops)
    check(rig)


@FUZZ
@given(layouts=ring_layout, ops=st.lists(operation, min_size=5, max_size=80))
def test_hostile_driver_from_reset(layouts, ops):
    rig = Rig()
    run(rig, layouts, ops)
    check(rig)


def test_a_looping_chain_stops_the_queue_and_asks_for_a_reset():
    rig = Rig()
    layouts = RINGS
    bring_up(rig.transport, (8, 8), layouts)
    ram = rig.ram.data
    ram[0x6000:0x6010] = struct.pack("<QIHH", 0xA000, 4, 1, 1)  # 0 -> 1
    ram[0x6010:0x6020] = struct.pack("<QIHH", 0xA000, 4, 1, 0)  # 1 -> 0: a loop
    ram[0x8002:0x8006] = struct.pack("<HH", 1, 0)
    rig.transport.write(REG_QUEUE_NOTIFY, 4, 1)
    assert rig.received == 0
    assert rig.transport.read(REG_STATUS, 4) & STATUS_NEEDS_RESET
    assert rig.pic.master.irr & (1 << 5) or rig.transport.interrupt_status & 2  # config change raised
    rig.transport.write(REG_STATUS, 4, 0)  # the driver resets the device: it works again
    bring_up(rig.transport, (8, 8), layouts)
    ram[0x6000:0x6010] = struct.pack("<QIHH", 0xA000, 2, 0, 0)
    ram[0xA000:0xA002] = b"ok"
    ram[0x8002:0x8006] = struct.pack("<HH", 1, 0)
    rig.transport.write(REG_QUEUE_NOTIFY, 4, 1)
    assert rig.received == 2 and not rig.transport.read(REG_STATUS, 4) & STATUS_NEEDS_RESET


def test_rings_outside_ram_are_refused_at_ready():
    rig = Rig()
    bring_up(rig.transport, (8, 8), ((RAM_SIZE - 16, 0x3000, 0x4000), (0x6000, 0x8001, 0x9000)))
    assert rig.transport.queues == [None, None]
    assert rig.transport.read(REG_STATUS, 4) & STATUS_NEEDS_RESET


def test_a_huge_transmit_chain_is_refused_not_read():
    rig = Rig()
    layouts = RINGS
    bring_up(rig.transport, (8, 8), layouts)
    for i in range(8):  # eight buffers of 60 KiB each over the same RAM: 480 KiB in one chain
        link = 1 if i < 7 else 0
        rig.ram.data[0x6000 + 16 * i:0x6010 + 16 * i] = struct.pack("<QIHH", 0, 60 << 10, link, i + 1)
    rig.ram.data[0x8002:0x8006] = struct.pack("<HH", 1, 0)
    rig.transport.write(REG_QUEUE_NOTIFY, 4, 1)
    assert rig.received == 0 and rig.transport.read(REG_STATUS, 4) & STATUS_NEEDS_RESET


@settings(max_examples=100, deadline=2000)
@given(chunks=st.lists(st.binary(min_size=1, max_size=512), min_size=1, max_size=20),
       size=st.sampled_from([1, 2, 8, 256]))
def test_well_formed_traffic_arrives_intact_whatever_the_buffer_sizes(chunks, size):
    rig = Rig()
    layouts = RINGS
    bring_up(rig.transport, (size, size), layouts)
    got = bytearray()
    rig.stream.on_receive = got.extend
    for i, chunk in enumerate(chunks):
        at = 0xA000 + 512 * (i % 16)
        rig.ram.data[at:at + len(chunk)] = chunk
        post(rig, layouts, 1, 0, [(at, len(chunk), 0, 0)], linked=True)
        # the host answers into a receive buffer of a random-ish size
        rig.stream.send(chunk)
        post(rig, layouts, 0, 0, [(0xE000, 1 + i * 37 % 600, 2, 0)], linked=True)
    assert bytes(got) == b"".join(chunks)
    assert not rig.transport.read(REG_STATUS, 4) & STATUS_NEEDS_RESET
