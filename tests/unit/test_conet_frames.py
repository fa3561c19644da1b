"""conet frame parsing (conode/conet/frames.py): what the switch reads of a frame, and every way to be refused."""

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from conode.conet import frames
from conode.conet.frames import Frame, parse, vnet_header
from conode.limits import CONET_MAX_FRAME, CONET_MTU
from conode.testing.conet import arp, ethernet, ip4, ipv4, sized

A = bytes.fromhex("020000000001")
B = bytes.fromhex("020000000002")


def test_arp_request_gives_its_sender_and_target():
    facts = parse(arp(A, "10.9.0.1", "10.9.0.2"))
    assert facts == Frame(frames.BROADCAST, A, frames.ETHERTYPE_ARP, A, ip4("10.9.0.1"), ip4("10.9.0.2"))


def test_ipv4_gives_its_addresses():
    facts = parse(ipv4(B, A, "10.9.0.1", "10.9.0.2", b"hello"))
    assert facts == Frame(B, A, frames.ETHERTYPE_IPV4, A, ip4("10.9.0.1"), ip4("10.9.0.2"))


def test_parsing_a_memoryview_gives_the_same_facts():
    frame = ipv4(B, A, "10.9.0.1", "10.9.0.2", b"x" * 100)
    assert parse(memoryview(bytearray(frame))) == parse(frame)


def test_sizes_plain_frames_stop_at_the_mtu_gso_frames_at_64_kib():
    plain = ipv4(B, A, "10.9.0.1", "10.9.0.2")
    assert isinstance(parse(sized(plain, frames.MAX_PLAIN_FRAME)), Frame)
    assert parse(sized(plain, frames.MAX_PLAIN_FRAME + 1)) == frames.OVERSIZED
    gso = ipv4(B, A, "10.9.0.1", "10.9.0.2", gso_type=1)
    assert isinstance(parse(sized(gso, CONET_MAX_FRAME)), Frame)
    assert parse(sized(gso, CONET_MAX_FRAME + 1)) == frames.OVERSIZED
    assert frames.MAX_PLAIN_FRAME == 12 + 14 + CONET_MTU
    assert parse(plain[:frames.MIN_FRAME - 1]) == frames.SHORT
    assert parse(b"") == frames.SHORT


def test_tagged_frames_are_refused():
    payload = struct.pack("!HH", 5, frames.ETHERTYPE_IPV4) + ipv4(B, A, "10.9.0.1", "10.9.0.2")[26:]
    assert parse(ethernet(B, A, 0x8100, payload)) == frames.TAGGED
    assert parse(ethernet(B, A, 0x88A8, payload)) == frames.TAGGED


def test_other_protocols_and_bad_headers_are_refused():
    assert parse(ethernet(B, A, 0x86DD, bytes(40))) == frames.ETHERTYPE  # IPv6: guests are IPv4-only
    assert parse(ethernet(B, A, 0x0050, bytes(40))) == frames.ETHERTYPE  # an 802.3 length field
    assert parse(ethernet(B, bytes.fromhex("030000000001"), 0x0800, bytes(40))) == frames.GROUP_SOURCE
    assert parse(ethernet(B, A, frames.ETHERTYPE_IPV4, bytes(19))) == frames.BAD_IPV4
    assert parse(ethernet(B, A, frames.ETHERTYPE_IPV4, b"\x65" + bytes(39))) == frames.BAD_IPV4  # version 6
    assert parse(ethernet(B, A, frames.ETHERTYPE_IPV4, b"\x4f" + bytes(39))) == frames.BAD_IPV4  # IHL past the end
    assert parse(ethernet(B, A, frames.ETHERTYPE_ARP, bytes(27))) == frames.BAD_ARP
    assert parse(ethernet(B, A, frames.ETHERTYPE_ARP, bytes(28))) == frames.BAD_ARP  # hardware type 0
    frame = ipv4(B, A, "10.9.0.1", "10.9.0.2")
    assert parse(vnet_header(gso_type=2) + frame[12:]) == frames.BAD_HEADER  # no such GSO type
    assert parse(frame[:10] + b"\x01\x00" + frame[12:]) == frames.BAD_HEADER  # num_buffers is 0 on the wire
    assert isinstance(parse(vnet_header(gso_type=0x81) + frame[12:]), Frame)  # TCPv4 with ECN


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_any_bytes_give_facts_or_a_reason(data):
    assert isinstance(parse(data), (Frame, str))


@settings(max_examples=300)
@given(st.binary(min_size=14, max_size=80), st.sampled_from([0x0800, 0x0806, 0x8100, 0x86DD]))
def test_frames_with_known_types_and_random_bodies_never_raise(body, ethertype):
    facts = parse(ethernet(B, A, ethertype, body))
    assert isinstance(facts, (Frame, str))
    if isinstance(facts, Frame):
        assert len(facts.sender_mac) == 6 and len(facts.sender_ip) == 4 and len(facts.target_ip) == 4


def test_a_moved_guests_announcement_is_a_gratuitous_arp_from_its_own_addresses():
    mac = bytes.fromhex("02c0de000007")
    frame = frames.parse(frames.announcement(mac, "10.213.0.7"))
    assert not isinstance(frame, str)
    assert frame.dst == frames.BROADCAST and frame.src == mac and frame.ethertype == frames.ETHERTYPE_ARP
    assert frame.sender_mac == mac and frame.sender_ip == bytes([10, 213, 0, 7])
