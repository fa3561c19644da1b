# SPDX-License-Identifier: GPL-2.0-or-later
"""`coordinator wait --rank`: when a rank of a job has ended, from the job records the coordinator replies."""

import pytest

from conode.errors import ConodeError
from coordinator.cli import _settled


def gang(state, *ranks, guests=2):
    return {"id": 7, "state": state, "guests": guests, "exit_status": None, "reason": None,
            "ranks": [{"rank": r, "id": 8 + r, "state": s, "exit_status": status, "reason": None}
                      for r, (s, status) in enumerate(ranks)]}


def test_a_rank_that_ended_is_settled_while_the_others_run():
    state = gang("running", ("running", None), ("done", 3))
    assert _settled(state, 7, 1) == state["ranks"][1]
    assert _settled(state, 7, 0) is None
    assert _settled(state, 7, None) is None


def test_a_rank_cancelled_because_its_gang_starts_again_is_not_settled():
    state = gang("queued", ("cancelled", None), ("cancelled", None))
    assert _settled(state, 7, 0) is None


def test_a_gang_that_ended_before_its_ranks_started_settles_them_all():
    state = gang("cancelled", guests=2)
    assert _settled(state, 7, 1) is state


def test_a_one_guest_job_is_its_own_rank_0_and_has_no_other():
    state = {"id": 3, "state": "done", "guests": 1, "exit_status": 0, "reason": None}
    assert _settled(state, 3, 0) is state and _settled(state, 3, None) is state
    with pytest.raises(ConodeError, match="has no rank 1: it has one guest"):
        _settled(state, 3, 1)
    with pytest.raises(ConodeError, match="has no rank 2: it has 2 guests"):
        _settled(gang("running"), 7, 2)
