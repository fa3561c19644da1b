"""The queued jobs in placement order, held in memory so that queueing or placing one job costs nothing per job
waiting behind it. The store stays the record; this is its index, loaded once when the coordinator starts."""

from __future__ import annotations

import bisect
from typing import Iterable, Iterator


class JobQueue:
    """Job ids in ascending order (the oldest submission first, a requeued job back in its old place), each
    with the guest memory it needs, its number of guests and the size of the disk image it boots from."""

    def __init__(self, jobs: Iterable[tuple[int, int, int, int]] = ()) -> None:
        self._mem: dict[int, int] = {}
        self._guests: dict[int, int] = {}  # only jobs of more than one guest
        self._image_bytes: dict[int, int] = {}  # only jobs on a pool image
        self._order: list[int] = []
        for job, mem_mib, guests, image_bytes in jobs:
            self.add(job, mem_mib, guests, image_bytes)

    def add(self, job: int, mem_mib: int, guests: int = 1, image_bytes: int = 0) -> None:
        if job in self._mem:
            return
        self._mem[job] = mem_mib
        if guests > 1:
            self._guests[job] = guests
        if image_bytes:
            self._image_bytes[job] = image_bytes
        if not self._order or job > self._order[-1]:
            self._order.append(job)  # a new submission: the common case
        else:
            bisect.insort(self._order, job)

    def remove(self, job: int) -> bool:
        """Take *job* out of the queue; False if it was not queued."""
        if self._mem.pop(job, None) is None:
            return False
        self._guests.pop(job, None)
        self._image_bytes.pop(job, None)
        del self._order[bisect.bisect_left(self._order, job)]
        return True

    def mem_mib(self, job: int) -> int:
        return self._mem[job]

    def guests(self, job: int) -> int:
        return self._guests.get(job, 1)

    def image_bytes(self, job: int) -> int:
        """The size of the image the job's guests boot from; 0 for the built-in initramfs."""
        return self._image_bytes.get(job, 0)

    def __iter__(self) -> Iterator[int]:
        """The queued ids, oldest first. The queue must not change while this is iterated."""
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, job: object) -> bool:
        return job in self._mem
