# SPDX-License-Identifier: GPL-2.0-or-later
"""Coordinated checkpoints of a gang: which ranks have taken their piece of a cut, whether the cut is a complete
set or is discarded, and what a restarted gang goes on from. Pure: no socket, no SQL, no file.

A gang's ranks talk to each other, so their pieces must form a consistent cut (Chandy and Lamport): no rank's
piece may hold a frame that its sender's piece does not show as sent. The cut is made simple by stopping time:

1. the coordinator *begins* a cut (a number per gang) and asks every rank's agent to checkpoint;
2. each agent pauses its rank's guest, takes its piece (the incremental pieces of one-guest jobs) and says it is
   *taken*, keeping the guest paused;
3. once every rank has, the cut is a complete *set*: the coordinator tells every agent to resume. If a rank
   fails to take its piece, is lost, or the cut is not complete within CUT_TIMEOUT_S, the cut is *discarded*:
   the guests resume and its pieces are not kept.

No rank runs between the first rank's pause and the last one's piece, so no piece can hold a frame sent after
its sender's piece; a frame in flight at the pause is in no piece and is lost on a restore, which TCP retransmits.
Only a complete set is kept; a gang that loses a rank goes on, every rank, from its newest set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CUT_TIMEOUT_S = 5.0  # a cut not complete within this is discarded and its guests resume
# An agent holding a paused rank for a cut resumes it on its own after this, in case the coordinator never says.
AGENT_HOLD_S = CUT_TIMEOUT_S + 5.0


@dataclass(frozen=True)
class CutSet:
    """A complete set: every rank's piece of one cut, in rank order, as (the rank's job id, its piece number)."""

    gang: int
    number: int
    pieces: tuple[tuple[int, int], ...]
    stall_s: float  # from the cut's beginning until its last piece was taken: the longest any rank stood still

    def resume_plan(self, ranks: list[int]) -> dict[int, tuple[int, int]]:
        """Per rank job id of a new attempt (in rank order), the earlier rank whose chain it goes on from and
        that chain's last piece."""
        if len(ranks) != len(self.pieces):
            raise ValueError(f"gang {self.gang}'s set {self.number} has {len(self.pieces)} ranks, not {len(ranks)}")
        return dict(zip(ranks, self.pieces))


@dataclass
class Cut:
    """A cut under way: the ranks (job ids, in rank order) asked to take their piece, and those that did."""

    gang: int
    number: int
    ranks: tuple[int, ...]
    started: float
    taken: dict[int, int] = field(default_factory=dict)  # rank job id -> its piece number

    @property
    def missing(self) -> list[int]:
        return [rank for rank in self.ranks if rank not in self.taken]


class GangCuts:
    """Every gang's cut under way and newest complete set."""

    def __init__(self, interval_s: float, timeout_s: float = CUT_TIMEOUT_S) -> None:
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.open: dict[int, Cut] = {}
        self.sets: dict[int, CutSet] = {}
        self._numbers: dict[int, int] = {}  # gang -> its last cut's number
        self._last_begun: dict[int, float] = {}

    def due(self, gang: int, now: float, since: float) -> bool:
        """Whether a cut of *gang* (running since *since*) should begin now: none under way, and an interval
        since its last cut began (or since it started)."""
        if self.interval_s <= 0 or gang in self.open:
            return False
        return now - self._last_begun.get(gang, since) >= self.interval_s

    def begin(self, gang: int, ranks: list[int], now: float) -> Cut:
        """A new cut of *gang*, whose ranks (job ids, in rank order) are now asked to take their piece."""
        if gang in self.open:
            raise ValueError(f"gang {gang} has cut {self.open[gang].number} under way")
        number = max(self._numbers.get(gang, 0), self.sets[gang].number if gang in self.sets else 0) + 1
        self._numbers[gang] = number
        self._last_begun[gang] = now
        cut = Cut(gang, number, tuple(ranks), now)
        self.open[gang] = cut
        return cut

    def taken(self, gang: int, number: int, rank: int, seq: int, now: float) -> CutSet | None:
        """Rank *rank* took its piece *seq* of cut *number*: the complete set if it was the last one; None while
        others are missing, or for a cut not under way (stale, discarded) or a rank not in it."""
        cut = self.open.get(gang)
        if cut is None or cut.number != number or rank not in cut.ranks:
            return None
        cut.taken[rank] = seq
        if cut.missing:
            return None
        del self.open[gang]
        done = CutSet(gang, number, tuple((r, cut.taken[r]) for r in cut.ranks), now - cut.started)
        self.sets[gang] = done
        return done

    def discard(self, gang: int, number: int | None = None) -> Cut | None:
        """Call off *gang*'s cut under way (only if it is cut *number*, when given): a rank failed to take its
        piece, or was lost. The cut, whose paused ranks must resume and whose pieces are not kept; or None."""
        cut = self.open.get(gang)
        if cut is None or (number is not None and cut.number != number):
            return None
        return self.open.pop(gang)

    def expired(self, now: float) -> list[Cut]:
        """The cuts not complete within the timeout, discarded."""
        late = [gang for gang, cut in self.open.items() if now - cut.started > self.timeout_s]
        return [self.open.pop(gang) for gang in late]

    def restored(self, done: CutSet) -> None:
        """A set the store kept (a restarted coordinator)."""
        if done.gang not in self.sets or self.sets[done.gang].number < done.number:
            self.sets[done.gang] = done

    def newest(self, gang: int) -> CutSet | None:
        """What *gang* goes on from if it loses a rank: its newest complete set (None: it starts afresh)."""
        return self.sets.get(gang)

    def forget(self, gang: int) -> Cut | None:
        """The gang ended: its sets go (and the cut under way, returned, whose guests are gone with it)."""
        self.sets.pop(gang, None)
        self._numbers.pop(gang, None)
        self._last_begun.pop(gang, None)
        return self.open.pop(gang, None)

    def restarted(self, gang: int, now: float) -> None:
        """The gang starts again (from its newest set or afresh): the cut under way is void, and the next is due
        an interval from now."""
        self.open.pop(gang, None)
        self._last_begun[gang] = now
