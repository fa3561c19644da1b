"""The switch's policy (conode/conet/switch.py): forwarding, learning, isolation, anti-spoofing, rate limits.

Pure: a fake clock, no sockets. The switch process around it is tested in tests/integration/test_conet_switchd.py.
"""

import logging
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conode.conet import frames
from conode.conet import switch as sw
from conode.conet.switch import Limits, Switch, SwitchError
from conode.testing.clock import FakeClock
from conode.testing.conet import arp, ethernet, ipv4, sized

KEY_P = "P" * 40
KEY_Q = "Q" * 40


def mac(n: int) -> bytes:
    return bytes([2, 0, 0, 0, 0, n])


def token(n: int) -> bytes:
    return bytes([n]) * 16


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def switch(clock):
    """Ports 1, 2 in network red, port 3 in blue; peers p and q."""
    s = Switch(clock=clock)
    s.add_port(token(1), "red", mac(1), "10.9.0.1", "g1")
    s.add_port(token(2), "red", mac(2), "10.9.0.2", "g2")
    s.add_port(token(3), "blue", mac(3), "10.9.0.3", "g3")
    s.set_peers([("p", "tcp://h1:1", KEY_P), ("q", "tcp://h2:1", KEY_Q)])
    return s


def port(s, n):
    return s.ports[token(n)]


def names(decision):
    ports, peers = decision
    return sorted(p.name for p in ports), sorted(p.name for p in peers)


def test_broadcast_goes_to_the_network_and_every_peer(switch):
    decision = switch.from_port(port(switch, 1), arp(mac(1), "10.9.0.1", "10.9.0.2"))
    assert names(decision) == (["g1", "g2"], ["p", "q"])  # the caller skips the sender itself


def test_peers_named_with_their_networks_get_only_those_networks_broadcasts_and_unknown_unicast(switch):
    switch.set_peers([("p", "tcp://h1:1", KEY_P), ("q", "tcp://h2:1", KEY_Q)], {KEY_P: ["red"], KEY_Q: ["blue"]})
    red = switch.from_port(port(switch, 1), arp(mac(1), "10.9.0.1", "10.9.0.2"))
    blue = switch.from_port(port(switch, 3), arp(mac(3), "10.9.0.3", "10.9.0.9"))
    unknown = switch.from_port(port(switch, 1), ipv4(mac(77), mac(1), "10.9.0.1", "10.9.0.77"))
    assert names(red) == (["g1", "g2"], ["p"]) and names(blue) == (["g3"], ["q"])
    assert names(unknown) == ([], ["p"])
    switch.set_peers([("p", "tcp://h1:1", KEY_P), ("q", "tcp://h2:1", KEY_Q)])  # not named: on every network
    assert names(switch.from_port(port(switch, 3), arp(mac(3), "10.9.0.3", "10.9.0.9"))) == (["g3"], ["p", "q"])


def test_unicast_goes_to_the_local_port_only(switch):
    assert names(switch.from_port(port(switch, 1), ipv4(mac(2), mac(1), "10.9.0.1", "10.9.0.2"))) == (["g2"], [])


def test_a_local_mac_of_another_network_is_unknown_there(switch):
    decision = switch.from_port(port(switch, 1), ipv4(mac(3), mac(1), "10.9.0.1", "10.9.0.3"))
    assert names(decision) == ([], ["p", "q"])  # peers deliver it only into red, where mac 3 is not


def test_unknown_unicast_goes_to_peers_until_learned(switch, clock):
    far = mac(40)
    frame = ipv4(far, mac(1), "10.9.0.1", "10.9.0.40")
    assert names(switch.from_port(port(switch, 1), frame)) == ([], ["p", "q"])
    reply = ipv4(mac(1), far, "10.9.0.40", "10.9.0.1")
    assert names(switch.from_peer(KEY_Q, b"red", reply)) == (["g1"], [])
    assert names(switch.from_port(port(switch, 1), frame)) == ([], ["q"])
    clock.advance(switch.limits.mac_age_s + 1)
    assert names(switch.from_port(port(switch, 1), frame)) == ([], ["p", "q"])  # forgotten


def test_learning_is_per_network(switch):
    far = mac(40)
    switch.from_peer(KEY_Q, b"red", ipv4(mac(1), far, "10.9.0.40", "10.9.0.1"))
    assert names(switch.from_port(port(switch, 3), ipv4(far, mac(3), "10.9.0.3", "10.9.0.40"))) == ([], ["p", "q"])


def test_frames_from_peers_stay_in_their_network_and_are_never_relayed(switch):
    assert names(switch.from_peer(KEY_P, b"blue", arp(mac(40), "10.9.0.40", "10.9.0.3"))) == (["g3"], [])
    assert names(switch.from_peer(KEY_P, b"red", arp(mac(40), "10.9.0.40", "10.9.0.3"))) == (["g1", "g2"], [])
    assert switch.from_peer(KEY_P, b"red", ipv4(mac(3), mac(40), "10.9.0.40", "10.9.0.3")) == sw.NOT_HERE
    assert switch.from_peer(KEY_P, b"red", ipv4(mac(41), mac(40), "10.9.0.40", "10.9.0.41")) == sw.NOT_HERE
    assert switch.from_peer(KEY_P, b"green", arp(mac(40), "10.9.0.40", "10.9.0.3")) == sw.NETWORK_ABSENT


def test_peers_may_not_use_our_ports_macs(switch):
    assert switch.from_peer(KEY_P, b"red", arp(mac(2), "10.9.0.2", "10.9.0.1")) == sw.SPOOFED_MAC
    assert switch.from_peer(KEY_P, b"red", arp(mac(3), "10.9.0.3", "10.9.0.1")) == sw.SPOOFED_MAC  # any network


def test_unknown_peers_are_dropped_and_counted(switch):
    assert switch.from_peer("Z" * 40, b"red", arp(mac(40), "10.9.0.40", "10.9.0.1")) == sw.UNKNOWN_PEER
    assert switch.stats()["dropped"] == {sw.UNKNOWN_PEER: 1}


@pytest.mark.parametrize("frame, reason", [
    (arp(mac(2), "10.9.0.2", "10.9.0.1"), sw.SPOOFED_MAC),
    (ipv4(mac(2), mac(9), "10.9.0.1", "10.9.0.2"), sw.SPOOFED_MAC),
    (ipv4(mac(2), mac(1), "10.9.0.2", "10.9.0.2"), sw.SPOOFED_IP),
    (ipv4(mac(2), mac(1), "10.9.0.99", "10.9.0.2"), sw.SPOOFED_IP),
    (arp(mac(1), "10.9.0.2", "10.9.0.1"), sw.SPOOFED_ARP),
    (arp(mac(1), "10.9.0.1", "10.9.0.2", sender_mac=mac(2)), sw.SPOOFED_ARP),
    (ethernet(mac(2), mac(1), 0x8100, bytes(46)), frames.TAGGED),
    (b"\x00" * 20, frames.SHORT),
])
def test_spoofed_and_malformed_frames_are_dropped_and_counted(switch, frame, reason):
    assert switch.from_port(port(switch, 1), frame) == reason
    stats = switch.stats()
    assert stats["dropped"] == {reason: 1}
    assert stats["ports"]["g1"]["dropped"] == {reason: 1}
    assert stats["ports"]["g1"]["rx_frames"] == 0


def test_a_guest_without_an_address_may_ask_for_one(switch):
    assert names(switch.from_port(port(switch, 1), ipv4(frames.BROADCAST, mac(1), "0.0.0.0", "255.255.255.255")))
    assert names(switch.from_port(port(switch, 1), arp(mac(1), "0.0.0.0", "10.9.0.1")))  # an ARP probe


def test_a_frame_to_its_own_sender_is_dropped(switch):
    assert switch.from_port(port(switch, 1), ipv4(mac(1), mac(1), "10.9.0.1", "10.9.0.1")) == sw.HAIRPIN


def test_drops_are_logged_once_per_reason_per_party(switch, caplog):
    with caplog.at_level(logging.WARNING, logger="conode.conet"):
        for _ in range(5):
            switch.from_port(port(switch, 1), arp(mac(2), "10.9.0.2", "10.9.0.1"))
            switch.from_port(port(switch, 2), arp(mac(1), "10.9.0.1", "10.9.0.2"))
            switch.from_port(port(switch, 2), b"short")
    assert len(caplog.records) == 3
    assert switch.stats()["dropped"] == {sw.SPOOFED_MAC: 10, frames.SHORT: 5}


def test_rate_limit_in_frames_and_bytes(clock):
    limits = Limits(port_frames_per_s=100, port_bytes_per_s=2 << 20, burst_s=0.1)
    s = Switch(limits, clock)
    p = s.add_port(token(1), "red", mac(1), "10.9.0.1", "g1")
    s.add_port(token(2), "red", mac(2), "10.9.0.2", "g2")
    small = ipv4(mac(2), mac(1), "10.9.0.1", "10.9.0.2")
    passed = sum(s.from_port(p, small) != sw.RATE_LIMITED for _ in range(50))
    assert passed == 10  # 100 frames/s x 0.1 s of burst
    assert p.bucket.empty() and p.bucket.ready_at() == pytest.approx(clock() + 0.01)
    clock.advance(0.051)  # 5.1 frames' worth
    assert sum(s.from_port(p, small) != sw.RATE_LIMITED for _ in range(50)) == 5
    big = sized(ipv4(mac(2), mac(1), "10.9.0.1", "10.9.0.2", gso_type=1), 60_000)
    clock.advance(1)  # full again: 10 frames, and 209,715 bytes (2 MiB/s x 0.1 s): 4 big ones, the last on credit
    assert sum(s.from_port(p, big) != sw.RATE_LIMITED for _ in range(10)) == 4
    assert s.stats()["ports"]["g1"]["dropped"][sw.RATE_LIMITED] == 40 + 45 + 6
    assert p.bucket.ready_at() == pytest.approx(clock() + (4 * 60_000 - 209_715 + 1) / (2 << 20))


def test_a_frame_larger_than_the_burst_passes_on_credit(clock):
    s = Switch(Limits(port_bytes_per_s=1000, burst_s=0.001), clock)
    p = s.add_port(token(1), "red", mac(1), "10.9.0.1", "g1")
    big = sized(ipv4(frames.BROADCAST, mac(1), "10.9.0.1", "10.9.0.2", gso_type=1), 65_000)
    assert s.from_port(p, big) != sw.RATE_LIMITED


def test_peer_rate_limit(clock):
    s = Switch(Limits(peer_frames_per_s=10, burst_s=1.0), clock)
    s.add_port(token(1), "red", mac(1), "10.9.0.1", "g1")
    s.set_peers([("p", "tcp://h1:1", KEY_P)])
    frame = arp(mac(40), "10.9.0.40", "10.9.0.1")
    assert sum(s.from_peer(KEY_P, b"red", frame) != sw.RATE_LIMITED for _ in range(30)) == 10


def test_learned_table_is_bounded_and_keeps_the_newest(clock):
    s = Switch(Limits(mac_table=8), clock)
    s.add_port(token(1), "red", mac(1), "10.9.0.1", "g1")
    s.set_peers([("p", "tcp://h1:1", KEY_P)])
    for n in range(100):
        s.from_peer(KEY_P, b"red", arp(bytes([2, 1, 0, 0, 0, n]), "10.9.0.40", "10.9.0.1"))
        assert len(s.networks[b"red"].learned) <= 8
    assert set(s.networks[b"red"].learned) == {bytes([2, 1, 0, 0, 0, n]) for n in range(92, 100)}


def test_age_forgets_idle_macs(switch, clock):
    switch.from_peer(KEY_P, b"red", arp(mac(40), "10.9.0.40", "10.9.0.1"))
    clock.advance(switch.limits.mac_age_s / 2)
    switch.from_peer(KEY_P, b"red", arp(mac(41), "10.9.0.41", "10.9.0.1"))
    clock.advance(switch.limits.mac_age_s / 2 + 1)
    switch.age()
    assert set(switch.networks[b"red"].learned) == {mac(41)}


def test_peers_that_leave_or_move_are_forgotten(switch):
    switch.from_peer(KEY_P, b"red", arp(mac(40), "10.9.0.40", "10.9.0.1"))
    added, removed = switch.set_peers([("p", "tcp://h1:2", KEY_P), ("q", "tcp://h2:1", KEY_Q)])
    assert [p.name for p in added] == ["p"] and [p.name for p in removed] == ["p"]
    assert switch.networks[b"red"].learned == {}
    added, removed = switch.set_peers([("q", "tcp://h2:1", KEY_Q)])
    assert added == [] and [p.name for p in removed] == ["p"]
    assert names(switch.from_port(port(switch, 1), arp(mac(1), "10.9.0.1", "10.9.0.2"))) == (["g1", "g2"], ["q"])
    assert switch.from_peer(KEY_P, b"red", arp(mac(40), "10.9.0.40", "10.9.0.1")) == sw.UNKNOWN_PEER


def test_ports_come_and_go(switch):
    removed = switch.remove_port(token(2))
    assert removed is not None and removed.name == "g2"
    assert names(switch.from_port(port(switch, 1), arp(mac(1), "10.9.0.1", "10.9.0.2"))) == (["g1"], ["p", "q"])
    switch.remove_port(token(3))
    assert b"blue" not in switch.networks
    assert switch.remove_port(token(3)) is None


def test_a_guest_that_moves_here_is_no_longer_learned_at_a_peer(switch):
    switch.from_peer(KEY_P, b"red", arp(mac(40), "10.9.0.40", "10.9.0.1"))
    switch.add_port(token(40), "red", mac(40), "10.9.0.40", "g40")
    assert mac(40) not in switch.networks[b"red"].learned
    assert names(switch.from_port(port(switch, 1), ipv4(mac(40), mac(1), "10.9.0.1", "10.9.0.40"))) == (["g40"], [])


@pytest.mark.parametrize("args, message", [
    ((token(9), "red", mac(2), "10.9.0.9", "g9"), "already belongs to guest g2"),
    ((token(9), "red", bytes.fromhex("030000000009"), "10.9.0.9", "g9"), "not a unicast MAC"),
    ((token(9), "red", mac(9), "10.9.0.999", "g9"), "not a dotted IPv4"),
    ((b"short", "red", mac(9), "10.9.0.9", "g9"), "16 bytes"),
    ((token(9), "", mac(9), "10.9.0.9", "g9"), "network name"),
])
def test_bad_port_requests_are_refused_with_a_reason(switch, args, message):
    with pytest.raises(SwitchError, match=message):
        switch.add_port(*args)


def test_a_refused_replacement_keeps_the_port_it_would_replace(switch):
    with pytest.raises(SwitchError, match="already belongs to guest g2"):
        switch.add_port(token(1), "red", mac(2), "10.9.0.1", "g1")
    assert port(switch, 1).mac == mac(1)
    assert names(switch.from_port(port(switch, 2), ipv4(mac(1), mac(2), "10.9.0.2", "10.9.0.1"))) == (["g1"], [])


def test_port_and_peer_counts_are_bounded(clock):
    s = Switch(Limits(max_ports=2, max_peers=1), clock)
    s.add_port(token(1), "red", mac(1), "10.9.0.1", "g1")
    s.add_port(token(2), "red", mac(2), "10.9.0.2", "g2")
    with pytest.raises(SwitchError, match="already serves 2 ports"):
        s.add_port(token(3), "red", mac(3), "10.9.0.3", "g3")
    s.add_port(token(2), "red", mac(2), "10.9.0.20", "g2")  # replacing one is no new port
    with pytest.raises(SwitchError, match="exceed"):
        s.set_peers([("p", "tcp://h1:1", KEY_P), ("q", "tcp://h2:1", KEY_Q)])


def test_port_queue_is_bounded(switch):
    p = port(switch, 1)
    frame = bytes(1000)
    kept = sum(p.enqueue(frame) for _ in range(switch.limits.queue_frames + 10))
    assert kept == min(switch.limits.queue_frames, switch.limits.queue_bytes // 1000)
    assert p.queued_bytes == kept * 1000


# --- properties -----------------------------------------------------------------------------------------------
NETWORKS = ["red", "blue", "green"]
PORTS = [(n, NETWORKS[n % 3], mac(n), f"10.9.0.{n}") for n in range(1, 7)]
MACS = [m for _, _, m, _ in PORTS] + [mac(40), mac(41), frames.BROADCAST, bytes.fromhex("01005e000001")]
IPS = [ip for *_, ip in PORTS] + ["10.9.0.40", "0.0.0.0", "192.168.1.1"]

@st.composite
def events(draw):
    """(source, port index, network, frame): each field honest 3 times in 4, so both verdicts are common."""
    source = draw(st.sampled_from(["port", "peer"]))
    index = draw(st.integers(0, len(PORTS) - 1))
    _, network, own_mac, own_ip = PORTS[index]
    if source == "peer":
        own_mac, own_ip = mac(40), "10.9.0.40"
        network = draw(st.sampled_from([network, network, "absent"]))
    def lie() -> bool:
        return draw(st.integers(0, 3)) == 0

    src = draw(st.sampled_from(MACS)) if lie() else own_mac
    sender_ip = draw(st.sampled_from(IPS)) if lie() else own_ip
    sender_mac = draw(st.sampled_from(MACS)) if lie() else src
    dst = draw(st.sampled_from(MACS))
    target_ip = draw(st.sampled_from(IPS))
    kind = draw(st.sampled_from(["arp", "arp", "ipv4", "ipv4", "other", "bytes"]))
    if kind == "arp":
        frame = arp(src, sender_ip, target_ip, sender_mac=sender_mac, dst=dst)
    elif kind == "ipv4":
        frame = ipv4(dst, src, sender_ip, target_ip, draw(st.binary(max_size=40)))
    elif kind == "other":
        frame = ethernet(dst, src, draw(st.integers(0, 0xFFFF)), draw(st.binary(max_size=60)))
    else:
        frame = draw(st.binary(max_size=120))
    return source, index, network, frame


@settings(max_examples=300, deadline=None)
@given(st.lists(events(), max_size=40), st.integers(1, 6))
def test_no_frame_crosses_networks_and_no_spoof_passes(events, table):
    clock = FakeClock()
    s = Switch(Limits(mac_table=table), clock)
    for n, network, m, ip in PORTS:
        s.add_port(token(n), network, m, ip, f"g{n}")
    s.set_peers([("p", "tcp://h1:1", KEY_P), ("q", "tcp://h2:1", KEY_Q)])
    local_macs = {m for _, _, m, _ in PORTS}
    for source, index, network, frame in events:
        clock.advance(0.01)
        if source == "port":
            sender = port(s, PORTS[index][0])
            verdict = s.from_port(sender, frame)
            if isinstance(verdict, str):
                continue
            facts = frames.parse(frame)
            assert facts.src == sender.mac and facts.sender_mac == sender.mac
            assert facts.sender_ip in (sender.ip, frames.NO_ADDRESS)
            assert all(dest.network is sender.network for dest in verdict[0])
        else:
            verdict = s.from_peer(KEY_P, network.encode(), frame)
            if isinstance(verdict, str):
                continue
            assert frames.parse(frame).src not in local_macs
            assert verdict[1] == ()  # never relayed to another peer
            assert all(dest.network.name == network.encode() for dest in verdict[0])
        for net in s.networks.values():
            assert len(net.learned) <= table


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=40))
def test_random_input_never_raises(frame, network):
    s = Switch(clock=FakeClock())
    p = s.add_port(os.urandom(16), "red", mac(1), "10.9.0.1", "g1")
    s.set_peers([("p", "tcp://h1:1", KEY_P)])
    assert isinstance(s.from_port(p, frame), (str, tuple))
    assert isinstance(s.from_peer(KEY_P, network, frame), (str, tuple))
    assert isinstance(s.from_peer(KEY_P, b"red", frame), (str, tuple))



def test_storm_control_bounds_the_copies_of_flooded_frames(clock):
    limits = Limits()
    s = Switch(limits, clock)
    p = s.add_port(token(1), "red", mac(1), "10.9.0.1", "g1")
    s.add_port(token(2), "red", mac(2), "10.9.0.2", "g2")
    s.set_peers([(f"a{n}", f"tcp://h{n}:1", f"{n:040d}") for n in range(100)])  # 101 copies of a broadcast
    broadcast = arp(mac(1), "10.9.0.1", "10.9.0.2")
    unicast = ipv4(mac(2), mac(1), "10.9.0.1", "10.9.0.2")
    flooded = forwarded = 0
    for _ in range(100):  # one second, in 10 ms steps
        clock.advance(0.01)
        flooded += sum(s.from_port(p, broadcast) != sw.FLOOD_LIMITED for _ in range(5))
        forwarded += sum(s.from_port(p, unicast) != sw.FLOOD_LIMITED for _ in range(5))
    copies = limits.flood_copies_per_s * (1 + limits.burst_s)
    assert copies / 101 - 2 <= flooded <= copies / 101 + 2
    assert forwarded == 500  # unicast to a known port is no flood
