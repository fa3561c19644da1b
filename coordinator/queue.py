"""The queued jobs in placement order, held in memory so that queueing or placing one job costs nothing per job
waiting behind it. The store stays the record; this is its index, loaded once when the coordinator starts.

The order is fair between the people who submit (a job's owner): the next job is the one of the owner with the
fewest guests running now; among owners with as many, the one served longest ago (round robin); a new owner
before one served already, and among those the oldest job first. Within one owner's jobs, higher priority first,
then the oldest. So a person who queues a thousand jobs takes no more of the pool than one who queues ten, while
both have work waiting. Pure: it sees job ids, owners and counts, never the store or a socket.
"""

from __future__ import annotations

import bisect
import heapq
from typing import Iterable, Iterator, NamedTuple


class QueuedJob(NamedTuple):
    """What placement needs to know of a queued job."""

    id: int
    mem_mib: int
    guests: int = 1
    image_bytes: int = 0  # the size of the pool image it boots from; 0 for the built-in initramfs
    owner: str = ""
    priority: int = 0  # higher first, among its owner's jobs only


class Shares:
    """How many guests each owner has running now, and when each was last given a guest: the fair half of the
    order. Told of every guest that starts or stops (a gang counts each of its guests)."""

    def __init__(self) -> None:
        self._owner_of: dict[int, str] = {}  # running guest -> its job's owner
        self._running: dict[str, int] = {}
        self._served: dict[str, int] = {}  # owner -> the tick of their latest start (0: never)
        self._tick = 0

    def started(self, guest: int, owner: str) -> None:
        if guest in self._owner_of:
            return
        self._owner_of[guest] = owner
        self._running[owner] = self._running.get(owner, 0) + 1
        self._tick += 1
        self._served[owner] = self._tick

    def stopped(self, guest: int) -> None:
        """*guest* no longer runs (ended, vacated, lost); nothing if it was not running."""
        owner = self._owner_of.pop(guest, None)
        if owner is None:
            return
        left = self._running[owner] - 1
        if left:
            self._running[owner] = left
        else:
            del self._running[owner]

    def running(self, owner: str) -> int:
        return self._running.get(owner, 0)

    def served(self, owner: str) -> int:
        return self._served.get(owner, 0)


class JobQueue:
    """Queued jobs, by owner, each owner's in (priority descending, id ascending) order: a requeued job goes back
    to its old place among its owner's."""

    def __init__(self, jobs: Iterable[tuple[int, int, int, int, str, int]] = (), shares: Shares | None = None) -> None:
        self.shares = shares or Shares()
        self._jobs: dict[int, QueuedJob] = {}
        self._by_owner: dict[str, list[tuple[int, int]]] = {}  # owner -> [(-priority, id)], sorted
        for job in jobs:
            self.add(QueuedJob(*job))

    def add(self, job: QueuedJob) -> None:
        if job.id in self._jobs:
            return
        self._jobs[job.id] = job
        entry = (-job.priority, job.id)
        mine = self._by_owner.setdefault(job.owner, [])
        if not mine or entry > mine[-1]:
            mine.append(entry)  # a new submission at the usual priority: the common case
        else:
            bisect.insort(mine, entry)

    def remove(self, job: int) -> bool:
        """Take *job* out of the queue; False if it was not queued."""
        queued = self._jobs.pop(job, None)
        if queued is None:
            return False
        mine = self._by_owner[queued.owner]
        del mine[bisect.bisect_left(mine, (-queued.priority, job))]
        if not mine:
            del self._by_owner[queued.owner]
        return True

    def get(self, job: int) -> QueuedJob:
        return self._jobs[job]

    def queued(self, owner: str) -> int:
        """How many jobs *owner* has waiting."""
        return len(self._by_owner.get(owner, ()))

    def __iter__(self) -> Iterator[int]:
        """The queued ids in fair order (see the module's docstring). Starts and stops reported to ``shares``
        while this is iterated count at once (a pass that places ten jobs alternates between two owners); the
        jobs themselves must not change. Costs O(log owners) per job yielded, after O(owners) to begin."""
        shares = self.shares
        heads = [(shares.running(owner), shares.served(owner), jobs[0][1], owner, 0)
                 for owner, jobs in self._by_owner.items()]
        heapq.heapify(heads)
        while heads:
            running, served, job, owner, index = heapq.heappop(heads)
            fresh = (shares.running(owner), shares.served(owner))
            if fresh != (running, served):  # another owner's guests started or stopped meanwhile
                heapq.heappush(heads, (*fresh, job, owner, index))
                continue
            yield job
            mine = self._by_owner[owner]
            if index + 1 < len(mine):
                heapq.heappush(heads, (shares.running(owner), shares.served(owner), mine[index + 1][1], owner,
                                       index + 1))

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, job: object) -> bool:
        return job in self._jobs
