# SPDX-License-Identifier: GPL-2.0-or-later
"""The disk deltas of checkpoint pieces (:class:`.overlay.DiskDelta`): checked, merged along a chain, and made
the whole overlay again for a guest to go on from.

A chain's disk is its newest piece's cluster map, each cluster it lists taken from the newest piece that
carries it; a full piece carries every cluster of its map, so a chain that begins with one lacks none.
"""

from __future__ import annotations

import heapq
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from conode.errors import SnapshotError
from conode.vm import state
from conode.vm.disk.overlay import CLUSTER, DiskDelta, DiskState, inflate_map, pack_clusters, unpack_clusters


@dataclass(frozen=True)
class Changes:
    """A checked DiskDelta, its maps inflated (one byte per cluster)."""

    base_sha256: str
    base_size: int
    map: bytes  # 1: the overlay holds the cluster
    carried: bytes  # 1: this delta holds its contents
    chunks: tuple[bytes, ...]

    @property
    def whole(self) -> bool:
        return self.carried == self.map

    def clusters(self) -> Iterator[tuple[int, bytes]]:
        """(cluster, contents) of each cluster carried, in order; SnapshotError if the chunks do not hold
        exactly those."""
        for first, data in unpack_clusters(self.carried, self.chunks):
            for index in range(len(data) // CLUSTER):
                yield first + index, data[index * CLUSTER:(index + 1) * CLUSTER]


def load_changes(data: Any) -> Changes:
    """Check a DiskDelta's fields and maps (not yet its chunks: :meth:`Changes.clusters`); SnapshotError."""
    saved = state.load(DiskDelta, data)
    clusters = -(-saved.base_size // CLUSTER)
    cluster_map = inflate_map(saved.map, clusters, "cluster map")
    carried = inflate_map(saved.carried, clusters, "list of carried clusters")
    if int.from_bytes(carried, "little") & ~int.from_bytes(cluster_map, "little"):
        raise SnapshotError("the disk delta carries clusters its cluster map does not list")
    return Changes(saved.base_sha256, saved.base_size, cluster_map, carried, saved.chunks)


def merge_changes(deltas: list[Changes]) -> dict[str, Any]:
    """One DiskDelta equal to *deltas* applied in order: the newest map, each cluster it lists from the newest
    delta that carries it (one no delta carries stays uncarried). Memory: a chunk per delta."""
    last = deltas[-1]
    if any((d.base_sha256, d.base_size) != (last.base_sha256, last.base_size) for d in deltas):
        raise SnapshotError("the disk deltas are of overlays on different base images")
    carried = bytearray(len(last.map))

    def newest() -> Iterator[bytes]:
        streams = [_aged(delta, -index) for index, delta in enumerate(deltas)]
        previous = -1
        for cluster, _, data in heapq.merge(*streams):  # a cluster's newest copy comes first
            if cluster != previous and last.map[cluster]:
                carried[cluster] = 1
                yield data
            previous = cluster

    chunks = pack_clusters(newest())
    return state.dump(DiskDelta(last.base_sha256, last.base_size, CLUSTER, zlib.compress(last.map, 1),
                                zlib.compress(bytes(carried), 1), chunks))


def _aged(delta: Changes, rank: int) -> Iterator[tuple[int, int, bytes]]:
    for cluster, data in delta.clusters():
        yield cluster, rank, data


def whole_state(changes: Changes) -> dict[str, Any]:
    """The overlay *changes* carries whole, as a snapshot's DiskState; SnapshotError if it lacks a cluster."""
    if not changes.whole:
        missing = changes.map.count(1) - changes.carried.count(1)
        raise SnapshotError(f"the checkpoint's disk lacks {missing} of the clusters its map lists")
    return state.dump(DiskState(changes.base_sha256, changes.base_size, CLUSTER, zlib.compress(changes.map, 1),
                                changes.chunks))
