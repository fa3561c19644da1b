# SPDX-License-Identifier: GPL-2.0-or-later
"""The in-memory job queue keeps job ids in order whatever the order they come and go in."""

from hypothesis import given
from hypothesis import strategies as st

from coordinator.queue import JobQueue


def test_a_requeued_job_goes_back_to_its_place():
    queue = JobQueue([(5, 64, 1, 0), (9, 128, 3, 5 << 20)])
    queue.add(12, 64)
    queue.add(3, 256)  # requeued: older than everything waiting
    queue.add(9, 999)  # already there: unchanged
    assert list(queue) == [3, 5, 9, 12] and queue.mem_mib(9) == 128 and queue.mem_mib(3) == 256
    assert queue.guests(9) == 3 and queue.guests(12) == 1
    assert queue.image_bytes(9) == 5 << 20 and queue.image_bytes(5) == 0
    assert queue.remove(5) and not queue.remove(5) and 5 not in queue
    assert queue.remove(9) and queue.guests(9) == 1 and queue.image_bytes(9) == 0
    assert list(queue) == [3, 12] and len(queue) == 2


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 50))))
def test_the_queue_matches_a_sorted_set(operations):
    queue, model = JobQueue(), set()
    for add, job in operations:
        if add:
            queue.add(job, job + 48)
            model.add(job)
        else:
            assert queue.remove(job) == (job in model)
            model.discard(job)
        assert list(queue) == sorted(model) and len(queue) == len(model)
    assert all(queue.mem_mib(job) == job + 48 for job in model)
