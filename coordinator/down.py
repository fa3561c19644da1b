"""Nodes that left the pool (lost or said goodbye), remembered until they return or an admin forgets them.

A workstation that vanishes is news to its admin: `coordinator status` keeps showing it as down, with when and
why, rather than dropping it as if it had never been. Kept in memory only: a restarted coordinator starts with a
clean slate (it never saw those nodes leave).
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from typing import Any

MAX_DOWN_NODES = 10_000  # a bound on what churn can make the coordinator remember; the oldest go first


@dataclass(frozen=True)
class DownNode:
    name: str
    since: float  # wall-clock time it left
    why: str
    cores: int
    mem_mib: int


class DownNodes:
    def __init__(self) -> None:
        self._nodes: dict[str, DownNode] = {}

    def left(self, node: DownNode) -> None:
        self._nodes.pop(node.name, None)
        self._nodes[node.name] = node
        while len(self._nodes) > MAX_DOWN_NODES:
            del self._nodes[next(iter(self._nodes))]

    def returned(self, name: str) -> None:
        self._nodes.pop(name, None)

    def forget(self, name: str) -> bool:
        return self._nodes.pop(name, None) is not None

    def names(self) -> set[str]:
        return set(self._nodes)

    def capacities(self) -> list[tuple[int, int]]:
        """(cores, guest memory in MiB) of each: what the pool offers once they are back."""
        return [(node.cores, node.mem_mib) for node in self._nodes.values()]

    def __len__(self) -> int:
        return len(self._nodes)

    def rows(self) -> list[dict[str, Any]]:
        """What `status` shows of each, by name."""
        return [asdict(node) for _, node in sorted(self._nodes.items())]


def unknown_node(name: str, known: set[str]) -> str:
    """The refusal of a node name nobody knows, with the closest known one."""
    close = difflib.get_close_matches(name, sorted(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "; `coordinator status` lists the nodes"
    return f"no node named {name!r}{hint}"[:300]
