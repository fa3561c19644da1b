"""The nodes' liveness as a timer heap: who is owed a ping and who has been silent too long, at a cost that
follows the timers that come due, never the number of nodes.

Hearing from a node only stamps the time (a heartbeat is the coordinator's commonest message). Each node has
one entry in the heap, due at its next ping or its expiry, whichever is sooner; when it comes due, the node is
pinged, declared lost, or both checked again later, and the entry is pushed back for the next event.
"""

from __future__ import annotations

import heapq
from typing import Callable


class Liveness:
    def __init__(self, clock: Callable[[], float], interval: float, limit: float) -> None:
        """Ping each node every *interval* seconds; a node silent for more than *limit* seconds is lost."""
        self._clock = clock
        self.interval = interval
        self.limit = limit
        self._last: dict[str, float] = {}  # node -> when it was last heard
        self._next_ping: dict[str, float] = {}
        self._entry: dict[str, int] = {}  # node -> the sequence number of its live heap entry
        self._heap: list[tuple[float, int, str]] = []  # (due, sequence, node); entries of removed nodes linger
        self._seq = 0

    def add(self, node: str) -> None:
        """Start watching *node* (again: its old timers are void), heard just now."""
        now = self._clock()
        self._last[node] = now
        self._next_ping[node] = now + self.interval
        self._push(node, now + self.interval)

    def remove(self, node: str) -> None:
        self._last.pop(node, None)
        self._next_ping.pop(node, None)
        self._entry.pop(node, None)

    def heard(self, node: str) -> None:
        """Any message from *node* proves it alive."""
        if node in self._last:
            self._last[node] = self._clock()

    def __contains__(self, node: object) -> bool:
        return node in self._last

    def __len__(self) -> int:
        return len(self._last)

    def due(self, expire: bool = True) -> tuple[list[str], list[str]]:
        """(nodes to ping now, nodes silent too long) and, for the lost ones, forget them.

        *expire* False: lose no node now (the caller has not read all it received, so a silent node's word may be
        waiting there); the silent ones are looked at again at their next ping."""
        now = self._clock()
        ping: list[str] = []
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
            next_ping = self._next_ping[node]
            if now >= next_ping:
                ping.append(node)
                next_ping = self._next_ping[node] = now + self.interval
            expiry = last + self.limit
            self._push(node, next_ping if expiry <= now else min(next_ping, expiry))
        if len(heap) > 4 * len(self._entry) + 64:  # many nodes left: drop their stale entries
            self._heap = [entry for entry in heap if self._entry.get(entry[2]) == entry[1]]
            heapq.heapify(self._heap)
        return ping, lost

    def _push(self, node: str, due: float) -> None:
        self._seq += 1
        self._entry[node] = self._seq
        heapq.heappush(self._heap, (due, self._seq, node))
