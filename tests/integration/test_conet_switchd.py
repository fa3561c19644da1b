"""The conet switch process for real: switchd processes on loopback, linked by CURVE with real key pairs, and
guest ports that are real SOCK_SEQPACKET clients sending crafted frames (conode/testing/conet.py)."""

import os
import signal
import socket
import subprocess
import sys
import time

import msgpack
import pytest
import zmq

from conode.agent.pipe import pack
from conode.cluster.keys import generate_key_pair
from conode.conet import frames
from conode.conet import switch as sw
from conode.conet.switchd import BAD_TOKEN, PEER_BUSY, REFUSED, TOKEN_TIMEOUT_S
from conode.limits import CONET_MTU, CONET_RELAY_AFTER_S, CONET_VNET_HDR
from coordinator.relay import NOT_PEERS, Relay
from conode.testing.conet import GuestPort, SwitchProcess, arp, ethernet, ipv4, load_process, load_result, sized


def mac(n: int) -> bytes:
    return bytes([2, 0, 0, 0, 0, n])


def ip(n: int) -> str:
    return f"10.9.0.{n}"


@pytest.fixture
def switches(tmp_path):
    """Start switches with ``start(name)``; all are stopped at the end, and their logs shown on failure."""
    started: list[SwitchProcess] = []

    def start(name: str, **kwargs) -> SwitchProcess:
        process = SwitchProcess(tmp_path / name, name, **kwargs).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
        print(f"--- {process.name} ---\n{process.log()}")


def mesh(*members: SwitchProcess) -> None:
    for member in members:
        member.set_peers(*[other for other in members if other is not member])


def until_delivered(sender, frame: bytes, receiver, timeout: float = 10.0) -> bytes:
    """Send *frame* until *receiver* gets it (peer links come up asynchronously); the frame received."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sender.send(frame)
        got = receiver.receive(0.3)
        if got is not None:
            receiver.drain(0.2)  # copies of earlier attempts
            return got
    raise AssertionError(f"{receiver.name} never got a frame from {sender.name}")


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_broadcast_reaches_its_network_on_every_agent_and_nothing_else(switches):
    a, b = switches("a"), switches("b")
    mesh(a, b)
    g1 = a.add_port(mac(1), ip(1), "red", "g1")
    g4 = a.add_port(mac(4), ip(4), "blue", "g4")
    g2 = b.add_port(mac(2), ip(2), "red", "g2")
    g3 = b.add_port(mac(3), ip(3), "blue", "g3")
    request = arp(mac(1), ip(1), ip(2))
    assert until_delivered(g1, request, g2) == request
    g1.send(request)
    assert g2.receive() == request
    assert g3.drain() == [] and g4.drain() == [] and g1.drain() == []
    reply = arp(mac(3), ip(3), ip(4))  # the blue network on its own
    assert until_delivered(g3, reply, g4) == reply
    assert g1.drain() == [] and g2.drain() == []


def test_unicast_after_learning_goes_only_to_its_port(switches):
    a, b, c = switches("a"), switches("b"), switches("c")
    mesh(a, b, c)
    g1 = a.add_port(mac(1), ip(1), "red", "g1")
    g5 = a.add_port(mac(5), ip(5), "red", "g5")
    g2 = b.add_port(mac(2), ip(2), "red", "g2")
    g6 = b.add_port(mac(6), ip(6), "red", "g6")
    g7 = c.add_port(mac(7), ip(7), "red", "g7")
    until_delivered(g1, arp(mac(1), ip(1), ip(7)), g7)  # every link a needs is up, without a word from g2
    until_delivered(g1, arp(mac(1), ip(1), ip(6)), g6)
    until_delivered(g6, arp(mac(6), ip(6), ip(1)), g1)
    for port in (g1, g2, g5, g6, g7):
        port.drain(0.2)
    flooded = c.stats()["peers"]["a"]["dropped"].get(sw.NOT_HERE, 0)
    to_g2 = ipv4(mac(2), mac(1), ip(1), ip(2), b"before learning")
    g1.send(to_g2)
    assert g2.receive() == to_g2  # flooded to every peer: b delivers it, c drops it
    wait_for(lambda: c.stats()["peers"]["a"]["dropped"].get(sw.NOT_HERE, 0) == flooded + 1)
    to_g1 = ipv4(mac(1), mac(2), ip(2), ip(1), b"reply")
    assert until_delivered(g2, to_g1, g1) == to_g1  # a learns that mac 2 is behind b
    for _ in range(20):
        g1.send(to_g2)
    assert len(g2.drain()) == 20
    assert g5.drain() == [] and g6.drain() == [] and g7.drain() == []
    assert c.stats()["peers"]["a"]["dropped"].get(sw.NOT_HERE, 0) == flooded + 1  # c no longer gets them
    for n in range(300):  # a burst: it crosses in batches, complete and in order
        assert g1.send(ipv4(mac(2), mac(1), ip(1), ip(2), n.to_bytes(4, "big")))
    assert [int.from_bytes(frame[46:50], "big") for frame in g2.drain()] == list(range(300))
    assert b.stats()["peers"]["a"]["rx_frames"] >= 321
    local = ipv4(mac(5), mac(1), ip(1), ip(5), b"next door")
    g1.send(local)
    assert g5.receive() == local
    assert g2.drain() == [] and g6.drain() == []


def test_spoofed_frames_are_dropped_and_counted(switches):
    a = switches("a")
    g1 = a.add_port(mac(1), ip(1), "red", "g1")
    g2 = a.add_port(mac(2), ip(2), "red", "g2")
    spoofs = {
        sw.SPOOFED_MAC: ipv4(mac(2), mac(9), ip(1), ip(2)),
        sw.SPOOFED_IP: ipv4(mac(2), mac(1), ip(9), ip(2)),
        sw.SPOOFED_ARP: arp(mac(1), ip(2), ip(2)),
        frames.TAGGED: ethernet(mac(2), mac(1), 0x8100, bytes(60)),
    }
    for frame in spoofs.values():
        for _ in range(3):
            assert g1.send(frame)
    honest = ipv4(mac(2), mac(1), ip(1), ip(2))
    g1.send(honest)
    assert g2.drain() == [honest]
    stats = a.stats()
    assert stats["dropped"] == {reason: 3 for reason in spoofs}
    assert stats["ports"]["g1"]["dropped"] == {reason: 3 for reason in spoofs}
    assert stats["ports"]["g1"]["rx_frames"] == 1 and stats["ports"]["g2"]["tx_frames"] == 1
    assert a.log().count("dropping frames of guest g1") == len(spoofs)  # once per reason


def test_an_unenrolled_switch_cannot_reach_our_guests(switches):
    a, b, x = switches("a"), switches("b"), switches("x")
    mesh(a, b)
    x.set_peers(a)  # x knows a, but a's agent never listed x
    g1 = a.add_port(mac(1), ip(1), "red", "g1")
    g2 = b.add_port(mac(2), ip(2), "red", "g2")
    gx = x.add_port(mac(8), ip(8), "red", "gx")
    until_delivered(g2, arp(mac(2), ip(2), ip(1)), g1)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        gx.send(arp(mac(8), ip(8), ip(1)))
        assert g1.receive(0.1) is None
    assert a.stats()["dropped"].get(REFUSED, 0) >= 1
    assert x.stats()["peers"]["a"]["dropped"].get(PEER_BUSY, 0) >= 1
    assert "refused connection from unenrolled key" in a.log()


def test_a_peer_removed_from_the_list_is_cut_off(switches):
    a, b = switches("a"), switches("b")
    mesh(a, b)
    g1 = a.add_port(mac(1), ip(1), "red", "g1")
    g2 = b.add_port(mac(2), ip(2), "red", "g2")
    until_delivered(g2, arp(mac(2), ip(2), ip(1)), g1)
    a.set_peers()  # b's connection is up already: its frames now come from an unknown key
    for _ in range(5):
        g2.send(arp(mac(2), ip(2), ip(1)))
    assert g1.drain() == []
    assert a.stats()["dropped"][sw.UNKNOWN_PEER] == 5


def test_malformed_input_is_counted_and_the_switch_goes_on(switches):
    a = switches("a")
    g1 = a.add_port(mac(1), ip(1), "red", "g1")
    g2 = a.add_port(mac(2), ip(2), "red", "g2")
    assert g1.send(b"")
    assert g1.send(b"\x00" * 10)
    assert g1.send(sized(ipv4(mac(2), mac(1), ip(1), ip(2), gso_type=1), 70_000))
    assert g1.send(sized(ipv4(mac(2), mac(1), ip(1), ip(2)), CONET_VNET_HDR + 14 + CONET_MTU + 1))  # past the MTU
    assert g1.send(ipv4(mac(2), mac(1), ip(1), ip(2))[:30])
    # connections with a wrong token (waits for its port for a while: the agent may register it late), with
    # garbage, and with nothing at all
    strangers = []
    for hello in (msgpack.packb({"token": os.urandom(16)}), b"\xc1garbage", msgpack.packb([1, 2])):
        stranger = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        stranger.settimeout(TOKEN_TIMEOUT_S + 5)
        stranger.connect(str(a.ports_path))
        stranger.send(hello)
        strangers.append(stranger)
    for stranger in strangers:
        assert stranger.recv(100) == b""  # closed by the switch
        stranger.close()
    # bad control requests are logged and ignored
    a.request({"type": "port", "token": b"x", "mac": mac(3), "ip": ip(3), "network": "red", "guest": "g3"})
    a.request({"type": "port", "token": os.urandom(16), "mac": mac(2), "ip": ip(3), "network": "red",
               "guest": "g3"})
    a.request({"type": "peers", "peers": [{"agent": "z", "endpoint": "tcp://h:1", "key": "short"}]})
    a.request({"type": "peers", "peers": [{"agent": "v", "endpoint": "tcp://h:1", "key": "%" * 40}]})
    other_key = zmq.curve_keypair()[0].decode()
    a.request({"type": "peers", "peers": [{"agent": "y", "endpoint": "tcp://h:99999", "key": other_key}]})
    a.request({"type": "peers", "peers": [{"agent": "w", "endpoint": "ipc:///tmp/x", "key": a.keys.public}]})
    a.request({"type": "launch", "missiles": True})
    honest = ipv4(mac(2), mac(1), ip(1), ip(2))
    g1.send(honest)
    assert g2.drain() == [honest]
    stats = a.stats()
    assert stats["dropped"] == {frames.SHORT: 2, frames.OVERSIZED: 2, frames.BAD_IPV4: 1, BAD_TOKEN: 3}
    assert set(stats["ports"]) == {"g1", "g2"}
    log = a.log()
    assert "ignored port request: a port token must be 16 bytes" in log
    assert "ignored port request: MAC 02:00:00:00:00:02 already belongs to guest g2" in log
    assert "ignored peers request: peer z's key is not a Z85 public key" in log
    assert "ignored peers request: peer v's key is not a Z85 public key" in log
    assert "ignored launch request: unknown request type 'launch'" in log
    assert "ignored peers request: peer y's endpoint 'tcp://h:99999' is not tcp://HOST:PORT" in log
    assert "ignored peers request: peer w's endpoint 'ipc:///tmp/x' is not tcp://HOST:PORT" in log
    assert stats["peers"] == {}
    assert "Traceback" not in log


def test_a_guest_that_does_not_read_loses_frames_and_nothing_else(switches):
    a = switches("a")
    g1 = a.add_port(mac(1), ip(1), "red", "g1")
    g2 = a.add_port(mac(2), ip(2), "red", "g2")  # never reads
    g3 = a.add_port(mac(3), ip(3), "red", "g3")
    g1.sock.settimeout(10)
    for n in range(300):  # 19 MiB: more than g2's socket and its queue in the switch hold
        g1.sock.send(sized(ipv4(mac(2), mac(1), ip(1), ip(2), n.to_bytes(4, "big"), gso_type=1), 65_000))

    def accounted() -> int:
        stats = a.stats()["ports"]["g2"]
        return stats["tx_frames"] + stats["queued"] + stats["dropped"].get(sw.QUEUE_FULL, 0)

    wait_for(lambda: accounted() == 300)  # each frame delivered, waiting, or dropped
    stats = a.stats()["ports"]["g2"]
    assert stats["queued"] <= sw.Limits().queue_frames
    assert stats["dropped"][sw.QUEUE_FULL] > 0
    small = ipv4(mac(3), mac(1), ip(1), ip(3))
    g1.send(small)
    assert g3.receive() == small
    kept = [int.from_bytes(frame[46:50], "big") for frame in g2.drain()]
    assert len(kept) == stats["tx_frames"] + stats["queued"]
    assert kept == sorted(set(kept))  # what was kept arrives once each, in order


def test_a_worker_that_connects_before_its_port_is_registered_is_plugged_in_when_it_is(switches):
    a = switches("a")
    g1 = a.add_port(mac(1), ip(1), "red", "g1")
    token = os.urandom(16)
    early = GuestPort(a.ports_path, token, mac(2), ip(2), "red", "g2")
    early.connect()  # the agent tells the worker and the switch at once: the worker may win the race
    time.sleep(0.3)
    a.request({"type": "port", "token": token, "mac": mac(2), "ip": ip(2), "network": "red", "guest": "g2"})
    a.wait_connected("g2")
    frame = ipv4(mac(2), mac(1), ip(1), ip(2))
    assert until_delivered(g1, frame, early) == frame
    assert BAD_TOKEN not in a.stats()["dropped"]


def test_a_restarted_worker_takes_over_its_port(switches):
    a = switches("a")
    g1 = a.add_port(mac(1), ip(1), "red", "g1")
    g2 = a.add_port(mac(2), ip(2), "red", "g2")
    g2.close()
    g2.connect()
    frame = ipv4(mac(2), mac(1), ip(1), ip(2))
    assert until_delivered(g1, frame, g2) == frame
    a.request({"type": "unport", "token": g2.token})
    assert g2.receive(5) == b""  # its connection is closed
    g1.send(frame)
    assert a.stats()["ports"].keys() == {"g1"}


def test_the_link_comes_back_after_a_peer_restarts(switches, tmp_path):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port_number = probe.getsockname()[1]
    probe.close()
    a = switches("a")
    b = switches("b", listen=f"tcp://127.0.0.1:{port_number}")
    mesh(a, b)
    g1 = a.add_port(mac(1), ip(1), "red", "g1")
    g2 = b.add_port(mac(2), ip(2), "red", "g2")
    until_delivered(g1, arp(mac(1), ip(1), ip(2)), g2)
    b.proc.send_signal(signal.SIGKILL)
    b.proc.wait(10)
    time.sleep(0.5)
    for _ in range(10):
        g1.send(arp(mac(1), ip(1), ip(2)))  # to a peer that is gone: dropped, counted
    wait_for(lambda: a.stats()["peers"]["b"]["dropped"].get(PEER_BUSY, 0) >= 1)
    b2 = switches("b2", listen=f"tcp://127.0.0.1:{port_number}", keys=b.keys)
    b2.name = "b"
    b2.set_peers(a)
    g2 = b2.add_port(mac(2), ip(2), "red", "g2")
    request = arp(mac(1), ip(1), ip(2))
    assert until_delivered(g1, request, g2) == request
    reply = arp(mac(2), ip(2), ip(1))
    assert until_delivered(g2, reply, g1) == reply
    assert a.proc.poll() is None


def test_the_switch_ends_with_its_agent(switches):
    a = switches("a")
    a.add_port(mac(1), ip(1), "red", "g1")
    a.proc.stdin.close()
    assert a.proc.wait(10) == 0
    assert not a.ports_path.exists()


def test_quit(switches):
    a = switches("a")
    a.proc.stdin.write(pack({"type": "quit"}))
    a.proc.stdin.flush()
    assert a.proc.wait(10) == 0


def test_a_flooding_guest_is_limited_and_the_others_keep_their_throughput(switches):
    a = switches("a")
    sender = a.add_port(mac(1), ip(1), "work", "sender")
    receiver = a.add_port(mac(2), ip(2), "work", "receiver")
    flooder = a.add_port(mac(3), ip(3), "flood", "flooder")
    sink = a.add_port(mac(4), ip(4), "flood", "sink")
    for port in (sender, receiver, flooder, sink):
        port.close()  # the load processes connect instead
    work = sized(ipv4(mac(2), mac(1), ip(1), ip(2), gso_type=1), 65_000)
    flood = sized(ipv4(mac(4), mac(3), ip(3), ip(4)), 64)
    seconds = 2.0

    def work_rate() -> float:
        counter = load_process("receive", a.ports_path, receiver.token, seconds + 5)
        time.sleep(0.2)
        load_result(load_process("send", a.ports_path, sender.token, seconds, work))
        got = load_result(counter)
        return got["frames"] / seconds

    alone = work_rate()
    sink_counter = load_process("receive", a.ports_path, sink.token, 3 * seconds + 8)
    flooding = load_process("send", a.ports_path, flooder.token, 3 * seconds + 1, flood)
    time.sleep(0.5)
    with_flood = work_rate()
    flood_sent = load_result(flooding)
    flood_got = load_result(sink_counter)
    span = flood_got["last"] - flood_got["first"]
    print(f"work alone {alone:,.0f} frames/s, with a flood {with_flood:,.0f} frames/s; the flooder got "
          f"{flood_got['frames'] / span:,.0f} frames/s through ({flood_sent['frames']:,} sent in all)")
    assert with_flood >= 0.8 * alone
    assert 0 < flood_got["frames"] <= a.stats()["ports"]["flooder"]["rx_frames"]
    limit = sw.Limits()
    assert flood_got["frames"] <= limit.port_frames_per_s * (span * 1.1 + limit.burst_s) + 64


@pytest.mark.parametrize("problem", ["address in use", "no keys", "no directory"])
def test_a_switch_that_cannot_start_says_why(switches, tmp_path, problem):
    a = switches("a")
    keys = tmp_path / "a" / "keys"
    ports = tmp_path / "b.sock"
    listen = "tcp://127.0.0.1:*"
    if problem == "address in use":
        listen = a.endpoint
    elif problem == "no keys":
        keys = tmp_path / "nowhere"
    else:
        ports = tmp_path / "nowhere" / "b.sock"
    result = subprocess.run([sys.executable, "-m", "conode.conet.switchd", "--ports", str(ports),
                             "--listen", listen, "--keys", str(keys)], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("conode-switchd: error: ")
    assert "Traceback" not in result.stderr
    assert {"address in use": "cannot listen on", "no keys": "is missing",
            "no directory": "cannot listen for guest ports"}[problem] in result.stderr
    assert not ports.exists()


def closed_port_endpoint() -> str:
    """A loopback endpoint nobody listens on: a peer there is unreachable."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    number = probe.getsockname()[1]
    probe.close()
    return f"tcp://127.0.0.1:{number}"


def test_peers_that_cannot_reach_each_other_talk_through_the_relay(switches, tmp_path):
    a, b, x = switches("a"), switches("b"), switches("x")
    keys = generate_key_pair(tmp_path / "coordinator", "coordinator")
    agents = {a.keys.public, b.keys.public, x.keys.public}
    relay = Relay("tcp://127.0.0.1:*", keys, agents.__contains__).start()
    try:
        relay.set_peers(a.keys.public, "a", [b.keys.public])
        relay.set_peers(b.keys.public, "b", [a.keys.public])
        relay.set_peers(x.keys.public, "x", [])  # an agent, but no peer of a or b
        nowhere = closed_port_endpoint()
        a.set_peers(b, relay=(relay.endpoint, keys.public), endpoints={"b": nowhere})
        b.set_peers(a, relay=(relay.endpoint, keys.public), endpoints={"a": nowhere})
        x.set_peers(a, relay=(relay.endpoint, keys.public), endpoints={"a": nowhere})
        g1 = a.add_port(mac(1), ip(1), "red", "g1")
        g2 = b.add_port(mac(2), ip(2), "red", "g2")
        g9 = x.add_port(mac(9), ip(9), "red", "g9")
        request, reply = arp(mac(1), ip(1), ip(2)), arp(mac(2), ip(2), ip(1))
        assert until_delivered(g1, request, g2, timeout=CONET_RELAY_AFTER_S + 10) == request
        assert until_delivered(g2, reply, g1, timeout=CONET_RELAY_AFTER_S + 10) == reply
        wait_for(lambda: x.stats()["peers"]["a"]["relayed"], timeout=CONET_RELAY_AFTER_S + 5)
        for _ in range(5):
            g9.send(arp(mac(9), ip(9), ip(1)))  # x is no peer of a's at the relay: not forwarded
        wait_for(lambda: relay.stats()["dropped"].get(NOT_PEERS, 0) >= 5)
        assert g1.drain(0.5) == []
        seen_a, seen_b = a.stats(), b.stats()
        assert seen_a["relay"]["connected"] and seen_a["peers"]["b"]["relayed"]
        assert seen_a["peers"]["b"]["relayed_tx_frames"] >= 1 and seen_a["peers"]["b"]["relayed_rx_frames"] >= 1
        assert seen_b["peers"]["a"]["relayed_tx_frames"] >= 1
        counted = relay.stats()
        assert counted["frames"]["a"] >= 1 and counted["frames"]["b"] >= 1, counted
        assert "x" not in counted["frames"]
    finally:
        relay.stop()

