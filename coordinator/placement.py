"""Placement policy: which node gets a job. Pure: it sees a snapshot of the nodes, never a socket."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, replace
from typing import Iterator

from conode.limits import MAX_IMAGE_BYTES

ACCEPTING_STATES = ("Unclaimed", "Claimed")  # the owner is away: the node may take work


@dataclass(frozen=True)
class NodeView:
    name: str
    state: str
    cores: int
    mem_mib: int
    running: int
    away_since: float  # when its owner left (the coordinator's monotonic clock): the smaller, the longer away
    drained: bool = False
    last_placed: float = 0.0  # when this node was last given a job (monotonic seconds; 0: never)
    image_cache_mib: int | None = None  # the most of the pool's images it keeps; None: it did not say

    @property
    def free_slots(self) -> int:
        return self.cores - self.running

    @property
    def image_bytes(self) -> int:
        """The largest image this node can hold (a node that did not say is taken at its word later)."""
        return MAX_IMAGE_BYTES if self.image_cache_mib is None else self.image_cache_mib << 20


def can_take_work(node: NodeView) -> bool:
    """Whether the node may be given a job now (of a size it fits): owner away, not drained, a slot free."""
    return node.state in ACCEPTING_STATES and not node.drained and node.free_slots > 0


def fits(node: NodeView, mem_mib: int, image_bytes: int) -> bool:
    """Whether the node is big enough for a job's guest memory and (on a pool image) its image."""
    return node.mem_mib >= mem_mib and node.image_bytes >= image_bytes


def preference(node: NodeView) -> tuple[bool, float, float, float, str]:
    """The order in which nodes are offered a job, the first first.

    Idle nodes (no running job) first, then the least loaded; among equals, the node that has waited longest
    for work (so that a stream of short jobs is spread over the pool), then the node whose owner has been away
    longest (least likely to come back soon), then by name for a stable order.
    """
    return node.running > 0, node.running / max(node.cores, 1), node.last_placed, node.away_since, node.name


def choose_node(mem_mib: int, nodes: list[NodeView], image_bytes: int = 0) -> str | None:
    """The node for a job needing *mem_mib* of guest memory (and, on a pool image, room for *image_bytes* in the
    node's image cache), or None if no node can take it now."""
    candidates = [n for n in nodes if can_take_work(n) and fits(n, mem_mib, image_bytes)]
    return min(candidates, key=preference).name if candidates else None


class OpenNodes:
    """The nodes that can take a job now, kept in :func:`preference` order, so that choosing one for a job looks
    at the first nodes only (the first that fits), not at the whole pool.

    A node's place is fixed when it is updated; the coordinator updates it whenever something its preference
    depends on changes (a job placed or ended, its owner leaving); its owner's absence counts from when the
    owner left, which later heartbeats do not change.
    """

    def __init__(self) -> None:
        self._views: dict[str, NodeView] = {}
        self._keys: dict[str, tuple[bool, float, float, float, str]] = {}
        self._order: list[tuple[bool, float, float, float, str]] = []

    def update(self, node: NodeView) -> None:
        """Take in the node's present view: in its place if it can take work, out otherwise."""
        self.discard(node.name)
        if can_take_work(node):
            key = preference(node)
            bisect.insort(self._order, key)
            self._keys[node.name] = key
            self._views[node.name] = node

    def discard(self, name: str) -> None:
        key = self._keys.pop(name, None)
        if key is not None:
            del self._views[name]
            del self._order[bisect.bisect_left(self._order, key)]

    def choose(self, mem_mib: int, image_bytes: int = 0) -> str | None:
        """What choose_node would choose among these nodes."""
        for key in self._order:
            if fits(self._views[key[-1]], mem_mib, image_bytes):
                return key[-1]
        return None

    def views(self) -> list[NodeView]:
        return [self._views[key[-1]] for key in self._order]

    def __iter__(self) -> Iterator[str]:
        return (key[-1] for key in self._order)

    def __len__(self) -> int:
        return len(self._order)


def choose_gang(mem_mib: int, guests: int, nodes: list[NodeView], image_bytes: int = 0) -> list[str] | None:
    """A node for each of a gang's *guests* (rank i on the i-th; a node with several free slots may take several
    ranks), or None if the pool cannot take them all now: a gang starts all at once or not at all."""
    views = {n.name: n for n in nodes}
    chosen: list[str] = []
    for _ in range(guests):
        name = choose_node(mem_mib, list(views.values()), image_bytes)
        if name is None:
            return None
        chosen.append(name)
        views[name] = replace(views[name], running=views[name].running + 1)
    return chosen
