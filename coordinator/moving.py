"""The coordinator's side of moving guests: the move messages, the admin's `migrate` and the policies that start
moves (the owner returning, a drain). The decisions are coordinator/moves.py's; this is the I/O around them,
mixed into :class:`coordinator.server.Coordinator` (whose nodes, store and sockets it uses)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from conode.cluster import protocol
from coordinator.identity import job_identities
from coordinator.moves import (GO, PREPARE, ActiveMove, MoveBook, after_node_lost, after_restart,
                              away_from_owner_load, destination, loaded_since, toward_speed, why_not_movable)
from coordinator.placement import ACCEPTING_STATES
from coordinator.store import Move

if TYPE_CHECKING:
    from coordinator.server import Coordinator, Node

log = logging.getLogger("coordinator")

LOAD_VACATED_EVERY_S = 30.0  # how often a node is asked again to load a vacated guest that has not come up


class Moving:
    """Mixin: the Coordinator's moves."""

    moves: MoveBook

    def _load_moves(self: Coordinator) -> None:
        """The moves a previous coordinator left active: those being prepared are called off (the source keeps
        the guest), handed-over ones wait for their destination."""
        self.moves = MoveBook()
        self._untold: dict[str, list[tuple[int, int, str]]] = {}  # node -> moves called off it must hear of
        self._loading: dict[int, float] = {}  # vacated job -> when its node was asked to load it
        for move in self.store.active_moves():
            reason = after_restart(move)
            if reason is not None:
                self.store.end_move(move.job, move.epoch, "aborted", reason)
                for node in (move.source, move.destination):
                    self._untold.setdefault(node, []).append((move.job, move.epoch, reason))
                log.info("move %d.%d of job %d called off: %s", move.job, move.epoch, move.job, reason)
            else:
                self.moves.start(ActiveMove(move.job, move.epoch, move.source, move.destination, GO, self._clock(),
                                            "before the restart",
                                            checkpoint=self.store.move_checkpoint(move.job, move.epoch)))

    # --- starting moves --------------------------------------------------------------------------------------
    def start_move(self: Coordinator, job_id: int, to: str | None = None, why: str = "admin") -> str:
        """Start moving *job_id*'s guest (to *to*, or where placement would put it); raise MoveRefused saying
        why it cannot move now. Returns the destination's name."""
        job = self.store.job(job_id)
        problem = why_not_movable(job, job_id in self.moves.active)
        if problem is not None:
            raise MoveRefused(problem)
        assert job is not None and job.node is not None
        source = self.nodes.get(job.node)
        if source is None:
            raise MoveRefused(f"job {job_id}'s node {job.node} is not connected")
        if to is not None and to not in self.nodes:
            raise MoveRefused(f"node {to} is not connected")
        image = self.store.image(job.image) if job.image is not None else None
        views = self._views()
        target = destination(job.mem_mib, views, source.name, image.size if image is not None else 0, to)
        if target is None:
            raise MoveRefused(f"node {to} cannot take job {job_id} now (owner present, drained, full or too small)"
                              if to is not None else f"no other node can take job {job_id} now")
        node = self.nodes[target]
        epoch = self.store.begin_move(job_id, source.name, target)
        self.moves.start(ActiveMove(job_id, epoch, source.name, target, PREPARE, self._clock(), why))
        node.incoming.add(job_id)
        self._refresh(node)
        if job.gang is not None:  # a rank: its identity is its place in its gang's
            ranks = [rank.id for rank in self.store.ranks(job.gang)]
            net = job_identities(job.gang, ranks, self.subnet, job.network)[ranks.index(job_id)].wire()
        else:
            net = job_identities(job_id, [job_id], self.subnet, job.network)[0].wire()
        disk = {"image": image.wire()} if image is not None else {}
        self.server.send(node.identity, protocol.encode("move_in", job=job_id, epoch=epoch, source_key=source.key,
                                                        mem_mib=job.mem_mib, net=net, **disk))
        log.info("job %d moving from %s to %s (%s), epoch %d", job_id, source.name, target, why, epoch)
        return target

    def _move_away(self: Coordinator, node: Node, why: str) -> int:
        """Start moving every job on *node* that can move now; how many started."""
        started = 0
        for job_id in sorted(node.running):
            if job_id in self.moves.active:
                continue
            try:
                self.start_move(job_id, why=why)
                started += 1
            except MoveRefused as exc:
                log.debug("job %d stays on %s: %s", job_id, node.name, exc)
        return started

    def _move_from_owners(self: Coordinator, node: Node | None = None) -> None:
        """The owner-return policy: guests paused on a workstation whose owner is back move to an idle one, at
        once (*node*: the one whose owner just came back) or as soon as one frees up (every node: the sweep);
        a guest vacated to its disk meanwhile is loaded to move."""
        if not self.migrate_on_owner or not self.open_nodes:
            return
        for each in [node] if node is not None else list(self.nodes.values()):
            if each.state not in ACCEPTING_STATES and each.running:
                self._move_away(each, "its owner is back")
        if node is None:
            self._load_vacated()

    def _load_vacated(self: Coordinator) -> None:
        """A guest vacated to its workstation's disk (its owner still there) is loaded, paused, to move as soon
        as a workstation is free for it (once per LOAD_VACATED_EVERY_S: the agent answers job_resumed)."""
        now = self._clock()
        vacated = self.store.vacated_jobs()
        views = self._views() if vacated else []
        for job_id in vacated:
            job = self.store.job(job_id)
            node = self.nodes.get(job.node or "") if job is not None else None
            if job is None or node is None or node.state in ACCEPTING_STATES or \
                    now - self._loading.get(job_id, -LOAD_VACATED_EVERY_S) < LOAD_VACATED_EVERY_S or \
                    destination(job.mem_mib, views, node.name) is None:
                continue
            self._loading[job_id] = now
            self.server.send(node.identity, protocol.encode("load_vacated", job=job_id))
            log.info("job %d, vacated on %s, is loaded there to move", job_id, node.name)

    def _movable_by_node(self: Coordinator) -> dict[str, list[tuple[int, int]]]:
        """Per node whose owner is away, the guests a policy may move now (those not moving: one-guest jobs and
        gangs' ranks alike, a rank keeping its identity), as (job, guest memory)."""
        jobs: dict[str, list[tuple[int, int]]] = {}
        for job in self.store.running_jobs():
            node = self.nodes.get(job.node or "")
            if node is not None and node.state in ACCEPTING_STATES and job.id not in self.moves.active:
                jobs.setdefault(node.name, []).append((job.id, job.mem_mib))
        return jobs

    def _policy_move(self: Coordinator, chosen: tuple[int, str] | None, why: str) -> None:
        if chosen is not None:
            try:
                self.start_move(chosen[0], chosen[1], why=why)
            except MoveRefused as exc:
                log.debug("job %d stays: %s", chosen[0], exc)

    def _move_to_faster(self: Coordinator) -> None:
        """The load-balancing policy (``migrate_speedup`` in coordinator.toml; off by default): a guest moves to an
        idle node that runs guests that much faster, and not again within MOVE_HOLD_S."""
        if self.migrate_speedup <= 0 or not self.open_nodes:
            return
        now = self._clock()
        views = self._views()
        self._policy_move(toward_speed(views, {name: node.speed for name, node in self.nodes.items()},
                                       self._movable_by_node(), self.migrate_speedup,
                                       lambda job: self.moves.held(job, now)), "a faster node is idle")

    def _owner_load_heard(self: Coordinator, node: Node, load: float | None) -> None:
        """A heartbeat's owner load: kept, with since when it has been above the policy's threshold."""
        node.owner_load = load
        node.loaded_since = loaded_since(node.loaded_since, load, self._clock(), self.owner_load_policy)

    def _move_from_owner_load(self: Coordinator) -> None:
        """The owner-load policy (``migrate_owner_load``, ``migrate_owner_load_s``): a guest on a workstation
        whose owner has kept busy for a while moves to one whose owner is not, and not again within
        MOVE_HOLD_S."""
        if not self.owner_load_policy.enabled or not self.open_nodes:
            return
        if not any(node.loaded_since is not None and node.running for node in self.nodes.values()):
            return  # the usual case, found without building the views
        now = self._clock()
        views = self._views()
        chosen = away_from_owner_load(views, {name: node.owner_load for name, node in self.nodes.items()},
                                      {name: node.loaded_since for name, node in self.nodes.items()},
                                      self._movable_by_node(), now, self.owner_load_policy,
                                      lambda job: self.moves.held(job, now))
        if chosen is not None:
            source = self.store.job(chosen[0])
            where = self.nodes.get(source.node or "") if source is not None else None
            load = where.owner_load if where is not None else None
            self._policy_move(chosen, "its owner's load is high" if load is None else
                              f"its owner uses {load:.2f} cores")

    # --- the move messages -----------------------------------------------------------------------------------
    def _move_of(self: Coordinator, identity: bytes, msg: dict[str, Any], role: str, name: str) -> ActiveMove | None:
        """The active move a message is about, if it comes from the node with that *role* in it and carries its
        epoch; else None, and the sender is told to drop it (a stale move)."""
        move = self.moves.current(msg["job"], msg["epoch"])
        if move is None or getattr(move, role) != name:
            log.info("refused a stale %s for job %d epoch %d from %s", msg["type"], msg["job"], msg["epoch"], name)
            self._reply(identity, "move_abort", job=msg["job"], epoch=msg["epoch"], reason="no such move now")
            return None
        return move

    def _on_move_listening(self: Coordinator, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        move = self._move_of(identity, msg, "destination", name)
        if move is None or move.state != PREPARE:
            return
        source = self.nodes.get(move.source)
        if source is None:
            self._call_off(move, f"the source node {move.source} is not connected")
            return
        self.server.send(source.identity, protocol.encode("move_out", job=move.job, epoch=move.epoch,
                                                          endpoint=msg["endpoint"], key=self.nodes[name].key))

    def _on_move_ready(self: Coordinator, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        """The destination holds the whole guest: hand it over in the store, then let the source say GO."""
        move = self._move_of(identity, msg, "source", name)
        if move is None or move.state != PREPARE:
            return
        target = self.nodes.get(move.destination)
        checkpoint = self._checkpoints_after_move(move.job)
        if target is None or not self.store.hand_over(move.job, move.epoch, checkpoint):
            self._call_off(move, "the destination is gone" if target is None else "the job no longer runs there")
            return
        move.state = GO
        move.checkpoint = checkpoint
        source = self.nodes[name]
        source.running.discard(move.job)
        target.incoming.discard(move.job)
        target.running.add(move.job)
        job = self.store.job(move.job)
        if job is not None:
            self.peers.guest_placed(job.id, self._network_of(job), target.name)
            self._tell_peers()
        self._refresh(source)
        self._refresh(target)
        self._reply(identity, "move_go", job=move.job, epoch=move.epoch)

    def _on_move_sent(self: Coordinator, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        """The source's figures, after the hand-over (the move may be done already)."""
        if self.store.move_figures(msg["job"], msg["epoch"], name, msg.get("downtime_s"), msg["total_s"],
                                   msg["bytes"]):
            downtime = msg.get("downtime_s")
            log.info("job %d moved from %s: %s downtime, %.2f s, %d bytes in %d rounds", msg["job"], name,
                     "unknown" if downtime is None else f"{downtime * 1000:.0f} ms", msg["total_s"], msg["bytes"],
                     msg["rounds"])

    def _on_move_arrived(self: Coordinator, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        move = self._move_of(identity, msg, "destination", name)
        if move is not None and move.state == GO:
            self._arrived(identity, move)

    def _arrived(self: Coordinator, identity: bytes, move: ActiveMove) -> None:
        """The guest runs on its destination: the move is done, and its checkpoints go on from there."""
        self._finish_move(move)
        if move.checkpoint is not None:
            self._reply(identity, "checkpoint_start", job=move.job, **move.checkpoint)

    def _on_move_failed(self: Coordinator, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        move = self.moves.current(msg["job"], msg["epoch"])
        if move is None or name not in (move.source, move.destination):
            return
        reason = f"{name}: {msg['reason']}"
        if move.state == PREPARE:
            self._call_off(move, reason)
        elif name == move.destination:  # handed over, yet the guest never ran there: its job runs again
            self._end_move(move, "aborted", reason)
            self._requeue(move.job, f"lost in its move to {name}: {msg['reason']}")
            node = self.nodes.get(name)
            if node is not None:
                self._release(node, move.job)
            self.schedule()

    # --- ending moves ----------------------------------------------------------------------------------------
    def _finish_move(self: Coordinator, move: ActiveMove) -> None:
        self._end_move(move, "done", None)
        log.info("job %d now runs on %s (epoch %d)", move.job, move.destination, move.epoch)

    def _end_move(self: Coordinator, move: ActiveMove, state: str, reason: str | None) -> None:
        self.store.end_move(move.job, move.epoch, state, reason)
        self.moves.end(move.job, self._clock(), moved=state == "done")
        node = self.nodes.get(move.destination)
        if node is not None and move.job in node.incoming:
            node.incoming.discard(move.job)
            self._refresh(node)

    def _call_off(self: Coordinator, move: ActiveMove, reason: str) -> None:
        """Call off a move not handed over: both nodes are told; the guest goes on at its source."""
        self._end_move(move, "aborted", reason)
        log.warning("move of job %d from %s to %s called off: %s", move.job, move.source, move.destination, reason)
        for name in (move.source, move.destination):
            node = self.nodes.get(name)
            if node is not None:
                self.server.send(node.identity, protocol.encode("move_abort", job=move.job, epoch=move.epoch,
                                                                reason=reason[:protocol.MAX_SMALL_FIELD]))
        self.schedule()

    def _job_left(self: Coordinator, job_id: int, node: str | None, ran: bool) -> None:
        """*job_id* left *node* while it moved: it ended there, failed, was vacated or cancelled (*ran*), or it
        was requeued (not *ran*). The move ends with it."""
        move = self.moves.active.get(job_id)
        if move is None:
            return
        if move.state == PREPARE:
            self._call_off(move, f"the job left {node}")
        elif ran and node == move.destination:
            self._finish_move(move)  # it ran there (its arrival report was lost)
        else:
            self._end_move(move, "aborted", f"the job was requeued from {node}")

    def _moves_on_node_lost(self: Coordinator, node: str) -> None:
        for move in self.moves.involving(node):
            reason = after_node_lost(move, node)
            if reason is None:
                continue
            if move.state == PREPARE:
                self._call_off(move, reason)
            else:
                self._end_move(move, "aborted", reason)  # its job is requeued with the node's others

    def _moves_on_hello(self: Coordinator, identity: bytes, name: str, held: set[int]) -> None:
        """A node says hello: it hears of the moves called off while the coordinator was away (the source goes
        on with the guest, the destination drops it), and a destination holding a guest handed over to it is
        done with its move."""
        for job, epoch, reason in self._untold.pop(name, []):
            self._reply(identity, "move_abort", job=job, epoch=epoch, reason=reason)
        for move in self.moves.involving(name):
            if move.state == GO and move.destination == name and move.job in held:
                self._arrived(identity, move)

    def _expire_moves(self: Coordinator) -> None:
        for move in self.moves.expired(self._clock()):
            self._call_off(move, "not handed over in time")

    # --- what admins see ---------------------------------------------------------------------------------------
    def _move_summary(self: Coordinator, moves: list[Move]) -> dict[str, Any]:
        done = [m for m in moves if m.state == "done"]
        fields: dict[str, Any] = {"moves": len(done)}
        if done:
            fields["ran_on"] = [done[0].source, *(m.destination for m in done)]
            last = done[-1]
            if last.downtime_s is not None:
                fields["last_downtime_s"] = last.downtime_s
        return fields


class MoveRefused(Exception):
    """A guest that cannot move now; the message says why."""
