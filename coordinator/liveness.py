"""The nodes' liveness as a timer heap: who has been silent too long, at a cost that follows the timers that come
due, never the number of nodes.

Hearing from a node only stamps the time (a heartbeat is the coordinator's commonest message). Each node has
one entry in the heap, due when it would have been silent for the limit; when it comes due, the node is declared
lost, or, heard meanwhile, its entry is pushed back to its new expiry. The coordinator sends nothing on these
timers: the agents know it alive from ZeroMQ's own heartbeats on their connection (conode/agent/link.py).
"""

from __future__ import annotations

import heapq
import math
from typing import Callable


class Liveness:
    def __init__(self, clock: Callable[[], float], interval: float, limit: float) -> None:
        """A node silent for more than *limit* seconds is lost; one that may not be lost yet (see :meth:`due`)
        is looked at again every *interval* seconds."""
        self._clock = clock
        self.interval = interval
        self.limit = limit
        self._last: dict[str, float] = {}  # node -> when it was last heard
        self._entry: dict[str, int] = {}  # node -> the sequence number of its live heap entry
        self._heap: list[tuple[float, int, str]] = []  # (due, sequence, node); entries of removed nodes linger
        self._seq = 0

    def add(self, node: str) -> None:
        """Start watching *node* (again: its old timer is void), heard just now."""
        now = self._clock()
        self._last[node] = now
        self._push(node, now + self.limit)

    def remove(self, node: str) -> None:
        self._last.pop(node, None)
        self._entry.pop(node, None)

    def heard(self, node: str) -> None:
        """Any message from *node* proves it alive."""
        if node in self._last:
            self._last[node] = self._clock()

    def __contains__(self, node: object) -> bool:
        return node in self._last

    def __len__(self) -> int:
        return len(self._last)

    def due(self, expire: bool = True) -> list[str]:
        """The nodes silent too long, forgotten here.

        *expire* False: lose no node now (the caller has not read all it received, so a silent node's word may be
        waiting there); the silent ones are looked at again an interval later."""
        now = self._clock()
        lost: list[str] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, seq, node = heapq.heappop(heap)
            if self._entry.get(node) != seq:
                continue  # removed, or added again since
            last = self._last[node]
            if now - last > self.limit and expire:
                lost.append(node)
                self.remove(node)
                continue
            expiry = last + self.limit
            if expiry <= now:  # held back (or due to the very instant): look again later
                expiry = now + self.interval if not expire else math.nextafter(now, math.inf)
            self._push(node, expiry)
        if len(heap) > 4 * len(self._entry) + 64:  # many nodes left: drop their stale entries
            self._heap = [entry for entry in heap if self._entry.get(entry[2]) == entry[1]]
            heapq.heapify(self._heap)
        return lost

    def _push(self, node: str, due: float) -> None:
        self._seq += 1
        self._entry[node] = self._seq
        heapq.heappush(self._heap, (due, self._seq, node))
