# SPDX-License-Identifier: GPL-2.0-or-later
"""Coordinated checkpoints of a gang: which ranks have taken their piece of a cut, whether the cut is a complete
set or is discarded, and what a restarted gang goes on from. Pure: no socket, no SQL, no file.

A gang's ranks talk to each other, so their pieces must form a consistent cut (Chandy and Lamport): no rank's
piece may hold a frame that its sender's piece does not show as sent. The cut is made simple by stopping time:

1. the coordinator *begins* a cut (a number per gang) and asks every rank's agent to checkpoint;
2. each rank's worker pre-copies its piece (the incremental pieces of one-guest jobs), the guest running, and
   says it is *ready*; once every rank is, the coordinator tells them all to make their final copies, so that
   no rank stands still while another pre-copies (a full piece reads all its RAM);
3. each worker stops its guest, makes the final copy and says its piece is *taken*, keeping the guest stopped;
4. once every rank's is taken, the coordinator tells every agent to resume: the guests stood still from their
   own final copy until then (the cut's *stall*: about a round trip to the coordinator);
5. the pieces arrive and are checked as a one-guest job's are; each is *kept* aside, not in its rank's chain,
   until every rank's is: then the cut is a complete *set*, and every piece joins its chain at once.

If a rank fails to take or send its piece (its agent says so), a piece is refused, a rank is lost, or a step
takes too long (CUT_TIMEOUT_S while guests are held, :func:`keep_timeout` for the pieces to arrive), the cut is
*discarded*: held guests resume, and its pieces are dropped; every rank's chain still ends at the newest set. The
next cut begins an interval after the discarded one did.

No rank runs between its own final copy and the last rank's, so no piece can hold a frame sent after its sender's
piece was taken; a frame in flight at a final copy is in no piece and is lost on a restore, which TCP
retransmits. Only a complete set is kept; a gang that loses a rank goes on, every rank under its own id (the
pieces and the guests in them are the ranks'), from its newest set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from conode.cluster.protocol import CUT_HOLD_S

CUT_TIMEOUT_S = 5.0  # a cut whose pieces are not all taken within this is discarded and its guests resume
assert CUT_HOLD_S > CUT_TIMEOUT_S  # an agent resumes a held rank on its own only after the cut is given up
# A cut whose pieces have not all been kept within keep_timeout() of its beginning is discarded. A piece that an
# agent cannot take or send is said at once (cut_failed); this catches what no agent can say (a word lost with its
# link, an agent that stalls), so it need not be long: what the pieces may hold at a slow rate, with a floor.
KEEP_FLOOR_S = 30.0  # the pre-copies, the writing of small pieces and their checks on a busy coordinator
KEEP_BYTES_PER_S = 8 << 20  # well below a 100 Mbit/s LAN's 11.9 MiB/s: pieces are compressed, and deltas small


def keep_timeout(piece_bytes: int) -> float:
    """How long a cut may take to have every piece kept, when its pieces together hold at most *piece_bytes*
    (every rank's guest RAM and disk budget: what a full piece holds, uncompressed). Bounded by the largest
    pieces, not by the pieces expected, so that a cut is never discarded for being full (the next cut after a
    discarded one is full: a bound it could not meet would keep a gang without a set for good); sent over the
    coordinator's own link, so the pieces of all ranks add up."""
    return KEEP_FLOOR_S + piece_bytes / KEEP_BYTES_PER_S


@dataclass(frozen=True)
class CutSet:
    """A complete set: every rank's piece of one cut, in rank order, as (the rank's job id, its piece number):
    every rank's chain ends with it."""

    gang: int
    number: int
    pieces: tuple[tuple[int, int], ...]
    took_s: float  # from the cut's beginning until its last piece was kept


@dataclass
class Cut:
    """A cut under way: the ranks (job ids, in rank order) asked to take their piece, and those that did."""

    gang: int
    number: int
    ranks: tuple[int, ...]
    started: float
    keep_s: float  # how long after it began its pieces may take to be kept (keep_timeout)
    ready: set[int] = field(default_factory=set)  # the ranks whose piece is pre-copied
    final: bool = False  # every rank's is: they were told to make their final copies
    taken: dict[int, int] = field(default_factory=dict)  # rank job id -> its piece number, final copy made
    kept: set[int] = field(default_factory=set)  # the ranks whose piece has arrived and passed its check
    resumed: bool = False  # every piece taken: the guests were told to resume

    @property
    def missing(self) -> list[int]:
        """The ranks whose piece is not taken yet (while these are missing, the others stand still)."""
        return [rank for rank in self.ranks if rank not in self.taken]

    @property
    def held(self) -> list[int]:
        """The ranks standing still for this cut: those that took their piece, until the cut resumes them."""
        return [] if self.resumed else [rank for rank in self.ranks if rank in self.taken]


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

    def begin(self, gang: int, ranks: list[int], now: float, piece_bytes: int = 0) -> Cut:
        """A new cut of *gang*, whose ranks (job ids, in rank order) are now asked to take their piece, which
        together hold at most *piece_bytes*."""
        if gang in self.open:
            raise ValueError(f"gang {gang} has cut {self.open[gang].number} under way")
        number = max(self._numbers.get(gang, 0), self.sets[gang].number if gang in self.sets else 0) + 1
        self._numbers[gang] = number
        self._last_begun[gang] = now
        cut = Cut(gang, number, tuple(ranks), now, keep_timeout(piece_bytes))
        self.open[gang] = cut
        return cut

    def _of(self, gang: int, number: int, rank: int) -> Cut | None:
        cut = self.open.get(gang)
        return cut if cut is not None and cut.number == number and rank in cut.ranks else None

    def ready(self, gang: int, number: int, rank: int) -> bool:
        """Rank *rank* pre-copied its piece of cut *number*: whether every rank now has, and all must be told to
        make their final copies (once). False too for a cut not under way or a rank not in it."""
        cut = self._of(gang, number, rank)
        if cut is None or cut.final:
            return False
        cut.ready.add(rank)
        cut.final = len(cut.ready) == len(cut.ranks)
        return cut.final

    def taken(self, gang: int, number: int, rank: int, seq: int) -> bool:
        """Rank *rank* made the final copy of its piece *seq* of cut *number* (and stands still): whether every
        rank now has, and all must be told to resume. False too for a cut not under way (stale, discarded) or a
        rank not in it."""
        cut = self._of(gang, number, rank)
        if cut is None or cut.resumed:
            return False
        cut.taken[rank] = seq
        cut.resumed = not cut.missing
        return cut.resumed

    def kept(self, gang: int, number: int, rank: int, seq: int, now: float) -> CutSet | None:
        """Rank *rank*'s piece *seq* of cut *number* arrived and passed its check: the complete set if it was the
        last one; None while others are missing, or for a piece that is not the one the rank took for the cut
        under way (the coordinator drops it)."""
        cut = self._of(gang, number, rank)
        if cut is None or cut.taken.get(rank) != seq:
            return None
        cut.kept.add(rank)
        if not cut.resumed or len(cut.kept) < len(cut.ranks):
            return None
        del self.open[gang]
        done = CutSet(gang, number, tuple((r, cut.taken[r]) for r in cut.ranks), now - cut.started)
        self.sets[gang] = done
        return done

    def cut_of(self, gang: int, rank: int, seq: int) -> Cut | None:
        """The cut under way for which *rank* took piece *seq* (a rank's piece belongs to a cut or to none)."""
        cut = self.open.get(gang)
        return cut if cut is not None and cut.taken.get(rank) == seq else None

    def failed(self, gang: int, number: int, rank: int) -> Cut | None:
        """Rank *rank*'s piece of cut *number* could not be taken or sent (its agent says): the cut, discarded
        at once, whose held ranks must resume and whose pieces are dropped; None for a cut not under way (stale,
        discarded already) or a rank not in it."""
        return self.open.pop(gang) if self._of(gang, number, rank) is not None else None

    def discard(self, gang: int, number: int | None = None) -> Cut | None:
        """Call off *gang*'s cut under way (only if it is cut *number*, when given): a rank failed to take its
        piece, its piece was refused, or a rank was lost. The cut, whose held ranks must resume and whose
        pieces are dropped; or None."""
        cut = self.open.get(gang)
        if cut is None or (number is not None and cut.number != number):
            return None
        return self.open.pop(gang)

    def expired(self, now: float) -> list[Cut]:
        """The cuts discarded for taking too long: pieces not all taken within the timeout (the others stand
        still meanwhile), or not all kept within the cut's keep_s."""
        late = [gang for gang, cut in self.open.items()
                if now - cut.started > (cut.keep_s if cut.resumed else self.timeout_s)]
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
