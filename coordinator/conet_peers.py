"""Which agents' conet switches must know each other: those whose guests share a network.

Pure bookkeeping. The coordinator records where each guest runs and on which network, and which conet endpoint
and key each agent has; :meth:`PeerDirectory.changes` tells which agents need a new peer list. An agent is told
only of the agents it shares a network with, so a pool of a thousand single-guest jobs sends no peer lists
at all, and a switch admits no agent it has no traffic with.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Endpoint:
    endpoint: str
    key: str


class PeerDirectory:
    def __init__(self) -> None:
        self._guests: dict[int, tuple[str, str]] = {}  # guest (job or rank id) -> (network, node)
        self._members: dict[str, Counter[str]] = defaultdict(Counter)  # network -> guests per node
        self._networks: dict[str, Counter[str]] = defaultdict(Counter)  # node -> guests per network
        self._endpoints: dict[str, Endpoint] = {}  # node -> its switch, for nodes that run one
        self._sent: dict[str, list[dict[str, Any]]] = {}  # the peer list each node was last given
        self._dirty: set[str] = set()  # nodes whose peer list may have changed

    def node_joined(self, node: str, endpoint: str | None, key: str) -> None:
        """A node said hello; it has a conet switch at *endpoint* (None: no switch). Its last list is void."""
        if endpoint:
            self._endpoints[node] = Endpoint(endpoint, key)
        else:
            self._endpoints.pop(node, None)
        self._sent.pop(node, None)
        self._touch_neighbours(node)

    def node_left(self, node: str) -> None:
        self._touch_neighbours(node)
        for guest in [g for g, (_, n) in self._guests.items() if n == node]:
            self.guest_gone(guest)
        self._endpoints.pop(node, None)
        self._sent.pop(node, None)
        self._networks.pop(node, None)

    def guest_placed(self, guest: int, network: str, node: str) -> None:
        self.guest_gone(guest)
        self._guests[guest] = (network, node)
        self._members[network][node] += 1
        self._networks[node][network] += 1
        self._dirty.update(self._members[network])

    def guest_gone(self, guest: int) -> None:
        placed = self._guests.pop(guest, None)
        if placed is None:
            return
        network, node = placed
        self._dirty.update(self._members[network])
        for index, outer, inner in ((self._members, network, node), (self._networks, node, network)):
            counts = index[outer]
            counts[inner] -= 1
            if counts[inner] <= 0:
                del counts[inner]
            if not counts:
                del index[outer]

    def _touch_neighbours(self, node: str) -> None:
        self._dirty.add(node)
        for network in self._networks.get(node, ()):
            self._dirty.update(self._members[network])

    def peers_of(self, node: str) -> list[dict[str, Any]]:
        """The other nodes with a switch that host a guest on one of *node*'s networks, by name, each with the
        networks they share (so that a broadcast goes only to the agents on its network)."""
        wanted: dict[str, list[str]] = defaultdict(list)
        for network in sorted(self._networks.get(node, ())):
            for peer in self._members[network]:
                wanted[peer].append(network)
        wanted.pop(node, None)
        return [{"node": peer, "endpoint": self._endpoints[peer].endpoint, "key": self._endpoints[peer].key,
                 "networks": wanted[peer]} for peer in sorted(wanted) if peer in self._endpoints]

    def changes(self) -> dict[str, list[dict[str, Any]]]:
        """The nodes (with a switch) whose peer list differs from the one they were last given, with the new
        list; they count as told. Costs only what changed since the last call."""
        changed = {}
        dirty, self._dirty = self._dirty, set()
        for node in sorted(dirty):
            if node not in self._endpoints:
                continue
            peers = self.peers_of(node)
            if peers != self._sent.get(node, []):
                changed[node] = peers
                self._sent[node] = peers
        return changed
