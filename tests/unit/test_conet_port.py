"""The worker's conet port: a guest's NIC joined to a switch over a real Unix SOCK_SEQPACKET socket."""

from __future__ import annotations

import os
import socket
import time
from collections import deque

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conode.conet.port import MIN_FRAME, QUEUE_FRAMES, Port, PortError
from conode.limits import CONET_MAX_FRAME
from conode.vm.devices.virtio import net
from conode.vm.devices.virtio.mmio import REG_CONFIG
from test_virtio_net import ETHERNET, Rig, header


class Switch:
    """The switch's end: a listening socket; accept() returns the port's connection and its token."""

    def __init__(self, path: str) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(path)
        self.listener.listen(1)

    def accept(self) -> tuple[socket.socket, bytes]:
        conn, _ = self.listener.accept()
        conn.settimeout(5)
        return conn, msgpack.unpackb(conn.recv(256))["token"]


class Machine:
    """The machine thread's side of call_soon and watch: functions wait until the test runs them."""

    def __init__(self) -> None:
        self.calls: deque = deque()
        self.watched: dict = {}

    def call_soon(self, fn) -> None:
        self.calls.append(fn)

    def watch(self, fd: int, handler) -> None:
        if handler is None:
            self.watched.pop(fd, None)
        else:
            self.watched[fd] = handler

    def run_calls_until(self, done, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, "the port never handed the frames over"
            while self.calls:
                self.calls.popleft()()
            time.sleep(0.01)


@pytest.fixture
def joined(tmp_path):
    switch = Switch(str(tmp_path / "conet.sock"))
    rig, machine = Rig(linked=False), Machine()
    rig.bring_up()
    port = Port(str(tmp_path / "conet.sock"), b"T" * 16)
    port.attach(rig.nic, machine.call_soon, machine.watch)
    conn, token = switch.accept()
    assert token == b"T" * 16
    yield rig, machine, port, conn
    port.close()
    conn.close()


def test_frames_travel_both_ways(joined):
    rig, machine, port, conn = joined
    assert rig.transport.read(REG_CONFIG + 6, 2) == net.STATUS_LINK_UP
    frame = header() + ETHERNET + b"to the switch"
    rig.transmit(frame)
    assert conn.recv(CONET_MAX_FRAME) == frame
    for i in range(3):
        rig.receive_buffer(0x8000 + 0x800 * i, 0x800)
    frames = [header() + ETHERNET + bytes([i]) * 100 for i in range(3)]
    for f in frames:
        conn.send(f)
    machine.run_calls_until(lambda: len(rig.used(net.RECEIVEQ)) == 3)
    assert [bytes(rig.ram.data[0x8000 + 0x800 * i:0x8000 + 0x800 * i + len(f)]) for i, f in enumerate(frames)] == \
        [f[:10] + b"\1\0" + f[12:] for f in frames]
    assert port.counters == {"tx_frames": 1, "rx_frames": 3}


def test_datagrams_of_the_wrong_size_are_dropped_and_counted(joined):
    rig, machine, port, conn = joined
    conn.send(b"short")
    conn.send(header() + ETHERNET + bytes(CONET_MAX_FRAME))  # over the limit
    conn.send(header() + ETHERNET + b"fine")
    rig.receive_buffer(0x8000, 0x800)
    machine.run_calls_until(lambda: port.counters["rx_frames"] == 1)
    assert port.dropped == {"wrong size from the switch": 2}


def test_a_guest_that_does_not_read_costs_a_bounded_queue(joined):
    _, machine, port, conn = joined
    frame = header() + ETHERNET + bytes(60)
    for _ in range(QUEUE_FRAMES + 100):  # the machine thread does not run meanwhile
        conn.send(frame)
    deadline = time.monotonic() + 5
    while port.dropped["queue to the guest full"] < 100 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert port.dropped["queue to the guest full"] == 100
    assert len(machine.calls) == 1  # one hand-over for the whole batch


def test_the_link_goes_down_when_the_switch_goes_away(joined):
    rig, machine, _, conn = joined
    conn.close()
    machine.run_calls_until(lambda: not rig.nic.link_up)
    assert rig.transport.read(REG_CONFIG + 6, 2) == 0
    rig.transmit(header() + ETHERNET + b"into the void")
    assert rig.nic.dropped["link down"] == 1


def test_no_switch_is_a_clear_error(tmp_path):
    with pytest.raises(PortError, match="without network"):
        Port(str(tmp_path / "absent.sock"), b"T" * 16)
    with pytest.raises(PortError, match="16 bytes"):
        Port(str(tmp_path / "absent.sock"), b"short")


def test_an_idle_machine_takes_frames_straight_from_the_socket_in_order(joined):
    rig, machine, port, conn = joined
    (serve,) = machine.watched.values()
    for i in range(8):
        rig.receive_buffer(0x8000 + 0x800 * i, 0x800)
    frames = [header() + ETHERNET + bytes([i]) * 100 for i in range(8)]
    for f in frames[:4]:
        conn.send(f)
    serve()  # as the machine thread does when the socket wakes it; the reader thread may take some first
    for f in frames[4:]:
        conn.send(f)
    machine.run_calls_until(lambda: len(rig.used(net.RECEIVEQ)) == 8)
    serve()  # a wake-up whose frames the reader took: nothing more, nothing twice
    got = [bytes(rig.ram.data[0x8000 + 0x800 * i:0x8000 + 0x800 * i + len(f)]) for i, f in enumerate(frames)]
    assert got == [f[:10] + b"\1\0" + f[12:] for f in frames]
    assert port.counters["rx_frames"] == 8 and len(rig.used(net.RECEIVEQ)) == 8


def test_the_machine_stops_watching_a_closed_port(joined):
    _, machine, port, conn = joined
    assert len(machine.watched) == 1
    port.close()
    assert machine.watched == {}


def test_the_machine_stops_watching_when_the_switch_goes_away(joined):
    rig, machine, _, conn = joined
    (serve,) = machine.watched.values()
    conn.close()
    serve()  # a socket at its end stays readable: an idle machine must not wake on it forever
    assert machine.watched == {}
    machine.run_calls_until(lambda: not rig.nic.link_up)  # the reader thread still unplugs the NIC


def test_the_machine_rests_until_set_or_a_watched_descriptor_is_served():
    from conode.vm.machine import Wakeup

    wake, served = Wakeup(), []
    left, right = socket.socketpair()
    try:
        wake.watch(left.fileno(), lambda: served.append(left.recv(16)))
        started = time.monotonic()
        wake.wait(0.05)
        assert time.monotonic() - started >= 0.04 and served == []  # nothing came: the whole rest
        right.send(b"frame")
        wake.wait(0.05, serve=False)  # a rest the CPU cap imposes serves nothing
        assert served == []
        wake.wait(5.0)
        assert served == [b"frame"]
        wake.set()
        started = time.monotonic()
        wake.wait(5.0)
        assert time.monotonic() - started < 1.0
        wake.clear()
        wake.watch(left.fileno(), None)
        right.send(b"unwatched")
        started = time.monotonic()
        wake.wait(0.05)
        assert served == [b"frame"] and time.monotonic() - started >= 0.04
    finally:
        left.close()
        right.close()


class Nic:
    """A NIC that takes every frame: what the port hands over, in order."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def deliver(self, frame: bytes) -> bool:
        self.frames.append(frame)
        return True

    def connect(self, backend) -> None:
        pass


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.one_of(st.integers(0, 80), st.integers(CONET_MAX_FRAME - 40, CONET_MAX_FRAME + 40)),
                      max_size=12),
       serve_after=st.sets(st.integers(0, 11)))
def test_whatever_the_switch_sends_is_handed_over_in_order_or_dropped_and_counted(tmp_path, sizes, serve_after):
    path = str(tmp_path / f"{os.urandom(4).hex()}.sock")  # one per example: the fixture's directory is shared
    switch, machine, nic = Switch(path), Machine(), Nic()
    port = Port(path, b"F" * 16)
    try:
        port.attach(nic, machine.call_soon, machine.watch)
        conn, _ = switch.accept()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        sent = []
        for i, size in enumerate(sizes):
            datagram = i.to_bytes(2, "big") * (size // 2) + bytes(size % 2)
            conn.send(datagram)
            sent.append(datagram)
            if i in serve_after:
                for serve in list(machine.watched.values()):
                    serve()  # the idle machine's own read, racing the reader thread's
        wanted = [d for d in sent if MIN_FRAME <= len(d) <= CONET_MAX_FRAME]
        machine.run_calls_until(lambda: len(nic.frames) == len(wanted)
                                and sum(port.dropped.values()) == len(sent) - len(wanted))
        assert nic.frames == wanted
        assert port.dropped == ({"wrong size from the switch": len(sent) - len(wanted)} if len(sent) > len(wanted)
                                else {})
        conn.close()
    finally:
        port.close()
        switch.listener.close()
