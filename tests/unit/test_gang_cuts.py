# SPDX-License-Identifier: GPL-2.0-or-later
"""Coordinated checkpoints of a gang (coordinator/gang_cuts.py): a cut is a set only when every rank has taken its
piece; anything else (a late cut, a failed or lost rank, a stale report) leaves the newest complete set as what the
gang goes on from."""

from __future__ import annotations

import pytest

from coordinator.gang_cuts import AGENT_HOLD_S, CUT_TIMEOUT_S, CutSet, GangCuts

GANG, RANKS = 7, [8, 9, 10]


def test_a_cut_is_a_set_only_once_every_rank_has_taken_its_piece():
    cuts = GangCuts(60.0)
    cut = cuts.begin(GANG, RANKS, 100.0)
    assert cut.number == 1 and cut.missing == RANKS
    assert cuts.taken(GANG, 1, 10, 4, 100.01) is None
    assert cuts.taken(GANG, 1, 8, 3, 100.02) is None
    assert cuts.newest(GANG) is None and cut.missing == [9]
    done = cuts.taken(GANG, 1, 9, 5, 100.03)
    assert done == CutSet(GANG, 1, ((8, 3), (9, 5), (10, 4)), pytest.approx(0.03))
    assert cuts.newest(GANG) == done and GANG not in cuts.open


def test_stale_reports_and_strangers_are_ignored():
    cuts = GangCuts(60.0)
    cuts.begin(GANG, RANKS[:2], 0.0)
    assert cuts.taken(GANG, 2, 8, 1, 0.1) is None  # no cut 2 under way
    assert cuts.taken(GANG, 1, 99, 1, 0.1) is None  # not a rank of the cut
    assert cuts.taken(GANG + 1, 1, 8, 1, 0.1) is None  # no cut of that gang
    assert cuts.open[GANG].taken == {}
    cuts.taken(GANG, 1, 8, 1, 0.1)
    assert cuts.taken(GANG, 1, 9, 1, 0.2).number == 1
    assert cuts.taken(GANG, 1, 9, 2, 0.3) is None  # after the set: nothing under way


def test_a_late_cut_is_discarded_and_the_newest_complete_set_stays():
    cuts = GangCuts(60.0)
    cuts.begin(GANG, RANKS[:2], 0.0)
    cuts.taken(GANG, 1, 8, 1, 0.1)
    first = cuts.taken(GANG, 1, 9, 1, 0.1)
    cuts.begin(GANG, RANKS[:2], 60.0)
    cuts.taken(GANG, 2, 8, 2, 60.1)
    assert cuts.expired(60.0 + CUT_TIMEOUT_S) == []
    (late,) = cuts.expired(60.0 + CUT_TIMEOUT_S + 0.1)
    assert late.number == 2 and late.missing == [9]
    assert cuts.taken(GANG, 2, 9, 2, 66.0) is None  # its last piece comes too late: not a set
    assert cuts.newest(GANG) == first
    assert AGENT_HOLD_S > CUT_TIMEOUT_S  # an agent never resumes a rank before the coordinator gives up the cut


def test_a_rank_that_fails_its_piece_or_is_lost_discards_the_cut():
    cuts = GangCuts(60.0)
    cuts.begin(GANG, RANKS, 0.0)
    assert cuts.discard(GANG, 2) is None  # not the cut under way
    assert cuts.discard(GANG, 1).number == 1
    assert cuts.discard(GANG) is None and cuts.newest(GANG) is None
    assert cuts.begin(GANG, RANKS, 1.0).number == 2  # numbers never repeat


def test_cuts_fall_due_an_interval_apart_one_at_a_time():
    cuts = GangCuts(60.0)
    assert not cuts.due(GANG, 59.0, since=0.0) and cuts.due(GANG, 60.0, since=0.0)
    cuts.begin(GANG, RANKS, 60.0)
    assert not cuts.due(GANG, 500.0, since=0.0)  # one under way
    cuts.discard(GANG)
    assert not cuts.due(GANG, 119.0, since=0.0) and cuts.due(GANG, 120.0, since=0.0)
    cuts.restarted(GANG, 200.0)
    assert not cuts.due(GANG, 259.0, since=0.0) and cuts.due(GANG, 260.0, since=0.0)
    assert not GangCuts(0.0).due(GANG, 1e9, since=0.0)  # off
    cuts.begin(GANG, RANKS, 300.0)
    with pytest.raises(ValueError, match="under way"):
        cuts.begin(GANG, RANKS, 300.0)


def test_a_new_attempt_goes_on_from_the_set_rank_by_rank():
    done = CutSet(GANG, 3, ((8, 3), (9, 5)), 0.01)
    assert done.resume_plan([20, 21]) == {20: (8, 3), 21: (9, 5)}
    with pytest.raises(ValueError, match="2 ranks, not 3"):
        done.resume_plan([20, 21, 22])


def test_a_restarted_coordinator_keeps_the_stored_set_and_numbers_go_on_past_it():
    cuts = GangCuts(60.0)
    cuts.restored(CutSet(GANG, 4, ((8, 3), (9, 5)), 0.01))
    cuts.restored(CutSet(GANG, 2, ((8, 1), (9, 1)), 0.01))  # an older one does not replace it
    assert cuts.newest(GANG).number == 4
    assert cuts.begin(GANG, [8, 9], 0.0).number == 5
    assert cuts.forget(GANG).number == 5 and cuts.newest(GANG) is None and GANG not in cuts.open
