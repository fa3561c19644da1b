"""The conet frame as the switch sees it: enough of the headers to switch and police, nothing more.

A conet frame is a 12-byte ``virtio_net_hdr_v1`` followed by one Ethernet frame. The switch reads the Ethernet
addresses and type, an ARP packet's sender, and an IPv4 packet's addresses; checksums, offload fields and
payloads are the receiving NIC's business. Parsing is total: any byte string gives a :class:`Frame` or a drop
reason, never an exception, and reads only a bounded prefix of the frame.

The MTU story: a plain frame (``gso_type`` NONE) carries at most ``CONET_MTU`` bytes after its Ethernet header;
a GSO frame carries up to 64 KiB and the receiving NIC segments it if its guest cannot take it whole. Guests may
not tag frames (802.1Q and friends): networks are the switch's, never the guest's, to choose.
"""

from __future__ import annotations

import struct
from functools import partial
from typing import NamedTuple

from conode.limits import CONET_MAX_FRAME, CONET_MTU, CONET_VNET_HDR

ETH_HEADER = 14
MIN_FRAME = CONET_VNET_HDR + ETH_HEADER
MAX_PLAIN_FRAME = CONET_VNET_HDR + ETH_HEADER + CONET_MTU

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
VLAN_TPIDS = frozenset({0x8100, 0x88A8, 0x9100, 0x9200})

BROADCAST = b"\xff" * 6
NO_ADDRESS = bytes(4)  # IPv4 0.0.0.0: a guest that has no address yet (DHCP-style discovery, ARP probes)

# virtio_net_hdr_v1.gso_type values (the ECN bit 0x80 may be set on top of the TCP ones)
GSO_NONE = 0
GSO_KINDS = frozenset({1, 3, 4, 5})  # TCPv4, UDP (UFO), TCPv6, UDP_L4
GSO_ECN = 0x80

# Drop reasons a frame's own bytes can earn.
SHORT = "short-frame"
OVERSIZED = "oversized-frame"
BAD_HEADER = "bad-vnet-header"
TAGGED = "vlan-tagged"
ETHERTYPE = "unsupported-ethertype"
BAD_ARP = "bad-arp"
BAD_IPV4 = "bad-ipv4"
GROUP_SOURCE = "multicast-source-mac"

_HEAD = struct.Struct("!xB8x2s6s6sH")  # gso_type, num_buffers, then the Ethernet header: dst, src, type
_IPV4 = struct.Struct("!B11x4s4s")  # version and header length, source, destination
_ARP = struct.Struct("!HHBBH6s4s6s4s")  # htype, ptype, hlen, plen, op, sha, spa, tha, tpa
_NO_BUFFERS = bytes(2)


class Frame(NamedTuple):
    """What the switch knows of a frame. MACs are 6 bytes, IPv4 addresses 4 bytes (network order)."""

    dst: bytes
    src: bytes
    ethertype: int
    sender_mac: bytes  # ARP sender hardware address; the Ethernet source for IPv4
    sender_ip: bytes  # ARP sender protocol address, or the IPv4 source
    target_ip: bytes  # ARP target protocol address, or the IPv4 destination


_frame = partial(tuple.__new__, Frame)  # builds a Frame from a tuple without a Python-level __new__


def is_group(mac: bytes) -> bool:
    """Broadcast or multicast: the I/G bit of the first octet."""
    return bool(mac[0] & 1)


def parse(frame: bytes | bytearray | memoryview) -> Frame | str:
    """The frame's switching facts, or the reason it must be dropped."""
    size = len(frame)
    if size < MIN_FRAME:
        return SHORT
    if size > CONET_MAX_FRAME:
        return OVERSIZED
    gso, buffers, dst, src, ethertype = _HEAD.unpack_from(frame)
    if buffers != _NO_BUFFERS:
        return BAD_HEADER
    if gso == GSO_NONE:
        if size > MAX_PLAIN_FRAME:
            return OVERSIZED
    elif gso & ~GSO_ECN not in GSO_KINDS:
        return BAD_HEADER
    if src[0] & 1:
        return GROUP_SOURCE
    if ethertype == ETHERTYPE_IPV4:
        if size < MIN_FRAME + 20:
            return BAD_IPV4
        version_ihl, ip_src, ip_dst = _IPV4.unpack_from(frame, MIN_FRAME)
        if version_ihl >> 4 != 4 or version_ihl & 15 < 5 or MIN_FRAME + (version_ihl & 15) * 4 > size:
            return BAD_IPV4
        return _frame((dst, src, ethertype, src, ip_src, ip_dst))
    if ethertype == ETHERTYPE_ARP:
        if size < MIN_FRAME + _ARP.size:
            return BAD_ARP
        htype, ptype, hlen, plen, _op, sha, spa, _tha, tpa = _ARP.unpack_from(frame, MIN_FRAME)
        if htype != 1 or ptype != ETHERTYPE_IPV4 or hlen != 6 or plen != 4:
            return BAD_ARP
        return _frame((dst, src, ethertype, sha, spa, tpa))
    if ethertype in VLAN_TPIDS:
        return TAGGED
    return ETHERTYPE


def vnet_header(gso_type: int = GSO_NONE, gso_size: int = 0) -> bytes:
    """A virtio_net_hdr_v1 with no checksum offload: for tests and tools that craft frames."""
    return struct.pack("<BBHHHHH", 0, gso_type, 0, gso_size, 0, 0, 0)


def announcement(mac: bytes, ip: str) -> bytes:
    """A gratuitous ARP from *mac* for *ip* (a conet frame): what a guest that moved to another agent says, on
    its behalf, so that the switches learn where its MAC is now (as QEMU announces a migrated guest)."""
    address = bytes(int(part) for part in ip.split("."))
    arp = _ARP.pack(1, ETHERTYPE_IPV4, 6, 4, 1, mac, address, bytes(6), address)
    return vnet_header() + BROADCAST + mac + struct.pack("!H", ETHERTYPE_ARP) + arp
