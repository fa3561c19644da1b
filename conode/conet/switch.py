"""The switch's policy: where a frame goes, or why it is dropped. Pure: no I/O, time from an injected clock.

A switch serves the *ports* of its agent's guests and exchanges frames with *peers*, the switches of the other
agents (a full mesh, so a frame from a peer is never forwarded to another peer). Each port belongs to one
network; a frame never leaves its network:

- A port's MAC and IPv4 address are given by the agent, so local MACs are always known; the switch learns only
  which peer each remote MAC sits behind (per network, bounded, forgotten after CONET_MAC_AGE_S idle).
- From a port: broadcast and multicast go to the network's other ports and to every peer on that network;
  unicast to a local MAC goes to that port, to a learned MAC to that peer, and to an unknown MAC to every peer
  on that network. A peer's networks are those the agent names for it (its guests' networks that ours share);
  a peer named without them counts as on every network.
- From a peer: the frame goes only to the named network's ports (a group frame to all of them, a unicast frame
  to its port); a unicast frame for no local port is dropped, never flooded.
- A port may send only from its own MAC, and from its own IPv4 address or 0.0.0.0 (ARP sender likewise). A peer
  may not send from a MAC of one of this switch's ports.
- Token buckets (bytes and frames) bound what each port and each peer may send, and (storm control) how many
  copies of a port's flooded frames the switch makes.

Every drop is counted by reason, overall and per party, and logged once per reason per party.

Decisions are ``(ports, peers)`` tuples of destinations, made of tuples the switch keeps ready, so a forwarded
frame costs no allocation here; the caller skips the sending port itself when it is among the destinations.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from conode.conet import frames
from conode.conet.frames import NO_ADDRESS
from conode.limits import (
    CONET_BURST_S,
    CONET_MAC_AGE_S,
    CONET_MAC_TABLE,
    CONET_MAX_PEERS,
    CONET_MAX_PORTS,
    CONET_PEER_BYTES_PER_S,
    CONET_PEER_FRAMES_PER_S,
    CONET_PORT_BYTES_PER_S,
    CONET_PORT_FLOOD_BYTES_PER_S,
    CONET_PORT_FLOOD_COPIES_PER_S,
    CONET_PORT_FRAMES_PER_S,
    CONET_PORT_QUEUE_BYTES,
    CONET_PORT_QUEUE_FRAMES,
)

log = logging.getLogger("conode.conet")

# Drop reasons decided here (frames.py has those of a frame's own bytes; switchd those of I/O).
SPOOFED_MAC = "spoofed-mac"
SPOOFED_IP = "spoofed-ip"
SPOOFED_ARP = "spoofed-arp"
RATE_LIMITED = "rate-limited"
FLOOD_LIMITED = "flood-limited"
HAIRPIN = "to-own-port"
NOT_HERE = "no-such-local-port"
NETWORK_ABSENT = "network-not-here"
UNKNOWN_PEER = "unknown-peer"
QUEUE_FULL = "port-queue-full"


class SwitchError(Exception):
    """A control request the switch cannot honour; its message says why (the agent logs it)."""


@dataclass(frozen=True)
class Limits:
    """The switch's bounds; the defaults are the pool's (conode/limits.py), tests may shrink them."""

    port_bytes_per_s: float = CONET_PORT_BYTES_PER_S
    port_frames_per_s: float = CONET_PORT_FRAMES_PER_S
    flood_copies_per_s: float = CONET_PORT_FLOOD_COPIES_PER_S
    flood_bytes_per_s: float = CONET_PORT_FLOOD_BYTES_PER_S
    peer_bytes_per_s: float = CONET_PEER_BYTES_PER_S
    peer_frames_per_s: float = CONET_PEER_FRAMES_PER_S
    burst_s: float = CONET_BURST_S
    mac_table: int = CONET_MAC_TABLE
    mac_age_s: float = CONET_MAC_AGE_S
    max_ports: int = CONET_MAX_PORTS
    max_peers: int = CONET_MAX_PEERS
    queue_frames: int = CONET_PORT_QUEUE_FRAMES
    queue_bytes: int = CONET_PORT_QUEUE_BYTES


class Bucket:
    """Two token buckets at once, in bytes and in frames.

    A frame passes while there is a frame token and any byte credit left; it may take either count below zero
    (a large frame, or many copies of one), a debt the rate repays before the next frame. So a frame larger
    than the burst still passes, and on average no more than the rate does.
    """

    __slots__ = ("at", "bytes", "bytes_cap", "bytes_rate", "frames", "frames_cap", "frames_rate")

    def __init__(self, bytes_per_s: float, frames_per_s: float, burst_s: float, now: float) -> None:
        self.bytes_rate, self.frames_rate = bytes_per_s, frames_per_s
        self.bytes_cap = bytes_per_s * burst_s
        self.frames_cap = max(frames_per_s * burst_s, 1.0)
        self.bytes, self.frames, self.at = self.bytes_cap, self.frames_cap, now

    def take(self, size: int, now: float, count: int = 1) -> bool:
        """Take *count* frames of *size* bytes in all, if the bucket allows; False (nothing taken) if not."""
        if self.bytes <= 0 or self.frames < 1.0:
            self._refill(now)
            if self.bytes <= 0 or self.frames < 1.0:
                return False
        self.bytes -= size
        self.frames -= count
        return True

    def empty(self) -> bool:
        """Whether the next frame must wait (as of the last refill)."""
        return self.bytes <= 0 or self.frames < 1.0

    def _refill(self, now: float) -> None:
        elapsed = now - self.at
        if elapsed > 0:
            self.bytes = min(self.bytes_cap, self.bytes + elapsed * self.bytes_rate)
            self.frames = min(self.frames_cap, self.frames + elapsed * self.frames_rate)
            self.at = now

    def ready_at(self) -> float:
        """When the next frame will pass, if nothing else is taken meanwhile."""
        wait_bytes = (1.0 - self.bytes) / self.bytes_rate if self.bytes <= 0 else 0.0
        wait_frames = (1.0 - self.frames) / self.frames_rate if self.frames < 1.0 else 0.0
        return self.at + max(wait_bytes, wait_frames)


class Party:
    """A port or a peer: what it sent and received, and what of its was dropped."""

    __slots__ = ("bucket", "dropped", "link", "name", "rx_bytes", "rx_frames", "tx_bytes", "tx_frames")

    def __init__(self, name: str, bucket: Bucket) -> None:
        self.name = name
        self.bucket = bucket
        self.rx_frames = self.rx_bytes = self.tx_frames = self.tx_bytes = 0  # rx: from it; tx: to it
        self.dropped: dict[str, int] = {}
        self.link: Any = None  # the caller's I/O handle (a socket); the policy never touches it

    def stats(self) -> dict[str, Any]:
        return {"rx_frames": self.rx_frames, "rx_bytes": self.rx_bytes, "tx_frames": self.tx_frames,
                "tx_bytes": self.tx_bytes, "dropped": dict(self.dropped)}


class Port(Party):
    """One guest's NIC on this switch."""

    __slots__ = (
        "flood",
        "ip",
        "mac",
        "network",
        "only",
        "queue",
        "queue_bytes",
        "queue_frames",
        "queued_bytes",
        "token",
    )

    def __init__(self, token: bytes, network: Network, mac: bytes, ip: bytes, guest: str, bucket: Bucket,
                 limits: Limits) -> None:
        super().__init__(guest, bucket)
        self.token, self.network, self.mac, self.ip = token, network, mac, ip
        self.only: Decision = ((self,), ())
        self.queue: deque[bytes] = deque()  # frames for this port that its socket could not take yet
        self.queued_bytes = 0
        self.queue_frames, self.queue_bytes = limits.queue_frames, limits.queue_bytes
        self.flood = Bucket(limits.flood_bytes_per_s, limits.flood_copies_per_s, limits.burst_s, bucket.at)

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "connected": self.link is not None, "queued": len(self.queue)}

    def enqueue(self, frame: bytes) -> bool:
        """Keep a frame for later; False (and nothing kept) if the queue is full."""
        if len(self.queue) >= self.queue_frames or self.queued_bytes + len(frame) > self.queue_bytes:
            return False
        self.queue.append(frame)
        self.queued_bytes += len(frame)
        return True

    def dequeue(self) -> bytes:
        frame = self.queue.popleft()
        self.queued_bytes -= len(frame)
        return frame

    def requeue(self, frame: bytes) -> None:
        """Put back at the head a frame the socket refused: order is kept, the bound may be passed by one."""
        self.queue.appendleft(frame)
        self.queued_bytes += len(frame)


class Peer(Party):
    """Another agent's switch, known by its CURVE public key.

    Its frames go straight to it, or (``relayed``: the caller found it unreachable) by the coordinator's relay;
    the relayed counts are part of the totals."""

    __slots__ = ("down_since", "endpoint", "key", "networks", "only", "relayed", "relayed_rx_frames",
                 "relayed_tx_frames")

    def __init__(self, agent: str, endpoint: str, key: str, bucket: Bucket) -> None:
        super().__init__(agent, bucket)
        self.key, self.endpoint = key, endpoint
        self.networks: frozenset[bytes] | None = None  # the networks it shares with us (None: all)
        self.only: Decision = ((), (self,))
        self.relayed = False
        self.down_since: float | None = bucket.at  # since when its direct link is down (it starts down)
        self.relayed_rx_frames = self.relayed_tx_frames = 0

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "relayed": self.relayed, "relayed_rx_frames": self.relayed_rx_frames,
                "relayed_tx_frames": self.relayed_tx_frames}


Decision = tuple[tuple[Port, ...], tuple[Peer, ...]]
Verdict = Decision | str


class Network:
    """One network on this switch: its local ports by MAC, and the MACs learned behind peers."""

    __slots__ = ("group_from_peer", "group_from_port", "learned", "local", "name", "to_peers")

    def __init__(self, name: bytes) -> None:
        self.name = name  # UTF-8, as it travels between peers
        self.local: dict[bytes, Port] = {}
        self.learned: dict[bytes, tuple[Peer, float]] = {}  # oldest first: refreshed entries move to the end
        self.group_from_port: Decision = ((), ())
        self.group_from_peer: Decision = ((), ())
        self.to_peers: Decision = ((), ())  # the peers on this network: where an unknown unicast frame goes


def parse_ipv4(text: str) -> bytes:
    try:
        return ipaddress.IPv4Address(text).packed
    except (ipaddress.AddressValueError, ValueError):
        raise SwitchError(f"{text!r} is not a dotted IPv4 address") from None


class Switch:
    """The policy of one agent's switch."""

    def __init__(self, limits: Limits | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits or Limits()
        self._clock = clock
        self.ports: dict[bytes, Port] = {}  # by token
        self.peers: dict[str, Peer] = {}  # by public key
        self.networks: dict[bytes, Network] = {}
        self._local_macs: dict[bytes, Port] = {}  # every port's MAC, all networks
        self._all_peers: tuple[Peer, ...] = ()
        self.dropped: dict[str, int] = {}

    # --- membership ---------------------------------------------------------------------------------------
    def add_port(self, token: bytes, network: str, mac: bytes, ip: str, guest: str) -> Port:
        """Register a guest's port; a port with the same token is replaced (its guest got a new identity)."""
        if len(token) != 16:
            raise SwitchError("a port token must be 16 bytes")
        if len(mac) != 6 or frames.is_group(mac) or mac == bytes(6):
            raise SwitchError(f"{mac.hex(':')} is not a unicast MAC address")
        address = parse_ipv4(ip)
        if not network or len(network.encode()) > 255:
            raise SwitchError("a network name must be 1 to 255 bytes of UTF-8")
        old = self.ports.get(token)
        owner = self._local_macs.get(mac)
        if owner is not None and owner is not old:
            raise SwitchError(f"MAC {mac.hex(':')} already belongs to guest {owner.name}")
        if old is None and len(self.ports) >= self.limits.max_ports:
            raise SwitchError(f"this switch already serves {self.limits.max_ports} ports")
        if old is not None:
            self.remove_port(token)
        name = network.encode()
        net = self.networks.get(name)
        if net is None:
            net = self.networks[name] = Network(name)
        lim = self.limits
        port = Port(token, net, mac, address, guest,
                    Bucket(lim.port_bytes_per_s, lim.port_frames_per_s, lim.burst_s, self._clock()), lim)
        if old is not None:
            port.link, old.link = old.link, None  # the guest's connection stays; the old record lets go
        self.ports[token] = port
        self._local_macs[mac] = port
        net.local[mac] = port
        net.learned.pop(mac, None)  # it lives here now (a guest that moved to this agent)
        self._rebuild(net)
        return port

    def remove_port(self, token: bytes) -> Port | None:
        port = self.ports.pop(token, None)
        if port is None:
            return None
        del self._local_macs[port.mac]
        net = port.network
        del net.local[port.mac]
        if net.local:
            self._rebuild(net)
        else:
            del self.networks[net.name]
        return port

    def set_peers(self, peers: list[tuple[str, str, str]],
                  networks: dict[str, list[str]] | None = None) -> tuple[list[Peer], list[Peer]]:
        """Make (agent, endpoint, key) the peer list, each peer on the *networks* named for its key (a peer not
        named there: on all); return (added, removed). A moved peer is both."""
        if len(peers) > self.limits.max_peers:
            raise SwitchError(f"{len(peers)} peers exceed this switch's limit of {self.limits.max_peers}")
        wanted = {key: (agent, endpoint) for agent, endpoint, key in peers}
        removed = [peer for key, peer in self.peers.items()
                   if wanted.get(key) != (peer.name, peer.endpoint)]
        for peer in removed:
            del self.peers[peer.key]
        if removed:
            gone = set(map(id, removed))
            for net in self.networks.values():
                for mac in [mac for mac, (peer, _) in net.learned.items() if id(peer) in gone]:
                    del net.learned[mac]
        added = []
        lim, now = self.limits, self._clock()
        for key, (agent, endpoint) in wanted.items():
            if key not in self.peers:
                peer = Peer(agent, endpoint, key, Bucket(lim.peer_bytes_per_s, lim.peer_frames_per_s,
                                                         lim.burst_s, now))
                self.peers[key] = peer
                added.append(peer)
        networks = networks or {}
        for key, peer in self.peers.items():
            named = networks.get(key)
            peer.networks = None if named is None else frozenset(name.encode() for name in named)
        self._all_peers = tuple(self.peers.values())
        for net in self.networks.values():
            self._rebuild(net)
        return added, removed

    def _rebuild(self, net: Network) -> None:
        ports = tuple(net.local.values())
        peers = tuple(peer for peer in self._all_peers if peer.networks is None or net.name in peer.networks)
        net.group_from_port = (ports, peers)
        net.group_from_peer = (ports, ())
        net.to_peers = ((), peers)

    # --- frames ---------------------------------------------------------------------------------------------
    def from_port(self, port: Port, frame: bytes | bytearray | memoryview) -> Verdict:
        """Where a frame a guest sent goes, or why not. The destinations may include *port*: skip it."""
        size = len(frame)
        now = self._clock()
        if not port.bucket.take(size, now):  # first: every frame a guest sends costs it tokens
            return self.drop(port, RATE_LIMITED)
        facts = frames.parse(frame)
        if isinstance(facts, str):
            return self.drop(port, facts)
        dst, src, ethertype, sender_mac, sender_ip, _target = facts
        if src != port.mac:
            return self.drop(port, SPOOFED_MAC)
        if sender_ip != port.ip and sender_ip != NO_ADDRESS:
            return self.drop(port, SPOOFED_ARP if ethertype == frames.ETHERTYPE_ARP else SPOOFED_IP)
        if sender_mac != src:
            return self.drop(port, SPOOFED_ARP)
        net = port.network
        if dst[0] & 1:
            decision = net.group_from_port
            return self._flood(port, size, now, decision, len(decision[0]) - 1 + len(decision[1]))
        local = net.local.get(dst)
        if local is not None:
            if local is port:
                return self.drop(port, HAIRPIN)
            port.rx_frames += 1
            port.rx_bytes += size
            return local.only
        entry = net.learned.get(dst)
        if entry is not None:
            peer, seen = entry
            if now - seen <= self.limits.mac_age_s:
                port.rx_frames += 1
                port.rx_bytes += size
                return peer.only
            del net.learned[dst]
        return self._flood(port, size, now, net.to_peers, len(net.to_peers[1]))

    def _flood(self, port: Port, size: int, now: float, decision: Decision, copies: int) -> Verdict:
        """Storm control: a flooded frame costs its port's flood bucket one token per copy."""
        if copies > 1 and not port.flood.take(size * copies, now, copies):
            return self.drop(port, FLOOD_LIMITED)
        port.rx_frames += 1
        port.rx_bytes += size
        return decision

    def from_peer(self, key: str, network: bytes, frame: bytes | bytearray | memoryview) -> Verdict:
        """Where a frame from the peer with public key *key* goes, or why not."""
        peer = self.peers.get(key)
        if peer is None:
            self.dropped[UNKNOWN_PEER] = self.dropped.get(UNKNOWN_PEER, 0) + 1
            return UNKNOWN_PEER
        size = len(frame)
        now = self._clock()
        if not peer.bucket.take(size, now):
            return self.drop(peer, RATE_LIMITED)
        facts = frames.parse(frame)
        if isinstance(facts, str):
            return self.drop(peer, facts)
        dst, src = facts.dst, facts.src
        if src in self._local_macs:
            return self.drop(peer, SPOOFED_MAC)
        peer.rx_frames += 1
        peer.rx_bytes += size
        net = self.networks.get(network)
        if net is None:
            return self.drop(peer, NETWORK_ABSENT)
        self._learn(net, src, peer, now)
        if dst[0] & 1:
            return net.group_from_peer
        local = net.local.get(dst)
        if local is None:
            return self.drop(peer, NOT_HERE)
        return local.only

    def _learn(self, net: Network, mac: bytes, peer: Peer, now: float) -> None:
        learned = net.learned
        entry = learned.get(mac)
        if entry is not None:
            if entry[0] is peer and now - entry[1] < self.limits.mac_age_s / 4:
                return  # fresh enough: most frames stop here, without touching the table
            del learned[mac]
        elif len(learned) >= self.limits.mac_table:
            self._evict(learned)
        learned[mac] = (peer, now)

    @staticmethod
    def _evict(learned: dict[bytes, tuple[Peer, float]]) -> None:
        """Make room for one entry by forgetting the oldest (age() clears the idle ones now and then)."""
        del learned[next(iter(learned))]

    def age(self) -> None:
        """Forget MACs learned longer ago than the age limit (called now and then; lookups also age)."""
        now, age = self._clock(), self.limits.mac_age_s
        for net in self.networks.values():
            for mac, (_, seen) in list(net.learned.items()):
                if now - seen <= age:
                    break  # the rest are younger
                del net.learned[mac]

    # --- drops and statistics ---------------------------------------------------------------------------
    def drop(self, party: Party, reason: str) -> str:
        """Count a drop against *party*; log the first of each reason for each party. Returns the reason."""
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        count = party.dropped.get(reason, 0)
        party.dropped[reason] = count + 1
        if not count:
            kind = "guest" if isinstance(party, Port) else "peer"
            log.warning("conet: dropping frames of %s %s: %s (counted; logged once)", kind, party.name, reason)
        return reason

    def stats(self) -> dict[str, Any]:
        return {"ports": {port.name: port.stats() for port in self.ports.values()},
                "peers": {peer.name: peer.stats() for peer in self.peers.values()},
                "dropped": dict(self.dropped)}
