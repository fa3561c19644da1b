# SPDX-License-Identifier: GPL-2.0-or-later
"""The in-memory job queue: jobs kept in order whatever the order they come and go in, and the fair order between
owners (fewest running first, round robin among equals, priorities within one owner's jobs)."""

import time

from hypothesis import given
from hypothesis import strategies as st

from coordinator.queue import JobQueue, QueuedJob, Shares


def job(ident: int, owner: str = "", priority: int = 0, mem_mib: int = 64) -> QueuedJob:
    return QueuedJob(ident, mem_mib, owner=owner, priority=priority)


def place(queue: JobQueue, slots: int) -> list[int]:
    """What a scheduling pass with *slots* free guests takes, in order: each job taken starts at once (as the
    coordinator reports it while iterating) and leaves the queue after the pass."""
    taken = []
    for ident in queue:
        if len(taken) == slots:
            break
        queue.shares.started(ident, queue.get(ident).owner)
        taken.append(ident)
    for ident in taken:
        queue.remove(ident)
    return taken


def test_a_requeued_job_goes_back_to_its_place():
    queue = JobQueue([(5, 64, 1, 0, "", 0), (9, 128, 3, 5 << 20, "", 0)])
    queue.add(job(12))
    queue.add(job(3, mem_mib=256))  # requeued: older than everything waiting
    queue.add(job(9, mem_mib=999))  # already there: unchanged
    assert list(queue) == [3, 5, 9, 12] and queue.get(9).mem_mib == 128 and queue.get(3).mem_mib == 256
    assert queue.get(9).guests == 3 and queue.get(12).guests == 1
    assert queue.get(9).image_bytes == 5 << 20 and queue.get(5).image_bytes == 0
    assert queue.remove(5) and not queue.remove(5) and 5 not in queue
    assert queue.remove(9) and 9 not in queue
    assert list(queue) == [3, 12] and len(queue) == 2


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 50), st.sampled_from("abc"), st.integers(-2, 2))))
def test_the_queue_matches_a_model(operations):
    """Whatever comes and goes, each owner's jobs come out by priority then age, and every job exactly once."""
    queue, model = JobQueue(), {}
    for add, ident, owner, priority in operations:
        if add:
            queue.add(job(ident, owner, priority))
            model.setdefault(ident, (owner, priority))
        else:
            assert queue.remove(ident) == (ident in model)
            model.pop(ident, None)
        assert sorted(queue) == sorted(model) and len(queue) == len(model)
    for owner in "abc":
        mine = [ident for ident in queue if model[ident][0] == owner]
        assert mine == sorted(mine, key=lambda i: (-model[i][1], i)) and queue.queued(owner) == len(mine)


def test_one_owner_with_many_jobs_does_not_starve_another():
    queue = JobQueue()
    for ident in range(1, 101):
        queue.add(job(ident, "alice"))  # alice queues a hundred jobs first
    queue.add(job(101, "bob"))
    queue.add(job(102, "bob"))
    # Four slots: alice (oldest job) and bob alternate; bob's two jobs do not wait for alice's hundred.
    assert place(queue, 4) == [1, 101, 2, 102]
    assert place(queue, 3) == [3, 4, 5]  # bob has nothing left waiting: alice takes the rest


def test_the_owner_with_the_fewest_running_goes_first():
    queue = JobQueue()
    for ident in range(1, 11):
        queue.add(job(ident, "alice"))
    place(queue, 5)  # alice runs five
    for ident in range(11, 21):
        queue.add(job(ident, "bob"))
    # bob catches up to alice's five before they share again, oldest-served first.
    assert place(queue, 7) == [11, 12, 13, 14, 15, 6, 16]
    for ident in (1, 2, 3, 11):
        queue.shares.stopped(ident)  # alice now runs 3 (4, 5, 6), bob 5
    assert place(queue, 2) == [7, 8]


def test_equal_shares_take_turns_in_the_order_last_served():
    queue = JobQueue()
    for ident, owner in enumerate("abcabcabc", start=1):
        queue.add(job(ident, owner))
    assert place(queue, 9) == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    queue.add(job(20, "c"))
    queue.add(job(21, "b"))
    queue.add(job(22, "a"))
    # all run three: a was served longest ago, then b, then c
    assert place(queue, 3) == [22, 21, 20]


def test_priorities_order_an_owners_own_jobs_only():
    queue = JobQueue()
    queue.add(job(1, "alice"))
    queue.add(job(2, "alice", priority=10))
    queue.add(job(3, "bob"))
    queue.add(job(4, "bob", priority=-5))
    queue.add(job(5, "bob", priority=1000))
    # alice's urgent job does not put her ahead of bob: it goes first among hers.
    assert place(queue, 5) == [2, 5, 1, 3, 4]


def test_a_job_passed_over_keeps_its_place():
    """The coordinator passes over a job no node can ever take (bigger than any); the next of its owner's is
    offered, and the job comes first again in the next pass."""
    queue = JobQueue()
    queue.add(job(1, "alice", mem_mib=4096))
    queue.add(job(2, "alice"))
    queue.add(job(3, "bob"))
    taken = []
    for ident in queue:
        if queue.get(ident).mem_mib > 1024:
            continue
        queue.shares.started(ident, queue.get(ident).owner)
        taken.append(ident)
    assert taken == [2, 3]
    for ident in taken:
        queue.remove(ident)
    assert list(queue) == [1]


def test_shares_count_guests_once_and_forget_stopped_ones():
    shares = Shares()
    for guest in (1, 2, 2, 3):
        shares.started(guest, "alice")
    shares.started(4, "bob")
    assert shares.running("alice") == 3 and shares.running("bob") == 1
    shares.stopped(2)
    shares.stopped(2)
    shares.stopped(99)
    assert shares.running("alice") == 2 and shares.served("bob") > shares.served("alice")
    for guest in (1, 3, 4):
        shares.stopped(guest)
    assert shares.running("alice") == shares.running("bob") == 0 and shares.running("nobody") == 0


def test_a_pass_costs_little_per_job_whatever_the_queue():
    """Ten thousand jobs of a hundred owners: taking the first fifty is as quick as with a short queue, and
    queueing or removing one job stays cheap (no pass over the whole queue)."""
    def timed(total: int) -> float:
        queue = JobQueue(QueuedJob(i, 64, owner=f"user{i % 100}") for i in range(1, total + 1))
        start = time.perf_counter()
        for _ in range(20):
            for n, ident in enumerate(queue):
                if n == 50:
                    break
            queue.remove(total // 2)
            queue.add(job(total // 2, f"user{total // 2 % 100}"))
        return time.perf_counter() - start

    small, large = timed(200), timed(20_000)
    assert large < small * 10 + 0.05, (small, large)
