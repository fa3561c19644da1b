"""Moving running guests between nodes: the move's state machine and when to move. Pure: no socket, no SQL.

A move of a job's guest from its *source* node to a *destination*:

1. ``prepare`` (recorded in the store with the job's next ownership *epoch*): the destination is told to listen
   for the source (``move_in``), answers with its endpoint (``move_listening``), the source is told where to send
   (``move_out``) and streams the guest while it runs, straight to the destination over CURVE;
2. the source says ``move_ready`` when the destination holds all of it (the guest now paused): the coordinator
   commits the hand-over (the job is the destination's, in the same transaction as the move) and only then
   answers ``move_go``; the source sends GO to the destination, which starts the guest;
3. the destination says ``move_arrived``: the move is ``done``.

Exactly once: before the hand-over is committed any failure (either node lost, the link, a timeout, the
coordinator restarting) calls the move off and the guest goes on at the source; after it the destination owns
the guest, and losing it is losing a node (the job runs again). Every move message carries the epoch; one that
does not match the job's active move is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from coordinator.placement import NodeView, can_take_work, choose_node
from coordinator.store import Job, Move

MOVE_TIMEOUT_S = 60.0  # a move not handed over within this is called off; the guest stays on its source
MOVE_HOLD_S = 60.0  # a guest moved by a policy is not moved again by a policy within this (hysteresis)
# The owner-load policy's defaults: a guest moves away from a workstation whose owner has used more than this
# share of a core for OWNER_LOAD_PERSIST_S (the agents' own default start_max_load: a load at which a workstation
# would not start guests) ...
OWNER_LOAD = 0.3
OWNER_LOAD_PERSIST_S = 10.0
# ... to one whose owner uses less than this fraction of it: a band, so that a load near the threshold never
# sends a guest to a node from which it would move straight on.
OWNER_LOAD_BAND = 0.5
PREPARE, GO = "prepare", "go"


@dataclass
class ActiveMove:
    job: int
    epoch: int
    source: str
    destination: str
    state: str  # prepare | go
    started: float  # the coordinator's clock
    why: str  # owner, admin, drain, ... (for the log)
    # What the destination's checkpoints go on from, fixed at the hand-over (None: the job takes none)
    checkpoint: dict[str, Any] | None = None


class MoveBook:
    """The moves in progress, and when each job last moved (for the hysteresis)."""

    def __init__(self) -> None:
        self.active: dict[int, ActiveMove] = {}
        self.last_moved: dict[int, float] = {}

    def start(self, move: ActiveMove) -> None:
        self.active[move.job] = move

    def current(self, job: int, epoch: int) -> ActiveMove | None:
        """The job's active move if *epoch* is its epoch; None for a stale or unknown one."""
        move = self.active.get(job)
        return move if move is not None and move.epoch == epoch else None

    def end(self, job: int, now: float, moved: bool) -> ActiveMove | None:
        move = self.active.pop(job, None)
        if moved:
            self.last_moved[job] = now
        return move

    def involving(self, node: str) -> list[ActiveMove]:
        return [m for m in self.active.values() if node in (m.source, m.destination)]

    def expired(self, now: float) -> list[ActiveMove]:
        """Moves still being prepared after MOVE_TIMEOUT_S: to be called off."""
        return [m for m in self.active.values() if m.state == PREPARE and now - m.started > MOVE_TIMEOUT_S]

    def held(self, job: int, now: float) -> bool:
        """Whether a policy must leave *job* where it is (it moved less than MOVE_HOLD_S ago)."""
        return now - self.last_moved.get(job, -MOVE_HOLD_S) < MOVE_HOLD_S


def why_not_movable(job: Job | None, moving: bool) -> str | None:
    """Why a job's guest cannot move now, or None."""
    if job is None:
        return "no such job"
    if job.guests > 1 and job.gang is None:
        return (f"job {job.id} has {job.guests} guests; move them one at a time, each by its rank's own id (the "
                f"ids `coordinator status` lists on their nodes)")
    if job.state != "running" or job.node is None:
        return f"job {job.id} is {job.state}, not running on a node"
    if moving:
        return f"job {job.id} is already moving"
    return None


def destination(mem_mib: int, nodes: list[NodeView], source: str, image_bytes: int = 0,
                to: str | None = None) -> str | None:
    """Where a guest of *mem_mib* running on *source* may go now (only *to*, if given): a node that could take
    the job as a new one (owner away, not drained, a free slot, enough memory), idle ones first."""
    candidates = [n for n in nodes if n.name != source and (to is None or n.name == to)]
    return choose_node(mem_mib, candidates, image_bytes)


def toward_speed(nodes: list[NodeView], speeds: dict[str, float], jobs: dict[str, list[tuple[int, int]]],
                 speedup: float, held: Callable[[int], bool]) -> tuple[int, str] | None:
    """Load balancing, as openMosix moved work toward free capacity: a job (and where to) whose guest would run
    at least *speedup* times faster on an idle node than where it runs, or None. *jobs*: per node, its movable
    jobs as (job, guest memory); *held* says which jobs moved too recently to move again (the hysteresis). The
    slowest node's job goes first, to the fastest idle node; one move at a time."""
    idle = sorted((n for n in nodes if n.running == 0 and can_take_work(n)), key=lambda n: -speeds.get(n.name, 0))
    if speedup <= 0 or not idle:
        return None
    for node in sorted((n for n in nodes if jobs.get(n.name)), key=lambda n: speeds.get(n.name, 0)):
        slow = speeds.get(node.name, 0.0)
        for job, mem_mib in jobs[node.name]:
            if held(job):
                continue
            for target in idle:
                if target.mem_mib >= mem_mib and slow > 0 and speeds.get(target.name, 0.0) >= speedup * slow:
                    return job, target.name
    return None


@dataclass(frozen=True)
class OwnerLoadPolicy:
    """When the owner's own load moves a guest away (``migrate_owner_load`` and ``migrate_owner_load_s``)."""

    threshold: float = OWNER_LOAD  # the owner's cores above which a workstation's guests move (0: never)
    persist_s: float = OWNER_LOAD_PERSIST_S  # ... once the load has stayed above it this long
    band: float = OWNER_LOAD_BAND  # a destination's owner load must be below threshold × band

    @property
    def enabled(self) -> bool:
        return self.threshold > 0


def loaded_since(previous: float | None, load: float | None, now: float, policy: OwnerLoadPolicy) -> float | None:
    """Since when a node's owner load has been above the threshold, given its latest reading *load* (None: not
    measured, which counts as below: an agent that cannot tell never sends guests away)."""
    if not policy.enabled or load is None or load <= policy.threshold:
        return None
    return now if previous is None else previous


def away_from_owner_load(nodes: list[NodeView], loads: dict[str, float | None], since: dict[str, float | None],
                         jobs: dict[str, list[tuple[int, int]]], now: float, policy: OwnerLoadPolicy,
                         held: Callable[[int], bool]) -> tuple[int, str] | None:
    """Load balancing by the owner's own load, as openMosix moved work away from a busy node: a job (and where
    to) running on a workstation whose owner has used more than the threshold for *persist_s*, to an idle one
    whose owner uses less than threshold × band; or None. *loads*: each node's last owner load (None: unknown);
    *since*: when each went above the threshold (:func:`loaded_since`); *jobs*: per node, its movable jobs as
    (job, guest memory); *held*: the jobs that moved too recently to move again. The most loaded owner's guest
    goes first, to the node whose owner is the least busy; one move at a time."""
    if not policy.enabled:
        return None

    def persisting(name: str) -> bool:
        start = since.get(name)
        return start is not None and now - start >= policy.persist_s

    quiet = [n for n in nodes if n.running == 0 and can_take_work(n) and not persisting(n.name)
             and (load := loads.get(n.name)) is not None and load < policy.threshold * policy.band]
    quiet.sort(key=lambda n: (loads[n.name], n.name))
    busy = sorted((n for n in nodes if jobs.get(n.name) and persisting(n.name)),
                  key=lambda n: (-(loads.get(n.name) or 0.0), n.name))
    for node in busy:
        for job, mem_mib in jobs[node.name]:
            if held(job):
                continue
            for target in quiet:
                if target.name != node.name and target.mem_mib >= mem_mib:
                    return job, target.name
    return None


def after_restart(move: Move) -> str | None:
    """What a coordinator that restarted does with a move its store left active: the reason to call it off
    (a move being prepared: its source keeps the guest), or None to wait for the destination (handed over)."""
    if move.state == PREPARE:
        return "the coordinator restarted during the move; the guest stays on its source"
    return None


def after_node_lost(move: ActiveMove, node: str) -> str | None:
    """What losing *node* does to *move*: the reason to call it off, or None when the move stands (the guest was
    handed over and its source is gone: it runs on at the destination). Losing the destination after the
    hand-over is losing the node that owns the guest: its job runs again, like any job of a lost node."""
    if move.state == PREPARE:
        side = "source" if node == move.source else "destination"
        return f"the {side} node {node} was lost during the move"
    if node == move.destination:
        return f"the destination node {node} was lost after the hand-over"
    return None
