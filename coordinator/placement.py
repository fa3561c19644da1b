"""Placement policy: which node gets a job. Pure: it sees a snapshot of the nodes, never a socket."""

from __future__ import annotations

from dataclasses import dataclass, replace

from conode.limits import MAX_IMAGE_BYTES

ACCEPTING_STATES = ("Unclaimed", "Claimed")  # the owner is away: the node may take work


@dataclass(frozen=True)
class NodeView:
    name: str
    state: str
    cores: int
    mem_mib: int
    running: int
    idle_s: float
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


def choose_node(mem_mib: int, nodes: list[NodeView], image_bytes: int = 0) -> str | None:
    """The node for a job needing *mem_mib* of guest memory (and, on a pool image, room for *image_bytes* in the
    node's image cache), or None if no node can take it now.

    Idle nodes (no running job) first, then the least loaded; among equals, the node that has waited longest
    for work (so that a stream of short jobs is spread over the pool), then the node whose owner has been away
    longest (least likely to come back soon), then by name for a stable order.
    """
    candidates = [n for n in nodes if can_take_work(n) and n.mem_mib >= mem_mib and n.image_bytes >= image_bytes]
    if not candidates:
        return None
    best = min(candidates, key=lambda n: (n.running > 0, n.running / max(n.cores, 1), n.last_placed, -n.idle_s,
                                          n.name))
    return best.name


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
