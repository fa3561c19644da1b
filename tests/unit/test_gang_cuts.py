# SPDX-License-Identifier: GPL-2.0-or-later
"""Coordinated checkpoints of a gang (coordinator/gang_cuts.py): the ranks stand still until every rank's piece is
taken; a cut is a set only when every rank's piece has been kept; anything else (a late cut, a failed or lost
rank, a stale report) leaves the newest complete set as what the gang goes on from."""

from __future__ import annotations

import pytest

from coordinator.gang_cuts import CUT_TIMEOUT_S, KEEP_BYTES_PER_S, KEEP_FLOOR_S, CutSet, GangCuts, keep_timeout

GANG, RANKS = 7, [8, 9, 10]


def take_all(cuts: GangCuts, number: int, seqs: dict[int, int]) -> list[bool]:
    return [cuts.taken(GANG, number, rank, seq) for rank, seq in seqs.items()]


def test_the_ranks_resume_once_every_piece_is_taken_and_the_cut_is_a_set_once_every_piece_is_kept():
    cuts = GangCuts(60.0)
    cut = cuts.begin(GANG, RANKS, 100.0)
    assert cut.number == 1 and cut.missing == RANKS and cut.held == []
    assert take_all(cuts, 1, {10: 4, 8: 3}) == [False, False]
    assert cut.missing == [9] and cut.held == [8, 10]  # these two stand still for rank 9
    assert cuts.kept(GANG, 1, 8, 3, 100.1) is None  # arrived early: kept aside
    assert cuts.taken(GANG, 1, 9, 5) is True and cut.held == []  # all taken: resume every rank
    assert cuts.kept(GANG, 1, 10, 4, 100.2) is None and cuts.newest(GANG) is None
    done = cuts.kept(GANG, 1, 9, 5, 100.5)
    assert done == CutSet(GANG, 1, ((8, 3), (9, 5), (10, 4)), pytest.approx(0.5))
    assert cuts.newest(GANG) == done and GANG not in cuts.open


def test_the_final_copies_begin_together_once_every_rank_has_pre_copied():
    cuts = GangCuts(60.0)
    cut = cuts.begin(GANG, RANKS, 0.0)
    assert [cuts.ready(GANG, 1, rank) for rank in (8, 10, 10)] == [False, False, False]
    assert not cuts.ready(GANG, 2, 9) and not cuts.ready(GANG, 1, 99)  # another cut, a stranger
    assert cuts.ready(GANG, 1, 9) and cut.final  # the last one: every rank makes its final copy now
    assert not cuts.ready(GANG, 1, 9)  # said once


def test_stale_reports_and_strangers_are_ignored():
    cuts = GangCuts(60.0)
    cut = cuts.begin(GANG, RANKS[:2], 0.0)
    assert not cuts.taken(GANG, 2, 8, 1)  # no cut 2 under way
    assert not cuts.taken(GANG, 1, 99, 1)  # not a rank of the cut
    assert not cuts.taken(GANG + 1, 1, 8, 1)  # no cut of that gang
    assert cut.taken == {}
    assert take_all(cuts, 1, {8: 1, 9: 1}) == [False, True]
    assert not cuts.taken(GANG, 1, 9, 2)  # resumed already: said once
    assert cuts.kept(GANG, 1, 8, 0, 0.1) is None  # not the piece rank 8 took for the cut
    assert cuts.cut_of(GANG, 8, 1) is cut and cuts.cut_of(GANG, 8, 0) is None
    assert cuts.kept(GANG, 1, 8, 1, 0.1) is None and cuts.kept(GANG, 1, 9, 1, 0.2).number == 1
    assert cuts.kept(GANG, 1, 9, 1, 0.3) is None  # after the set: nothing under way


def test_a_cut_that_holds_the_guests_too_long_is_discarded_and_the_newest_set_stays():
    cuts = GangCuts(60.0)
    cuts.begin(GANG, RANKS[:2], 0.0)
    take_all(cuts, 1, {8: 1, 9: 1})
    cuts.kept(GANG, 1, 8, 1, 0.1)
    first = cuts.kept(GANG, 1, 9, 1, 0.1)
    cuts.begin(GANG, RANKS[:2], 60.0)
    cuts.taken(GANG, 2, 8, 2)
    assert cuts.expired(60.0 + CUT_TIMEOUT_S) == []
    (late,) = cuts.expired(60.0 + CUT_TIMEOUT_S + 0.1)
    assert late.number == 2 and late.missing == [9] and late.held == [8]  # rank 8 must be resumed
    assert not cuts.taken(GANG, 2, 9, 2) and cuts.kept(GANG, 2, 8, 2, 66.0) is None  # too late: not a set
    assert cuts.newest(GANG) == first


def test_pieces_that_do_not_all_arrive_in_time_are_discarded():
    cuts = GangCuts(60.0)
    cuts.begin(GANG, RANKS[:2], 0.0)  # pieces of no size: the floor
    take_all(cuts, 1, {8: 1, 9: 1})
    assert cuts.expired(CUT_TIMEOUT_S + 1) == []  # the guests run again: the pieces may take longer
    cuts.kept(GANG, 1, 8, 1, 1.0)
    assert cuts.expired(KEEP_FLOOR_S) == []
    (late,) = cuts.expired(KEEP_FLOOR_S + 0.1)
    assert late.kept == {8} and late.held == [] and cuts.newest(GANG) is None


def test_the_pieces_may_take_as_long_as_their_largest_size_takes_at_a_slow_rate():
    assert keep_timeout(0) == KEEP_FLOOR_S
    assert keep_timeout(2 * (256 << 20)) == pytest.approx(KEEP_FLOOR_S + (512 << 20) / KEEP_BYTES_PER_S)
    assert KEEP_FLOOR_S < keep_timeout(2 * (256 << 20)) < 300.0  # two 256 MiB guests: not five minutes
    cuts = GangCuts(60.0)
    cut = cuts.begin(GANG, RANKS[:2], 0.0, piece_bytes=2 * (256 << 20))
    take_all(cuts, 1, {8: 1, 9: 1})
    assert cut.keep_s == keep_timeout(2 * (256 << 20))
    assert cuts.expired(cut.keep_s) == [] and cuts.expired(cut.keep_s + 0.1) == [cut]


def test_a_rank_that_fails_its_piece_or_is_lost_discards_the_cut():
    cuts = GangCuts(60.0)
    cuts.begin(GANG, RANKS, 0.0)
    assert cuts.discard(GANG, 2) is None  # not the cut under way
    assert cuts.discard(GANG, 1).number == 1
    assert cuts.discard(GANG) is None and cuts.newest(GANG) is None
    assert cuts.begin(GANG, RANKS, 1.0).number == 2  # numbers never repeat


def test_a_piece_its_agent_could_not_take_or_send_discards_the_cut_at_once_and_the_next_comes_on_schedule():
    cuts = GangCuts(60.0)
    cut = cuts.begin(GANG, RANKS, 60.0)
    take_all(cuts, 1, {8: 1, 9: 1})
    assert cuts.failed(GANG, 2, 8) is None and cuts.failed(GANG, 1, 99) is None  # another cut, a stranger
    assert cuts.failed(GANG + 1, 1, 8) is None and GANG in cuts.open
    assert cuts.failed(GANG, 1, 10) is cut and cut.held == [8, 9]  # ranks 8 and 9 must be resumed
    assert GANG not in cuts.open and cuts.failed(GANG, 1, 10) is None  # said once
    assert cuts.kept(GANG, 1, 8, 1, 61.0) is None and cuts.newest(GANG) is None
    assert not cuts.due(GANG, 119.0, since=0.0) and cuts.due(GANG, 120.0, since=0.0)  # an interval after it began
    assert cuts.begin(GANG, RANKS, 120.0).number == 2


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


def test_a_restarted_coordinator_keeps_the_stored_set_and_numbers_go_on_past_it():
    cuts = GangCuts(60.0)
    cuts.restored(CutSet(GANG, 4, ((8, 3), (9, 5)), 0.01))
    cuts.restored(CutSet(GANG, 2, ((8, 1), (9, 1)), 0.01))  # an older one does not replace it
    assert cuts.newest(GANG).number == 4
    assert cuts.begin(GANG, [8, 9], 0.0).number == 5
    assert cuts.forget(GANG).number == 5 and cuts.newest(GANG) is None and GANG not in cuts.open
