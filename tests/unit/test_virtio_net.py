"""The conet NIC (virtio-net) on the virtio-mmio transport: configuration, offloads end to end, frames made to
fit a driver without them, bounded receive backlog, and a hostile driver and network that it survives."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conode.limits import CONET_MAX_FRAME, CONET_MTU
from conode.vm.devices.irq import IrqLine
from conode.vm.devices.legacy.pic import PicPair
from conode.vm.devices.virtio import net
from conode.vm.devices.virtio.mmio import (REG_CONFIG, REG_DRIVER_FEATURES, REG_DRIVER_FEATURES_SEL,
                                           REG_INTERRUPT_STATUS, REG_STATUS, STATUS_NEEDS_RESET, VirtioMmio)
from parts import RINGS, Ram, bring_up
from test_virtio_fuzz import REGISTERS, descriptor, mostly, post, queue_size, ring_layout, u32
from test_virtio_fuzz import run as driver_operations

RAM_SIZE = 1 << 18  # room for a frame of the full MTU at 0x10000
ALL = net.OFFERED
PLAIN = net.F_MAC | net.F_MTU | net.F_STATUS  # a driver that takes no offload


class Backend:
    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def send(self, frame: bytes) -> None:
        self.frames.append(frame)


class Rig:
    def __init__(self, features: int = ALL, linked: bool = True, ram_size: int = RAM_SIZE) -> None:
        self.pic = PicPair()
        self.ram = Ram(ram_size)
        self.nic = net.VirtioNet(bytes.fromhex("02c0de000001"))
        self.backend = Backend()
        if linked:
            self.nic.connect(self.backend)
        self.transport = VirtioMmio(self.nic, IrqLine(self.pic, 5), self.ram)
        self.features = features
        self.next = {0: 0, 1: 0}  # next descriptor of each queue's table

    def bring_up(self, sizes: tuple[int, int] = (16, 16)) -> None:
        self.transport.write(REG_DRIVER_FEATURES_SEL, 4, 0)
        self.transport.write(REG_DRIVER_FEATURES, 4, self.features)
        bring_up(self.transport, sizes)

    def chain(self, queue: int, buffers: list[tuple[int, int]], writable: bool) -> None:
        first = self.next[queue] if self.next[queue] + len(buffers) <= 16 else 0  # the table of a 16-entry queue
        self.next[queue] = first + len(buffers)
        post(self, RINGS, queue, first, [(a, n, 2 if writable else 0, 0) for a, n in buffers], True)

    def transmit(self, frame: bytes, at: int = 0x10000) -> None:
        self.ram.data[at:at + len(frame)] = frame
        self.chain(net.TRANSMITQ, [(at, 12), (at + 12, len(frame) - 12)], False)

    def receive_buffer(self, at: int, size: int) -> None:
        self.chain(net.RECEIVEQ, [(at, size)], True)

    def used(self, queue: int) -> list[tuple[int, int]]:
        used = RINGS[queue][2]
        idx = struct.unpack_from("<H", self.ram.data, used + 2)[0]
        return [struct.unpack_from("<II", self.ram.data, used + 4 + 8 * i) for i in range(idx)]


def header(flags: int = 0, gso: int = 0, hdr_len: int = 0, gso_size: int = 0, start: int = 0, offset: int = 0,
           buffers: int = 0) -> bytes:
    return net.HEADER.pack(flags, gso, hdr_len, gso_size, start, offset, buffers)


ETHERNET = bytes.fromhex("02c0de000002" "02c0de000001" "0800")


def tcp_packet(payload: bytes) -> tuple[bytes, int]:
    """An IPv4/TCP packet as Linux hands it over with a partial checksum, and its correct TCP checksum."""
    src, dst = bytes([10, 77, 0, 1]), bytes([10, 77, 0, 2])
    segment_len = 20 + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + segment_len, 1, 0, 64, 6, 0, src, dst)
    tcp = struct.pack("!HHIIBBHHH", 5000, 40000, 1, 1, 5 << 4, 0x18, 1000, 0, 0)
    pseudo = src + dst + struct.pack("!BBH", 0, 6, segment_len)

    def ones_sum(data: bytes) -> int:  # big-endian words, the textbook way
        data += b"\0" * (len(data) & 1)
        total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        return total

    correct = ~ones_sum(pseudo + tcp + payload) & 0xFFFF
    partial = struct.pack("!H", ones_sum(pseudo))  # what the sender's kernel leaves in the field
    return ip + tcp[:16] + partial + tcp[18:] + payload, correct


# --- configuration and link -----------------------------------------------------------------------------------
def test_configuration_space_holds_the_mac_link_and_mtu():
    rig = Rig(linked=False)
    read = rig.transport.read
    assert bytes(read(REG_CONFIG + i, 1) for i in range(6)) == bytes.fromhex("02c0de000001")
    assert read(REG_CONFIG + 6, 2) == 0  # no backend: no carrier
    assert read(REG_CONFIG + 10, 2) == CONET_MTU
    rig.nic.connect(rig.backend)
    assert read(REG_CONFIG + 6, 2) == net.STATUS_LINK_UP


def test_the_driver_is_told_when_the_link_changes():
    rig = Rig(linked=False)
    rig.bring_up()
    assert rig.transport.read(REG_INTERRUPT_STATUS, 4) == 0
    rig.nic.connect(rig.backend)
    assert rig.transport.read(REG_INTERRUPT_STATUS, 4) & 2  # configuration change
    assert rig.pic.master.irr & (1 << 5)


# --- guest -> network -------------------------------------------------------------------------------------------
def test_a_transmitted_frame_reaches_the_backend_with_its_offload_header():
    rig = Rig()
    rig.bring_up()
    packet, _ = tcp_packet(b"x" * 3000)
    frame = header(net.HDR_F_NEEDS_CSUM, net.GSO_TCPV4, 54, 1448, 34, 16, buffers=7) + ETHERNET + packet
    rig.transmit(frame)
    assert rig.backend.frames == [frame[:10] + b"\0\0" + frame[12:]]  # num_buffers is 0 on the wire
    assert rig.used(net.TRANSMITQ) == [(0, 0)]
    assert rig.nic.counters["tx_gso"] == 1


def test_transmitted_frames_that_lie_are_dropped_and_counted():
    rig = Rig(features=PLAIN | net.F_CSUM)
    rig.bring_up()
    body = ETHERNET + bytes(100)
    lies = [
        header(gso=net.GSO_TCPV4, gso_size=1448, flags=1) + body,  # TSO, not negotiated
        header(flags=1, start=100, offset=16) + body,  # checksum beyond the frame
        header(flags=0x40) + body,  # unknown flag
        header(gso=3) + body,  # UFO: never offered
        header() + ETHERNET + bytes(CONET_MTU + 1),  # over the MTU without TSO
        header() + b"\x02" * 10,  # shorter than an Ethernet header
    ]
    for frame in lies:
        rig.transmit(frame)
    assert rig.backend.frames == []
    assert len(rig.used(net.TRANSMITQ)) == len(lies)  # every buffer is handed back
    assert sum(rig.nic.dropped.values()) == len(lies)
    assert not rig.transport.read(REG_STATUS, 4) & STATUS_NEEDS_RESET


def test_an_oversized_transmit_chain_is_dropped_not_read():
    rig = Rig()
    rig.bring_up()
    rig.chain(net.TRANSMITQ, [(0x10000, 0x10000)] * 2, False)  # 128 KiB over the same RAM
    assert rig.backend.frames == [] and rig.nic.dropped["transmitted frame size"] == 1


def test_without_a_backend_frames_are_dropped_silently():
    rig = Rig(linked=False)
    rig.bring_up()
    rig.transmit(header() + ETHERNET + bytes(50))
    assert rig.nic.dropped == {"link down": 1} and rig.used(net.TRANSMITQ) == [(0, 0)]
    assert rig.nic.deliver(header() + ETHERNET + bytes(50)) is False


# --- network -> guest -------------------------------------------------------------------------------------------
def test_a_driver_with_offloads_gets_the_frame_as_sent():
    rig = Rig()
    rig.bring_up()
    packet, _ = tcp_packet(b"y" * 5000)
    frame = header(net.HDR_F_NEEDS_CSUM, net.GSO_TCPV4, 54, 1448, 34, 16) + ETHERNET + packet
    rig.receive_buffer(0x8000, 0x8000)
    assert rig.nic.deliver(frame)
    (_, written), = rig.used(net.RECEIVEQ)
    assert written == len(frame)
    assert bytes(rig.ram.data[0x8000:0x8000 + written]) == frame[:10] + b"\1\0" + frame[12:]  # num_buffers 1


def test_a_driver_without_checksum_offload_gets_the_checksum_finished():
    rig = Rig(features=PLAIN)
    rig.bring_up()
    for size in (0, 1, 2, 999, 1400):
        packet, correct = tcp_packet(bytes(i * 7 & 0xFF for i in range(size)))
        rig.receive_buffer(0x8000, 2048)
        assert rig.nic.deliver(header(net.HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 16) + ETHERNET + packet)
        written = rig.used(net.RECEIVEQ)[-1][1]
        got = bytes(rig.ram.data[0x8000:0x8000 + written])
        assert got[:12] == header(buffers=1)  # no offload left for the driver to do
        assert struct.unpack_from("!H", got, 12 + 14 + 36)[0] == correct, size
        assert got[12 + 14 + 38:] == packet[38:]


def test_segmentation_offload_a_driver_did_not_take_is_dropped():
    rig = Rig(features=PLAIN | net.F_GUEST_CSUM)
    rig.bring_up()
    rig.receive_buffer(0x8000, 0x8000)
    packet, _ = tcp_packet(bytes(3000))
    assert not rig.nic.deliver(header(1, net.GSO_TCPV4, 54, 1448, 34, 16) + ETHERNET + packet)
    assert rig.nic.dropped == {"segmentation offload not negotiated": 1} and rig.used(net.RECEIVEQ) == []


def test_a_frame_larger_than_the_guest_buffer_is_handed_back_empty():
    rig = Rig()
    rig.bring_up()
    rig.receive_buffer(0x8000, 100)
    assert rig.nic.deliver(header() + ETHERNET + bytes(200))
    assert rig.used(net.RECEIVEQ) == [(0, 0)] and rig.nic.dropped["receive buffer too small"] == 1


def test_the_receive_backlog_waits_for_buffers_and_is_bounded():
    rig = Rig()
    rig.bring_up()
    frame = header() + ETHERNET + bytes(1000)
    accepted = sum(rig.nic.deliver(frame) for _ in range(net.RX_BACKLOG_FRAMES + 50))
    assert accepted == net.RX_BACKLOG_FRAMES and rig.nic.backlog == net.RX_BACKLOG_FRAMES
    assert rig.nic.dropped["receive backlog full"] == 50
    for i in range(4):  # the guest posts buffers: the oldest frames go in first
        rig.receive_buffer(0x8000 + 0x800 * i, 0x800)
    assert [n for _, n in rig.used(net.RECEIVEQ)] == [len(frame)] * 4 and rig.nic.backlog == net.RX_BACKLOG_FRAMES - 4
    rig.nic.connect(None)  # unplugged: what waited is gone
    assert rig.nic.backlog == 0


def test_frames_from_the_network_that_lie_are_dropped():
    rig = Rig()
    rig.bring_up()
    rig.receive_buffer(0x8000, 0x8000)
    for frame in (b"", b"\0" * 25, header(flags=1, start=60000, offset=2) + ETHERNET + bytes(10),
                  header(gso=net.GSO_ECN) + ETHERNET, bytes(CONET_MAX_FRAME + 1)):
        assert not rig.nic.deliver(frame)
    assert rig.used(net.RECEIVEQ) == [] and sum(rig.nic.dropped.values()) == 5


# --- a hostile driver and a hostile network --------------------------------------------------------------------------
frame_bytes = st.builds(lambda h, body: h + body,
                        st.one_of(st.binary(min_size=12, max_size=12),
                                  st.builds(header, st.sampled_from([0, 1, 2, 3]), st.sampled_from([0, 1, 0x81, 3]),
                                            st.integers(0, 100), st.integers(0, 2000), st.integers(0, 200),
                                            st.integers(0, 40))),
                        mostly(st.binary(min_size=0, max_size=300), st.binary(min_size=1400, max_size=1600)))
operation = st.one_of(
    st.tuples(st.just("post"), st.integers(0, 1), st.integers(0, 15), st.lists(descriptor, min_size=1, max_size=5),
              st.booleans()),
    st.tuples(st.just("transmit"), frame_bytes),
    st.tuples(st.just("buffer"), st.integers(0, 0x1F000), mostly(st.integers(0, 2048), u32)),
    st.tuples(st.just("deliver"), frame_bytes),
    st.tuples(st.just("deliver"), st.binary(max_size=40)),
    st.tuples(st.just("write"), st.sampled_from(REGISTERS), u32),
    st.tuples(st.just("read"), st.sampled_from(REGISTERS + [REG_CONFIG + 6, REG_CONFIG + 10, REG_CONFIG + 0x300])),
    st.tuples(st.just("notify"), st.integers(0, 3)),
    st.tuples(st.just("ack"), st.integers(0, 3)),
    st.tuples(st.just("poke"), st.integers(0, (1 << 16) - 1), st.binary(min_size=1, max_size=32)),
    st.tuples(st.just("link"), st.booleans()),
)


def run(rig: Rig, layouts: tuple, ops: list) -> None:
    """The network's and the NIC's own operations here; what any virtio driver does, as the console's fuzz does."""
    for op in ops:
        kind = op[0]
        if kind == "transmit":
            if layouts == RINGS and len(op[1]) >= 12:
                rig.transmit(op[1])
        elif kind == "buffer":
            if layouts == RINGS:
                rig.receive_buffer(op[1], min(op[2], RAM_SIZE - op[1]))
        elif kind == "deliver":
            rig.nic.deliver(op[1])
        elif kind == "link":
            rig.nic.connect(rig.backend if op[1] else None)
        else:
            driver_operations(rig, layouts, [op])


def check(rig: Rig) -> None:
    for frame in rig.backend.frames:  # what reaches the network is a well-formed conet frame
        assert net.MIN_FRAME <= len(frame) <= CONET_MAX_FRAME
        assert net.header_problem(frame) is None and frame[10:12] == b"\0\0"
    assert rig.nic.backlog <= net.RX_BACKLOG_FRAMES
    assert set(rig.nic.dropped) <= {"transmitted frame size", "transmitted frame header", "receive backlog full",
                                    "received frame size", "received frame header", "receive buffer too small",
                                    "segmentation offload not negotiated", "link down", "no driver"}
    if any(q is not None and q.broken for q in rig.transport.queues):
        assert rig.transport.read(REG_STATUS, 4) & STATUS_NEEDS_RESET


FUZZ = settings(max_examples=200, deadline=4000, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(features=mostly(st.sampled_from([ALL, PLAIN, PLAIN | net.F_CSUM | net.F_GUEST_CSUM]), u32),
       sizes=st.tuples(queue_size, queue_size), layouts=ring_layout, ops=st.lists(operation, min_size=5, max_size=50),
       brought_up=mostly(st.just(True), st.just(False)))
def test_hostile_driver_and_network(features, sizes, layouts, ops, brought_up):
    """Whatever the driver negotiates and writes, from a bring-up or from reset, and whatever the network sends."""
    rig = Rig(features=features & ALL)
    if brought_up:
        rig.transport.write(REG_DRIVER_FEATURES_SEL, 4, 0)
        rig.transport.write(REG_DRIVER_FEATURES, 4, features)
        bring_up(rig.transport, sizes, layouts)
    run(rig, layouts, ops)
    check(rig)
