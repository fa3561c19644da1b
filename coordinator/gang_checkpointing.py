# SPDX-License-Identifier: GPL-2.0-or-later
"""The coordinator's side of a gang's coordinated checkpoints: cuts begun in the sweep, the agents' cut_taken
answered with cut_resume, the ranks' pieces kept aside until their set is complete, sets recorded in the store,
and a gang that loses a rank resumed, every rank, from its newest set. The decisions are
coordinator/gang_cuts.py's; this is the I/O around them, mixed into :class:`coordinator.server.Coordinator`
(whose nodes, store, checkpoints and sockets it uses)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from conode.cluster import protocol
from conode.limits import DEFAULT_DISK_BUDGET_MIB, MAX_SNAPSHOT_BYTES
from coordinator.gang_cuts import Cut, CutSet, GangCuts
from coordinator.placement import ACCEPTING_STATES
from coordinator.store import TERMINAL_STATES, Job

if TYPE_CHECKING:
    from coordinator.server import Coordinator, Node

log = logging.getLogger("coordinator")

FENCE_BEATS = 2  # heartbeats a node must send without a stopped rank before that rank may run there again
FENCE_MAX_S = 30.0  # ... or this long at most (a node that keeps listing it, or never comes back, is not waited for)


def _piece_bound(rank: Job) -> int:
    """The most a rank's piece may hold: its guest's RAM, and its disk budget if it boots a pool image (a full
    piece, uncompressed)."""
    disk_mib = (rank.disk_mib or DEFAULT_DISK_BUDGET_MIB) if rank.image else 0
    return min((rank.mem_mib + disk_mib) << 20, MAX_SNAPSHOT_BYTES)


class GangCheckpoints:
    """Mixin: the Coordinator's gang cuts."""

    cuts: GangCuts

    def _load_cuts(self: Coordinator) -> None:
        """The sets the store kept (a cut under way when a coordinator stopped is void: its agents resume their
        ranks on their own after CUT_HOLD_S, and none of its pieces joined a chain)."""
        self.cuts = GangCuts(self.checkpoint_s)
        self._held_pieces: dict[int, tuple[tuple[bytes, str, dict[str, Any]], Any]] = {}  # rank -> checked piece
        self._gang_since: dict[int, float] = {}  # gang -> when its attempt started (the coordinator's clock)
        # gang -> node -> heartbeats still to come without the gang's ranks stopped there: a gang resumed under
        # its ranks' own ids waits for them, so that no late word of a stopped rank counts for its next run
        self._fences: dict[int, dict[str, int]] = {}
        self._fenced_until: dict[int, float] = {}
        for gang, number, pieces, took_s in self.store.cut_sets():
            self.cuts.restored(CutSet(gang, number, tuple(pieces), took_s))
            job = self.store.job(gang)
            if job is not None and job.state == "queued":  # stopped before the restart: its ranks' nodes, fenced
                self._fence(gang, {rank.node for rank in self.store.ranks(gang) if rank.node})

    # --- taking cuts -------------------------------------------------------------------------------------------
    def _take_cuts(self: Coordinator) -> None:
        """In the sweep: cuts taking too long are discarded, cuts due begin (every rank running on a connected
        node whose owner is away, none moving), and the sets of ended gangs go."""
        now = self._clock()
        for cut in self.cuts.expired(now):
            self._discard_cut(cut, "late", "it took too long")
        for gang in [g for g, until in self._fenced_until.items() if now >= until]:
            log.warning("job %d: its ranks' old nodes did not let them go within %.0f s; it is placed anyway", gang,
                        FENCE_MAX_S)
            self._unfence(gang)
            self.schedule()
        for gang in [g for g in self.cuts.sets if g not in self.cuts.open]:
            job = self.store.job(gang)
            if job is None or job.state in TERMINAL_STATES:
                self._forget_cuts(gang)
        if self.checkpoint_s <= 0:
            return
        for gang in self.store.running_gangs():
            if not self.cuts.due(gang, now, self._gang_since.setdefault(gang, now)) or gang in self._fences:
                continue
            ranks = self.store.ranks(gang)
            nodes = [self.nodes.get(rank.node or "") for rank in ranks]
            if not all(node is not None and rank.state == "running" and rank.id in node.running and
                       node.state in ACCEPTING_STATES and rank.id not in self.moves.active
                       for rank, node in zip(ranks, nodes)):
                continue  # tried again next sweep
            cut = self.cuts.begin(gang, [rank.id for rank in ranks], now, sum(map(_piece_bound, ranks)))
            self.counters.gang_cuts += 1
            for rank, node in zip(ranks, nodes):
                assert node is not None
                self.server.send(node.identity, protocol.encode("checkpoint_cut", job=rank.id, cut=cut.number))

    def _cut_of(self: Coordinator, name: str, msg: dict[str, Any]) -> tuple[Job, Cut] | None:
        """The rank a cut message is about and its gang's cut under way, if the message is from the rank's node
        and about that cut."""
        self.liveness.heard(name)
        rank = self.store.job(msg["job"])
        cut = self.cuts.open.get(rank.gang) if rank is not None and rank.gang is not None else None
        if rank is None or cut is None or cut.number != msg["cut"] or rank.node != name:
            return None
        return rank, cut

    def _on_cut_ready(self: Coordinator, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        """A rank's piece of a cut is pre-copied: once every rank's is, all make their final copies."""
        found = self._cut_of(name, msg)
        if found is not None and self.cuts.ready(found[1].gang, found[1].number, found[0].id):
            self._tell_ranks(found[1], found[1].ranks, "cut_final")

    def _on_cut_taken(self: Coordinator, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        """A rank's piece of a cut is taken and its guest stands still: once every rank's is, all go on."""
        found = self._cut_of(name, msg)
        if found is None:
            self._reply(identity, "cut_resume", job=msg["job"], cut=msg["cut"])  # a cut given up: go on
            return
        rank, cut = found
        if self.cuts.taken(cut.gang, cut.number, rank.id, msg["seq"]):
            self._tell_ranks(cut, cut.ranks, "cut_resume")
            log.info("job %d: cut %d taken by its %d ranks, %.0f ms after it began; they go on", cut.gang,
                     cut.number, len(cut.ranks), (self._clock() - cut.started) * 1000)

    def _on_cut_failed(self: Coordinator, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        """A rank's piece of a cut could not be taken or sent: the cut is discarded now (its held ranks go on),
        and the next begins on schedule, rather than when this one would have timed out."""
        found = self._cut_of(name, msg)
        if found is None:
            return  # a cut given up already, or a word not from the rank's node
        rank, cut = found
        if self.cuts.failed(cut.gang, cut.number, rank.id) is not None:
            self._discard_cut(cut, "piece_failed", f"rank {rank.rank}'s piece failed: {msg['reason']}")

    def _tell_ranks(self: Coordinator, cut: Cut, ranks: list[int] | tuple[int, ...], kind: str) -> None:
        """Send each of *ranks*' nodes *kind* (cut_final, cut_resume) for *cut*."""
        for rank_id in ranks:
            node = self._rank_node(rank_id)
            if node is not None:
                self.server.send(node.identity, protocol.encode(kind, job=rank_id, cut=cut.number))

    def _rank_node(self: Coordinator, rank_id: int) -> Node | None:
        """The connected node a rank runs on, if any."""
        rank = self.store.job(rank_id)
        return self.nodes.get(rank.node or "") if rank is not None else None

    def _drop_held_pieces(self: Coordinator, ranks: tuple[int, ...]) -> None:
        """The pieces of *ranks* kept aside for a cut that will not be a set: gone."""
        for rank in ranks:
            held = self._held_pieces.pop(rank, None)
            if held is not None:
                self.checkpoints.reject(held[1])

    # --- the pieces ------------------------------------------------------------------------------------------
    def _rank_piece(self: Coordinator, tag: tuple[bytes, str, dict[str, Any]], commit: Any,
                    problem: str | None) -> bool:
        """A checked piece, if it is a gang rank's (else False): kept aside for its cut's set (all of whose
        pieces then join their chains), or refused with the cut discarded."""
        rank = self.store.job(commit.job)
        if rank is None or rank.gang is None:
            return False
        cut = self.cuts.cut_of(rank.gang, rank.id, commit.seq)
        problem = problem or (self.checkpoints.follows(commit) if cut is not None else
                              f"checkpoint piece {commit.seq} is of no cut of job {rank.gang} under way")
        if problem is not None:
            self.checkpoints.reject(commit)
            if cut is not None:
                self._discard_cut(self.cuts.discard(rank.gang) or cut, "refused",
                                  f"rank {rank.rank}'s piece: {problem}")
            else:
                self._checkpoint_refused(*tag, problem)
            return True
        assert cut is not None
        self._held_pieces[rank.id] = (tag, commit)
        done = self.cuts.kept(rank.gang, cut.number, rank.id, commit.seq, self._clock())
        if done is not None:
            self._keep_set(done)
        return True

    def _keep_set(self: Coordinator, done: CutSet) -> None:
        """Every rank's piece of a cut is in: each joins its rank's chain, and the set is recorded."""
        problems = []
        for rank, _ in done.pieces:
            (identity, name, msg), commit = self._held_pieces.pop(rank)
            problem = self.checkpoints.accept(commit)
            if problem is not None:
                problems.append(problem)
            else:
                self._reply(identity, "checkpoint_reply", job=rank, seq=commit.seq, ok=True)
        if problems:  # checked to follow their chains, yet one could not join: the chains disagree now
            self.counters.gang_cuts_discarded["refused"] += 1
            self._drop_gang_checkpoints(done.gang, f"set {done.number} could not be kept: {problems[0]}")
            return
        self.store.keep_cut(done.gang, done.number, list(done.pieces), done.took_s)
        self.counters.gang_sets += 1
        self.counters.gang_set_buckets.observe(done.took_s)
        log.info("job %d: set %d of its %d ranks kept, %.2f s after its cut began (checkpoints take %.0f MiB)",
                 done.gang, done.number, len(done.pieces), done.took_s, self.checkpoints.used / (1 << 20))

    def _discard_cut(self: Coordinator, cut: Cut, reason: str, why: str) -> None:
        """A cut given up (*reason*: one of metrics.CUT_DISCARD_REASONS; *why*: said to its ranks): its ranks
        standing still go on, its pieces are dropped, and every rank's next piece is a full one (those of this cut
        joined no chain)."""
        self.counters.gang_cuts_discarded[reason] += 1
        log.warning("job %d: cut %d discarded: %s", cut.gang, cut.number, why)
        self._tell_ranks(cut, cut.held, "cut_resume")
        self._drop_held_pieces(cut.ranks)
        for rank_id in cut.ranks:
            node = self._rank_node(rank_id)
            if node is not None:
                self.server.send(node.identity, protocol.encode(
                    "checkpoint_reply", job=rank_id, seq=cut.taken.get(rank_id, 0), ok=False,
                    reason=f"cut {cut.number} discarded: {why}"[:200]))

    def _cut_piece_refused(self: Coordinator, job_id: int, seq: int, problem: str) -> None:
        """A piece refused on arrival: if it is a rank's piece of its gang's cut under way, the cut cannot be a
        set."""
        rank = self.store.job(job_id)
        if rank is not None and rank.gang is not None and self.cuts.cut_of(rank.gang, rank.id, seq) is not None:
            self._discard_cut(self.cuts.discard(rank.gang), "refused",  # type: ignore
                              f"rank {rank.rank}'s piece: {problem}")

    def _forget_cuts(self: Coordinator, gang: int) -> None:
        cut = self.cuts.forget(gang)
        if cut is not None:
            self._drop_held_pieces(cut.ranks)
        self.store.drop_cut(gang)
        self._gang_since.pop(gang, None)
        self._unfence(gang)

    def _drop_gang_checkpoints(self: Coordinator, gang: int, why: str) -> None:
        """The gang's set cannot be gone on from: its ranks' chains go, and its next attempt starts afresh."""
        done = self.cuts.newest(gang)
        log.warning("job %d: its checkpoints are dropped: %s", gang, why)
        self._forget_cuts(gang)
        for rank, _ in done.pieces if done is not None else ():
            self.checkpoints.drop(rank)
            self._resumed.discard(rank)

    # --- going on from a set -----------------------------------------------------------------------------------
    def _gang_stopping(self: Coordinator, gang: int) -> CutSet | None:
        """The gang is about to be stopped and requeued: its cut under way is void, and if it has a set to go on
        from, the nodes running its ranks are fenced (the set, or None)."""
        cut = self.cuts.discard(gang)
        if cut is not None:
            self.counters.gang_cuts_discarded["rank_lost"] += 1
            self._drop_held_pieces(cut.ranks)
        done = self.cuts.newest(gang)
        if done is not None:
            self._fence(gang, {rank.node for rank in self.store.ranks(gang)
                               if rank.state in ("running", "vacated") and rank.node in self.nodes})
        return done

    def _fence(self: Coordinator, gang: int, nodes: set[str | None]) -> None:
        fence = {node: FENCE_BEATS for node in nodes if node is not None}
        if fence:
            self._fences[gang] = fence
            self._fenced_until[gang] = self._clock() + FENCE_MAX_S

    def _unfence(self: Coordinator, gang: int) -> None:
        self._fences.pop(gang, None)
        self._fenced_until.pop(gang, None)

    def _fence_heard(self: Coordinator, name: str, running: list[int]) -> None:
        """A heartbeat from *name*: fences of gangs whose ranks it no longer runs count it down."""
        lifted = False
        for gang, fence in list(self._fences.items()):
            if name not in fence:
                continue
            done = self.cuts.newest(gang)
            if done is not None and any(rank in running for rank, _ in done.pieces):
                fence[name] = FENCE_BEATS
                continue
            fence[name] -= 1
            if fence[name] <= 0:
                del fence[name]
            if not fence:
                self._unfence(gang)
                lifted = True
        if lifted:
            self.schedule()

    def _fence_node_lost(self: Coordinator, name: str) -> None:
        for gang, fence in list(self._fences.items()):
            fence.pop(name, None)
            if not fence:
                self._unfence(gang)

    def _resume_set(self: Coordinator, gang: int) -> CutSet | None:
        """The set a gang being placed goes on from, if every rank's chain still ends with its piece of it."""
        done = self.cuts.newest(gang)
        if done is None:
            return None
        for rank, seq in done.pieces:
            chain = self.checkpoints.chain(rank)
            if not chain or chain[-1].seq != seq:
                self._drop_gang_checkpoints(gang, f"rank {rank}'s chain no longer ends with set {done.number}")
                return None
        return done

    def _gang_placed(self: Coordinator, gang: int) -> None:
        now = self._clock()
        self._gang_since[gang] = now
        self.cuts.restarted(gang, now)
