"""The coordinator daemon: node registry, job queue and placement behind one ROUTER socket.

Single-threaded: one poll loop receives messages, answers them, places queued jobs and expires silent nodes.
Job state lives in SQLite (store.py) and is committed before it is acted on; the node registry lives in memory
and is rebuilt from the agents' hellos after a restart. The queued jobs are also indexed in memory (queue.py),
and the nodes that can take work now are kept in placement's order (placement.OpenNodes), so that placement
costs nothing per waiting job, nothing at all while the pool is full, and a look at the first open nodes only.
The nodes' liveness is a timer heap (liveness.py): a heartbeat only stamps a time, and housekeeping touches only
the nodes whose expiry came due. Nothing is sent to the agents on a timer: ZeroMQ's own heartbeats, answered in
its I/O thread, tell them the coordinator is there.

Time and the socket are injected: a test drives :meth:`Coordinator.handle` and :meth:`Coordinator.housekeeping`
with a fake clock and an in-memory transport.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import zmq

from conode import output_cap
from conode.cluster import protocol
from conode.cluster.keys import is_valid_public_key
from conode.cluster.protocol import ProtocolError
from conode.cluster.transport import ServerSocket
from conode.errors import ConodeError
from conode.limits import IMAGE_CHUNK_BYTES, MAX_FILES, MAX_JOB_INPUT_BYTES, MAX_JOB_OUTPUT_BYTES
from conode.metrics import Buckets
from coordinator import arrays, launch
from coordinator.checkpoints import CheckpointStore
from coordinator.config import RELAY_OFF, StateDir
from coordinator.conet_peers import PeerDirectory
from coordinator.down import DownNode, DownNodes, unknown_node
from coordinator.gang_checkpointing import GangCheckpoints
from coordinator.images import ChunkError, ChunkStore, check_image_name
from coordinator.identity import check_network_name, guest_subnet, job_identities, network_name
from coordinator.liveness import Liveness
from coordinator.metrics import GANG_SET_BOUNDS, PLACEMENT_LATENCY_BOUNDS
from coordinator.moving import MoveRefused, Moving
from coordinator.outgoing import Outgoing, Transport
from coordinator.pending import Request, never_fits, why_waiting
from coordinator.placement import ACCEPTING_STATES, NodeView, OpenNodes, choose_gang
from coordinator.queue import JobQueue, QueuedJob
from coordinator.relay import Relay
from coordinator.store import JOB_STATES, TERMINAL_STATES, Job, Store, Submission, Task
from coordinator.users import USER, Requester, check_user_name, may_manage, may_send, not_yours, refusal

log = logging.getLogger("coordinator")

HOUSEKEEPING_EVERY_S = 0.1
# A loop turn begins at least this long after the one before: what arrives meanwhile is handled together, for one
# wakeup of the loop (and of ZeroMQ's hand-over to it) and one commit, instead of one per message; a message waits
# at most this much longer. With thousands of agents beating, the wakeups, not the messages, were the cost.
TURN_S = 0.005
KEY_CACHE_MAX = 100_000  # enrolled keys remembered in front of SQLite (emptied when full: a bound, not a policy)
MAX_ATTEMPTS = 3  # a job whose node is lost this many times fails instead of running again
VACATED_HOLD_S = 3600.0  # a job saved on a node's disk waits this long for its owner to leave again
MAX_JOBS_LISTED = 1000  # jobs in one `jobs` reply
LISTED_ARGV_BYTES = 1024  # a listed job's command beyond this shows its first arguments only
ORPHAN_GRACE_S = protocol.HEARTBEAT_INTERVAL_S * protocol.HEARTBEAT_LIVENESS * 2
# Image chunks are served between everything else: requests wait in a queue (bounded: an agent keeps at most
# IMAGE_FETCH_WINDOW in flight, so more is a misbehaving one) and each loop turn reads and sends chunks for at most
# CHUNK_TURN_S, so that a pool of agents fetching an image never keeps heartbeats or submissions waiting long.
CHUNK_TURN_S = 0.02
MAX_CHUNK_REQUESTS = 8192
GANG_LOGS_NOTE = b"\n[conode: the ranks' output together is longer than one reply; see each with --rank]\n"
FOLLOW_REPLY_BYTES = 4 << 20  # output in one reply to a followed `logs`


@dataclass
class Node:
    """What the coordinator knows about one connected agent."""

    name: str
    identity: bytes
    key: str
    cores: int
    mem_mib: int
    speed: float
    software: str
    state: str = "Unclaimed"
    idle_s: float = 0.0
    away_since: float = 0.0  # when its owner left, on the coordinator's clock
    cpu_percent: float = 0.0
    owner_load: float | None = None  # the owner's own CPU use, in cores (None: the agent cannot tell)
    loaded_since: float | None = None  # since when that has been above the owner-load policy's threshold
    running: set[int] = field(default_factory=set)
    incoming: set[int] = field(default_factory=set)  # jobs moving here, not yet handed over (a slot each)
    connected_at: float = 0.0  # wall-clock time of its hello
    last_placed: float = 0.0
    image_cache_mib: int | None = None  # the most of the pool's images it keeps on disk; None: unsaid

    def view(self, drained: bool) -> NodeView:
        return NodeView(self.name, self.state, self.cores, self.mem_mib, len(self.running) + len(self.incoming),
                        self.away_since, drained, self.last_placed, self.image_cache_mib)


@dataclass
class Counters:
    received: int = 0
    malformed: int = 0
    refused: int = 0
    placed: int = 0
    requeued: int = 0
    nodes_lost: int = 0
    migrations: int = 0
    placement_latency_s: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))
    placement_buckets: Buckets = field(default_factory=lambda: Buckets(PLACEMENT_LATENCY_BOUNDS))
    gang_cuts: int = 0  # cuts of gangs begun
    gang_sets: int = 0  # ... that became sets
    gang_cuts_discarded: Counter[str] = field(default_factory=Counter)  # ... discarded, by CUT_DISCARD_REASONS
    gang_set_buckets: Buckets = field(default_factory=lambda: Buckets(GANG_SET_BOUNDS))  # a set's cut to kept


def _count(items: list[Any], noun: str) -> str:
    """"1 job", "3 jobs"."""
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def wall_clock_from(clock: Callable[[], float]) -> Callable[[], float]:
    """Wall-clock time that advances with *clock* (monotonic, or a test's fake): what records are stamped with."""
    offset = time.time() - clock()
    return lambda: offset + clock()


class Coordinator(Moving, GangCheckpoints):
    def __init__(self, state: StateDir, bind: str | None = None, context: zmq.Context | None = None,
                 clock: Callable[[], float] = time.monotonic, transport: Transport | None = None,
                 relay: str = RELAY_OFF) -> None:
        """*relay*: where the conet relay listens (coordinator/relay.py), or "off"."""
        state.require()
        state.make_private()
        self.state = state
        self._clock = clock
        self._wall = wall_clock_from(clock)
        self.store = Store(state.database, clock=self._wall)
        self.chunks = ChunkStore(state.chunks)
        self.checkpoint_s = state.checkpoint_interval_s()
        self.checkpoints = CheckpointStore(state.checkpoints, state.checkpoint_budget_mib() << 20)
        self._resumed: set[int] = set()  # jobs whose attempt now goes on from their checkpoint
        self._refused_piece: dict[int, tuple[str, int]] = {}  # job -> the last piece refused, and whose (said once)
        self._chunk_requests: deque[tuple[bytes, str, bytes]] = deque()  # (identity, node, digest)
        self._auth_store: Store | None = None
        if transport is None:
            self._auth_store = auth_store = Store(state.database, clock=self._wall)  # the ZAP thread's own
            transport = ServerSocket(context or zmq.Context.instance(), bind or state.default_bind(),
                                     state.server_keys(), lambda key: auth_store.key_owner(key) is not None)
        self.server = Outgoing(transport)
        self.relay: Relay | None = None
        self._relay_store: Store | None = None
        if relay != RELAY_OFF:
            self._start_relay(relay)
        self.subnet = guest_subnet(state.conet_subnet())
        self.peers = PeerDirectory()
        self._sender_key = ""  # the CURVE key of the message being handled
        self._requester = Requester("", "")  # and its enrolled name and role
        self.nodes: dict[str, Node] = {}
        self.by_identity: dict[bytes, str] = {}
        self.open_nodes = OpenNodes()  # nodes that can take a job now (see placement.can_take_work)
        self.liveness = Liveness(clock, protocol.HEARTBEAT_INTERVAL_S,
                                 protocol.HEARTBEAT_INTERVAL_S * protocol.HEARTBEAT_LIVENESS)
        self.queue = JobQueue(self.store.queued())
        self.drained = self.store.drained()
        self.migrate_on_owner = state.migrate_on_owner()
        self.migrate_speedup = state.migrate_speedup()
        self.owner_load_policy = state.owner_load_policy()
        self._load_moves()
        self._load_cuts()
        self.down = DownNodes()  # nodes that left, shown by status until they return or are forgotten
        self._capacity: list[tuple[int, int]] | None = None  # (cores, memory) of the nodes up or down, when asked
        self._largest_mem = 0
        self.counters = Counters()
        self._started = clock()
        self._queued_at: dict[int, float] = {}
        self._next_housekeeping = clock()
        self._next_sweep = clock()
        # Each key's enrolment as last read from SQLite, kept until the database changes: this process's own key
        # changes drop their entry, and another process's (`coordinator keys add|remove`) show in data_version.
        self._key_cache: dict[str, Requester | None] = {}
        self._keys_seen_at = self.store.data_version()
        self._running = True
        self._handlers: dict[str, Callable[[bytes, str, dict[str, Any]], None]] = {
            name[len("_on_"):]: getattr(self, name) for name in dir(self) if name.startswith("_on_")
        }

    # --- the loop ----------------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        server = self.server.transport
        assert isinstance(server, ServerSocket), "serve_forever needs the ZeroMQ transport"
        log.info("coordinator listening on %s", server.endpoint)
        poller = zmq.Poller()
        poller.register(server.socket, zmq.POLLIN)
        caught_up, turn_began = True, 0.0
        try:
            while self._running:
                rest = turn_began + TURN_S - time.monotonic()
                if rest > 0 and caught_up and not self._chunk_requests:
                    time.sleep(rest)
                turn_began = time.monotonic()
                events = dict(poller.poll(timeout=0 if self._chunk_requests else 200))
                caught_up = True
                with self.turn():
                    if server.socket in events:
                        for _ in range(1000):  # drain what is there, but keep the housekeeping going
                            try:
                                received = server.receive_nowait()
                            except zmq.Again:
                                break
                            if received is not None:
                                self.handle(*received)
                        else:
                            caught_up = False
                    if self._clock() >= self._next_housekeeping:
                        self._next_housekeeping = self._clock() + HOUSEKEEPING_EVERY_S
                        self.housekeeping(caught_up)
                self.serve_chunks()
                self.checkpoints_checked()
        finally:
            self.close()

    @contextmanager
    def turn(self) -> Iterator[None]:
        """One loop turn's job transitions in one SQLite commit (group commit: one fsync for all of them), and
        what it sends held back until that commit, so that nothing is said of a transition not yet durable. A node
        a held message could not reach is lost then (in a turn of its own: its jobs go elsewhere)."""
        self.server.hold()
        try:
            with self.store.grouped():
                yield
        except BaseException:
            self.server.discard()  # stopping: perhaps not committed, so not said
            raise
        unreachable = self.server.release()
        while unreachable:
            self.server.hold()
            with self.store.grouped():
                for identity in unreachable:
                    name = self.by_identity.get(identity)
                    if name is not None:
                        self._lose_node(self.nodes[name], "unreachable")
            unreachable = self.server.release()

    def stop(self) -> None:
        self._running = False

    def close(self) -> None:
        if self.relay is not None:
            self.relay.stop()
        self.server.close()
        self.checkpoints.close()
        self.store.close()
        for store in (self._auth_store, self._relay_store):
            if store is not None:
                store.close()

    def _start_relay(self, bind: str) -> None:
        """Start the conet relay in its thread; without it (its port is taken, say) the pool runs on, and
        agents that cannot reach each other have no conet between them."""
        self._relay_store = relay_store = Store(self.state.database, clock=self._wall)  # its ZAP thread's own

        def is_agent(key: str) -> bool:
            owner = relay_store.key_owner(key)
            return owner is not None and owner[1] == "agent"

        try:
            self.relay = Relay(bind, self.state.server_keys(), is_agent, self._clock).start()
        except ConodeError as exc:
            log.warning("no conet relay: %s; set conet_relay in %s to a free endpoint, or to \"off\"", exc,
                        self.state.settings)

    # --- dispatch ----------------------------------------------------------------------------------------
    def handle(self, identity: bytes, key: str, payload: bytes) -> None:
        self.counters.received += 1
        try:
            message = protocol.decode(payload)
        except ProtocolError as exc:
            self.counters.malformed += 1
            log.warning("malformed message from %s: %s", key[:8] or "?", exc)
            self.server.send(identity, protocol.error("malformed", str(exc)))
            return
        kind = message["type"]
        requester = self._key_owner(key)
        role = requester.role if requester is not None else None
        sender, _ = protocol.SCHEMAS[kind]
        if not may_send(role, sender):
            self.counters.refused += 1
            log.warning("refused %s from %s key %s", kind, role or "unknown", key[:8])
            self.server.send(identity, protocol.error("forbidden", refusal(role, requester and requester.name, kind),
                                                      kind))
            return
        if role == "agent" and kind not in ("hello", "image_chunk_get") and self.by_identity.get(identity) is None:
            # A node we do not know (we restarted, or it was declared lost): it must introduce itself again.
            # Its results come again from its outbox, but live output would not: keep what belongs to a job
            # the store says runs there.
            if kind == "job_output":
                self._keep_output(requester.name, message)  # type: ignore[union-attr]
            self.server.send(identity, protocol.encode("reconnect", reason="unknown node, say hello"))
            return
        self._sender_key = key
        self._requester = requester  # type: ignore[assignment]
        try:
            self._handlers[kind](identity, requester.name, message)  # type: ignore[union-attr]
        except Exception as exc:  # one bad request must not take the pool down
            log.exception("error handling %s", kind)
            self.server.send(identity, protocol.error("internal", f"{type(exc).__name__}: {exc}", kind))

    def _key_owner(self, key: str) -> Requester | None:
        """The enrolled name and role of *key* (None: not enrolled), from the cache in front of SQLite."""
        try:
            return self._key_cache[key]
        except KeyError:
            pass
        if len(self._key_cache) >= KEY_CACHE_MAX:
            self._key_cache.clear()
        owner = self.store.key_owner(key)
        requester = self._key_cache[key] = Requester(*owner) if owner is not None else None
        return requester

    def _keys_checked(self) -> None:
        """Forget the cached enrolments when another process has written the database (a key added or revoked
        with `coordinator keys`): its next message is checked against SQLite again."""
        version = self.store.data_version()
        if version != self._keys_seen_at:
            self._keys_seen_at = version
            self._key_cache.clear()

    def _reply(self, identity: bytes, kind: str, **fields: Any) -> None:
        self.server.send(identity, protocol.encode(kind, **fields))

    # --- agents ------------------------------------------------------------------------------------------
    def _node_of(self, identity: bytes) -> Node:
        return self.nodes[self.by_identity[identity]]

    def _on_hello(self, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        if msg["node"] != name:
            self._reply(identity, "error", code="forbidden",
                        message=f"this key is enrolled as node {name!r}, not {msg['node']!r}", in_reply_to="hello")
            return
        old = self.nodes.get(name)
        if old is not None and old.identity != identity:
            self.by_identity.pop(old.identity, None)
        held = set(msg["running"])
        for guest in old.running - held if old is not None else ():
            self.queue.shares.stopped(guest)  # what it held before and holds no more (reconciled below)
        node = Node(name, identity, self._sender_key, msg["cores"], msg["mem_mib"], msg["speed"], msg["software"],
                    msg["state"], msg["idle_s"], self._clock() - msg["idle_s"], connected_at=self._wall(),
                    image_cache_mib=msg.get("image_cache_mib"))
        self.nodes[name] = node
        self.liveness.add(name)
        self.by_identity[identity] = name
        self.down.returned(name)
        self._capacity = None
        vacated_here = set(self.store.vacated_jobs(name))
        # Reconcile: jobs we placed there that the node no longer has are lost; jobs it runs that we do not
        # expect there (cancelled, or re-placed while it was away) are told to stop.
        node.incoming = {m.job for m in self.moves.involving(name) if m.destination == name and m.state == "prepare"}
        for job in self.store.running_jobs(name):
            if job.id in held:
                self._occupy(node, job.id, job.owner)
            else:
                self._requeue(job.id, f"node {name} restarted without it")
        self._moves_on_hello(identity, name, held)
        if self._fences:
            self._fence_heard(name, msg["running"])
        for job_id in held - node.running - vacated_here - node.incoming:
            self._reply(identity, "cancel_job", job=job_id)
        self._reply(identity, "welcome", heartbeat_s=protocol.HEARTBEAT_INTERVAL_S)
        self.peers.node_joined(name, msg.get("conet"), node.key)
        for job in self.store.running_jobs(name):
            self.peers.guest_placed(job.id, self._network_of(job), name)
        self._tell_peers()
        log.info("node %s joined: %d cores, %d MiB, speed %.0f, %s", name, node.cores, node.mem_mib, node.speed,
                 node.state)
        self._refresh(node)
        self.schedule()

    def _on_heartbeat(self, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        node = self._node_of(identity)
        self.liveness.heard(node.name)
        was_accepting = node.state in ACCEPTING_STATES
        node.state = msg["state"]
        node.idle_s = msg["idle_s"]
        node.away_since = self._clock() - node.idle_s
        node.cpu_percent = float(msg.get("cpu_percent", 0.0))
        self._owner_load_heard(node, msg.get("owner_load"))
        if self._fences:
            self._fence_heard(node.name, msg["running"])
        node.speed = float(msg.get("speed", node.speed))
        if was_accepting != (node.state in ACCEPTING_STATES):
            self._refresh(node)
            if node.state not in ACCEPTING_STATES:
                self._move_from_owners(node)  # its owner is back: its guests move away now
            self.schedule()  # the owner left: queued work may go there now

    def _on_bye(self, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        node = self._node_of(identity)
        self._lose_node(node, "node said goodbye")

    def _on_job_output(self, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        node = self._node_of(identity)
        self.liveness.heard(node.name)
        job = msg["job"]
        if job in node.running and msg["stream"] in ("stdout", "stderr"):
            self.store.append_output(job, msg["stream"], msg["data"])

    def _keep_output(self, name: str, msg: dict[str, Any]) -> None:
        """Output from node *name* before it said hello again: stored if the job runs there by the store."""
        job = self.store.job(msg["job"])
        if job is not None and job.state == "running" and job.node == name and msg["stream"] in ("stdout", "stderr"):
            self.store.append_output(job.id, msg["stream"], msg["data"])

    def _on_job_finished(self, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        node = self._node_of(identity)
        self.liveness.heard(node.name)
        job_id = msg["job"]
        job = self.store.job(job_id)
        if job is not None and job.state == "running" and job.node == name:
            outputs = dict(msg["outputs"])
            missing = msg["missing"]
            reason = f"missing outputs: {', '.join(missing)}" if missing else None
            self.store.finish(job_id, "done", msg["status"], reason, outputs, cpu_s=msg["runtime_s"])
            log.info("job %d done on %s: status %d in %.1f s", job_id, name, msg["status"], msg["runtime_s"])
            if job.gang is not None:
                self._gang_progress(job.gang)
        self._release(node, job_id)
        self._reply(identity, "ack", job=job_id)
        self.schedule()

    def _on_job_vacated(self, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        node = self._node_of(identity)
        self._release(node, msg["job"])
        job = self.store.job(msg["job"])
        if job is not None and job.state == "running" and job.node == name:
            self.store.mark_vacated(job.id)
            log.info("job %d vacated: saved on %s until its owner leaves again", job.id, name)
        self.schedule()

    def _on_job_resumed(self, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        node = self._node_of(identity)
        job = self.store.job(msg["job"])
        if job is not None and job.state == "vacated" and job.node == name:
            self.store.mark_resumed(job.id)
            self._occupy(node, job.id, job.owner)
            self.peers.guest_placed(job.id, self._network_of(job), name)
            self._tell_peers()
            log.info("job %d resumed on %s", job.id, name)
            self._loading.pop(job.id, None)
            self._move_from_owners(node)  # loaded to move away from its owner, perhaps
        else:
            self.server.send(identity, protocol.encode("cancel_job", job=msg["job"]))

    def _on_job_failed(self, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        node = self._node_of(identity)
        self.liveness.heard(node.name)
        job_id = msg["job"]
        job = self.store.job(job_id)
        self._release(node, job_id)
        # A vacated job fails on its node when its saved guest cannot be resumed there.
        if job is not None and job.state in ("running", "vacated") and job.node == name:
            if job_id in self._resumed and job.gang is not None:  # a rank: its gang's set cannot be gone on from
                self._drop_gang_checkpoints(job.gang, f"rank {job.rank} could not go on from it: {msg['reason']}")
            elif job_id in self._resumed:  # it could not go on from its checkpoint: the next attempt starts afresh
                self._resumed.discard(job_id)
                self.checkpoints.drop(job_id)
                log.warning("job %d: its checkpoint is dropped: %s", job_id, msg["reason"])
            if msg["retry"] and job.attempts < MAX_ATTEMPTS:
                self._requeue(job_id, f"failed on {name}: {msg['reason']}")
            else:
                self.store.finish(job_id, "failed", None, msg["reason"])
                log.warning("job %d failed on %s: %s", job_id, name, msg["reason"])
                if job.gang is not None:
                    self._gang_progress(job.gang)
        self._reply(identity, "ack", job=job_id)
        self.schedule()

    # --- admins ------------------------------------------------------------------------------------------
    def _on_status(self, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        nodes = [{
            "name": n.name, "state": n.state, "cores": n.cores, "mem_mib": n.mem_mib, "speed": n.speed,
            "jobs": sorted(n.running), "idle_s": n.idle_s, "drained": n.name in self.drained,
            "cpu_percent": n.cpu_percent, "owner_load": n.owner_load, "software": n.software,
            "moving_in": sorted(n.incoming), "moving_out": sorted(m.job for m in self.moves.involving(n.name)
                                                               if m.source == n.name),
        } for n in sorted(self.nodes.values(), key=lambda n: n.name)]
        counts = self.store.job_counts()
        totals = {
            "nodes": len(nodes),
            "cores": sum(n.cores for n in self.nodes.values()),
            "idle_cores": sum(n.cores - len(n.running) for n in self.nodes.values()
                              if n.state in ("Unclaimed", "Claimed") and n.name not in self.drained),
            "mem_mib": sum(n.mem_mib for n in self.nodes.values()),
            "jobs": {state: counts.get(state, 0) for state in JOB_STATES},
            "moving": len(self.moves.active),
            "malformed_messages": self.counters.malformed,
            "refused_messages": self.counters.refused,
        }
        if self.relay is not None:
            totals["conet_relay"] = self.relay.stats()
        self._reply(identity, "status_reply", nodes=nodes, totals=totals, down=self.down.rows())

    def _on_submit(self, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        problem, image = self._submission_problem(msg)
        if problem is None:
            submission, tasks, problem = self._submission(msg, name, image)
        if problem is not None:
            self._reply(identity, "error", code="not-found" if problem.startswith("no image") else "invalid",
                        message=problem, in_reply_to="submit")
            return
        ids = self.store.add_jobs(submission, tasks, array="items" in msg)
        now = self._clock()
        for job_id in ids:
            self.queue.add(QueuedJob(job_id, submission.mem_mib, submission.guests,
                                     image.size if image is not None else 0, name, submission.priority))
            self._queued_at[job_id] = now
        what = f"jobs {ids[0]}-{ids[-1]} (an array of {len(ids)})" if "items" in msg else f"job {ids[0]}"
        log.info("%s submitted by %s: %s", what, name, " ".join(msg["argv"])[:200])
        self._reply(identity, "submitted", job=ids[0], **({"jobs": ids} if "items" in msg else {}))
        self.schedule()

    def _submission_problem(self, msg: dict[str, Any]) -> tuple[str | None, Any]:
        """Why a submission is refused before its tasks are looked at (and the image it runs on)."""
        if not msg["argv"]:
            return "a job needs a command", None
        network = msg.get("network")
        problem = check_network_name(network) if network is not None else None
        if problem:
            return problem, None
        image = self.store.image(msg["image"]) if "image" in msg else None
        if "image" in msg and image is None:
            return f"no image named {msg['image']!r}; see `coordinator image list`", None
        if "disk_mib" in msg and image is None:
            return "a disk budget is for a job on an image: give the image too (--image NAME)", None
        if "items" in msg and not msg["items"]:
            return "an array needs at least one item", None
        return self._never_fits(Request(msg["mem_mib"], msg.get("guests", 1))), image

    def _never_fits(self, request: Request) -> str | None:
        """Why no node the coordinator knows could run *request*, once every enrolled node has been seen (one not
        seen yet may offer more). Costs nothing per node for the common request: one guest that some node fits."""
        if self._capacity is None:
            self._capacity = [(n.cores, n.mem_mib) for n in self.nodes.values()] + self.down.capacities()
            self._largest_mem = max((mem for _, mem in self._capacity), default=0)
        if request.guests == 1 and request.mem_mib <= self._largest_mem:
            return None
        problem = never_fits(request, self._capacity)
        if problem is not None and self.store.agent_count() > len(self._capacity):
            return None
        return problem

    def _submission(self, msg: dict[str, Any], name: str,
                    image: Any) -> tuple[Submission, list[Task], str | None]:
        """The submission and its tasks (one, or an array's), or why they cannot run."""
        inputs, modes = dict(msg["inputs"]), dict(msg.get("modes", {}))
        if "stdin" in msg:
            if launch.STDIN_INPUT in inputs:
                return None, [], f"{launch.STDIN_INPUT} is the name stdin is staged under; rename that input"
            inputs[launch.STDIN_INPUT] = msg["stdin"]
        total = sum(len(data) for data in inputs.values())
        if total > MAX_JOB_INPUT_BYTES:
            return None, [], f"the inputs and stdin take {total} bytes; a job's may take at most {MAX_JOB_INPUT_BYTES}"
        stray = sorted(set(modes) - set(inputs))
        if stray:
            return None, [], f"a mode is given for {stray[0]!r}, which is not an input"
        submission = Submission(inputs, modes, msg["mem_mib"], name, msg.get("guests", 1), msg.get("network"),
                                msg.get("image"), msg.get("disk_mib"), msg.get("timeout_s"), msg.get("priority", 0))
        task = Task(list(msg["argv"]), dict(msg.get("env", {})), list(msg["outputs"]))
        tasks = arrays.expand(task, msg["items"]) if "items" in msg else [task]
        for index, each in enumerate(tasks):
            what = f"task {index} of the array" if "items" in msg else "the job"
            problem = protocol.argv_problem(launch.guest_argv(each.argv, each.env, modes, "stdin" in msg))
            if problem is not None:
                return None, [], f"{what}: its command with its environment {problem}"
            bad = next((path for path in each.wanted if not protocol.is_safe_relative_path(path)), None)
            if bad is not None:
                return None, [], f"{what}: output {bad[:80]!r} is not a relative path inside the job directory"
        return submission, tasks, None

    def _why_waiting(self, job: Job) -> str:
        image = self.store.image(job.image) if job.image is not None else None
        request = Request(job.mem_mib, job.guests, image.size if image is not None else 0)
        return why_waiting(request, self._views())

    def _job_summary(self, job: Any, listing: bool | str = False,
                     why: dict[tuple[int, int, str | None], str] | None = None,
                     moves: list | None = None) -> dict[str, Any]:
        summary = job.summary()
        summary.update(self._move_summary(moves if moves is not None else self.store.moves([job.id]).get(job.id, [])))
        if job.id in self.moves.active:
            summary["moving_to"] = self.moves.active[job.id].destination
        if job.guests > 1 and not listing:
            summary["ranks"] = [{"rank": r.rank, "id": r.id, "node": r.node, "state": r.state,
                                 "exit_status": r.exit_status, "reason": r.reason} for r in self.store.ranks(job.id)]
        if job.state == "held":
            summary["why"] = "held"
        elif job.state == "queued":
            key = (job.mem_mib, job.guests, job.image)
            cached = why.get(key) if why is not None else None
            summary["why"] = cached or self._why_waiting(job)
            if why is not None:
                why[key] = summary["why"]
        if listing == "history" and job.guests > 1:
            summary["nodes"] = sorted({r.node for r in self.store.ranks(job.id) if r.node})
        node = self.nodes.get(job.node or "")
        if job.state == "running" and node is not None and node.state in ("Suspended", "Vacating"):
            summary["state"] = "suspended"  # its guest is paused while the workstation's owner works
        if listing and len(job.argv) > 1 and protocol.argv_bytes(job.argv) > LISTED_ARGV_BYTES:
            # A list of long commands must still fit one reply; `job` gives the whole command.
            kept, size = [job.argv[0]], protocol.argv_bytes(job.argv[:1])
            for arg in job.argv[1:]:
                size += protocol.argv_bytes([arg])
                if size > LISTED_ARGV_BYTES:
                    break
                kept.append(arg)
            summary["argv"], summary["argv_truncated"] = kept, True
        return summary

    def _on_jobs(self, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        limit = max(0, min(int(msg.get("limit", MAX_JOBS_LISTED)), MAX_JOBS_LISTED))
        states = tuple(msg.get("states", ()))
        unknown = [state for state in states if state not in JOB_STATES]
        if unknown:
            self._reply(identity, "error", code="invalid", in_reply_to="jobs",
                        message=f"no job state {unknown[0][:40]!r}; states are {', '.join(JOB_STATES)}")
            return
        history = bool(msg.get("history"))
        if history:
            states = tuple(s for s in states if s in TERMINAL_STATES) or TERMINAL_STATES
        jobs = self.store.jobs(states or None, limit=limit, newest_first=True, by_finish=history,
                               owner=msg.get("user"))
        why: dict[tuple[int, int, str | None], str] = {}  # the same request waits for the same reason
        listing = "history" if history else True
        moves = self.store.moves([job.id for job in jobs])
        self._reply(identity, "jobs_reply", jobs=[self._job_summary(job, listing, why, moves.get(job.id, []))
                                                  for job in jobs])

    def _job_or_error(self, identity: bytes, job_id: int, kind: str) -> Any:
        job = self.store.job(job_id)
        if job is None:
            self._reply(identity, "error", code="not-found", message=f"no job {job_id}", in_reply_to=kind)
        return job

    def _managed_job(self, identity: bytes, job_id: int, kind: str) -> Job | None:
        """The job a job-changing request (*kind*) names, if the requester may change it (users: their own);
        else None, the error already answered."""
        job = self._job_or_error(identity, job_id, kind)
        if job is not None and not may_manage(self._requester, job.owner):
            self._reply(identity, "error", code="forbidden", in_reply_to=kind,
                        message=not_yours(self._requester, job.id, job.owner, kind))
            return None
        return job

    def _managed_jobs(self, identity: bytes, msg: dict[str, Any], kind: str) -> list[Job] | None:
        """The job a job-changing request names or, with ``array``, every job of the array it belongs to (one
        submission, so one owner); None if the requester may not change it, the error already answered."""
        job = self._managed_job(identity, msg["job"], kind)
        if job is None or not msg.get("array"):
            return None if job is None else [job]
        if job.array_id is None:
            self._reply(identity, "error", code="invalid", in_reply_to=kind,
                        message=f"job {job.id} is not part of an array; {kind} it without --array")
            return None
        return self.store.array_jobs(job.array_id)

    def _on_job(self, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        job = self._job_or_error(identity, msg["job"], "job")
        if job is not None:
            self._reply(identity, "job_reply", job=self._job_summary(job))

    def _guests_asked(self, identity: bytes, msg: dict[str, Any], kind: str) -> list[tuple[int, int]] | None:
        """(rank, id) of the guests a per-job request is about: every rank of a gang in order, or the one asked
        for with ``rank``; a one-guest job is its own rank 0."""
        job = self._job_or_error(identity, msg["job"], kind)
        if job is None:
            return None
        guests = [(r.rank, r.id) for r in self.store.ranks(job.id)] if job.guests > 1 else [(0, job.id)]
        if "rank" in msg:
            guests = [(rank, ident) for rank, ident in guests if rank == msg["rank"]]
            if not guests:
                self._reply(identity, "error", code="not-found", in_reply_to=kind,
                            message=f"job {job.id} has no rank {msg['rank']} (it has {job.guests} guest(s))")
                return None
        return guests

    def _on_logs(self, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        guests = self._guests_asked(identity, msg, "logs")
        if guests is None:
            return
        if "after" in msg:  # following: what was stored since the cursor
            if len(guests) > 1:
                self._reply(identity, "error", code="invalid", in_reply_to="logs",
                            message="a job of several guests is followed one rank at a time (give rank)")
                return
            since = self.store.output_since(guests[0][1], msg["after"], FOLLOW_REPLY_BYTES)
            self._reply(identity, "logs_reply", job=msg["job"], cursor=since.cursor, more=since.more,
                        stdout_at=since.at["stdout"], stderr_at=since.at["stderr"], restarted=since.restarted,
                        **since.streams)
            return
        streams = {"stdout": bytearray(), "stderr": bytearray()}
        for rank, ident in guests:
            output = self.store.output(ident)
            for stream, data in output.items():
                if len(guests) > 1 and data:
                    data = f"==> rank {rank} <==\n".encode() + data
                kept = output_cap.clip(len(streams[stream]), data, output_cap.DOWNSTREAM_LIMIT)
                streams[stream] += kept
                if len(kept) < len(data) and not streams[stream].endswith(GANG_LOGS_NOTE):
                    streams[stream] += GANG_LOGS_NOTE
        self._reply(identity, "logs_reply", job=msg["job"], stdout=bytes(streams["stdout"]),
                    stderr=bytes(streams["stderr"]))

    def _on_fetch(self, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        guests = self._guests_asked(identity, msg, "fetch")
        if guests is None:
            return
        outputs: dict[str, bytes] = {}
        for rank, ident in guests:
            for path, data in self.store.files(ident).items():
                outputs[f"rank{rank}/{path}" if len(guests) > 1 else path] = data
        total = sum(len(data) for data in outputs.values())
        if total > MAX_JOB_OUTPUT_BYTES or len(outputs) > MAX_FILES:
            self._reply(identity, "error", code="too-large", in_reply_to="fetch",
                        message=f"the ranks' outputs take {len(outputs)} files, {total} bytes together; fetch them "
                                f"one rank at a time (--rank)")
            return
        self._reply(identity, "fetch_reply", job=msg["job"], outputs=outputs)

    def _on_cancel(self, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        jobs = self._managed_jobs(identity, msg, "cancel")
        if jobs is None:
            return
        ending = [job for job in jobs if job.state not in TERMINAL_STATES]
        for job in ending:
            self._end(job, "cancelled", f"cancelled by {name}")
        if msg.get("array"):
            ended = len(jobs) - len(ending)
            self._reply(identity, "ok", detail=f"array {jobs[0].array_id}: {_count(ending, 'job')} cancelled"
                                               + (f" ({ended} had already ended)" if ended else ""))
        elif ending:
            self._reply(identity, "ok", detail=f"job {jobs[0].id} cancelled")
        else:
            self._reply(identity, "ok", detail=f"job {jobs[0].id} is already {jobs[0].state}")
        self.schedule()

    def _end(self, job: Job, state: str, reason: str) -> None:
        """End a job not yet ended: out of the queue, or stopped where it runs (every rank of a gang)."""
        self._stop_ranks(job, f"job {job.id} {state}: {reason}")
        self.store.finish(job.id, state, None, reason)
        self.queue.remove(job.id)
        self._queued_at.pop(job.id, None)
        node = self.nodes.get(job.node or "")
        if job.state in ("running", "vacated") and node is not None:
            self._release(node, job.id)
            self.server.send(node.identity, protocol.encode("cancel_job", job=job.id))

    def _on_hold(self, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        self._hold(identity, msg, True)

    def _on_release(self, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        self._hold(identity, msg, False)

    def _hold(self, identity: bytes, msg: dict[str, Any], held: bool) -> None:
        kind = "hold" if held else "release"
        jobs = self._managed_jobs(identity, msg, kind)
        if jobs is None:
            return
        changed = [job for job in jobs if job.gang is None and self.store.set_held(job.id, held)]
        if not changed:
            rule = "only a queued job can be held" if held else "only a held job can be released"
            what = (f"no job of array {jobs[0].array_id} is {'queued' if held else 'held'}" if msg.get("array")
                    else f"job {jobs[0].id} is {jobs[0].state}")
            self._reply(identity, "error", code="invalid", in_reply_to=kind, message=f"{what}; {rule}")
            return
        for job in changed:
            if held:
                self.queue.remove(job.id)
            else:
                self._enqueue(job)
        done = "held" if held else "released"
        if msg.get("array"):
            others = len(jobs) - len(changed)
            self._reply(identity, "ok", detail=f"array {jobs[0].array_id}: {_count(changed, 'job')} {done}" + (
                f" ({others} {'were' if others > 1 else 'was'} not {'queued' if held else 'held'})" if others else ""))
        else:
            self._reply(identity, "ok", detail=f"job {jobs[0].id} {done}")
        if not held:
            self.schedule()

    def _on_migrate(self, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        try:
            target = self.start_move(msg["job"], msg.get("to"), why=f"asked by {name}")
        except MoveRefused as exc:
            self._reply(identity, "error", code="not-movable", message=str(exc), in_reply_to="migrate")
            return
        self._reply(identity, "ok", detail=f"job {msg['job']} is moving to {target}")

    def _on_drain(self, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        node, drain = msg["node"], not msg.get("undrain", False)
        names = self._node_names() | (set() if drain else self.drained)
        if node not in names:
            self._reply(identity, "error", code="unknown_node", message=unknown_node(node, names), in_reply_to="drain")
            return
        self.store.set_drained(node, drain)
        self.drained = self.store.drained()
        moving = ""
        if node in self.nodes:
            self._refresh(self.nodes[node])
            if drain and msg.get("migrate"):
                moving = f"; moving {self._move_away(self.nodes[node], 'its node is drained')} of its " \
                         f"{len(self.nodes[node].running)} jobs"
        known = "" if node in self.nodes else " (not connected now)"
        self._reply(identity, "ok",
                    detail=f"node {node} {'drained' if drain else 'accepting jobs again'}{known}{moving}")
        self.schedule()

    def _node_names(self) -> set[str]:
        """Every node an admin may name: up, down, or enrolled (a node may be drained before it first joins)."""
        enrolled = {name for name, role, _, _ in self.store.keys() if role == "agent"}
        return set(self.nodes) | self.down.names() | enrolled

    def _on_forget(self, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        node = msg["node"]
        if node in self.nodes:
            self._reply(identity, "error", code="node_up", in_reply_to="forget",
                        message=f"node {node} is up; only a down node can be forgotten (stop its agent first)")
        elif self.down.forget(node):
            self._capacity = None
            self._reply(identity, "ok", detail=f"node {node} forgotten")
        else:
            self._reply(identity, "error", code="unknown_node", in_reply_to="forget",
                        message=unknown_node(node, self.down.names()))

    # --- users -------------------------------------------------------------------------------------------
    def _on_user_add(self, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        problem = check_user_name(msg["name"])
        if problem is None and not is_valid_public_key(msg["public_key"]):
            problem = "that is not a CURVE public key (40 Z85 characters)"
        if problem is None:
            try:
                self.store.add_key(msg["name"], USER, msg["public_key"])
            except ConodeError as exc:
                problem = str(exc)
        if problem is not None:
            self._reply(identity, "error", code="invalid", message=problem, in_reply_to="user_add")
            return
        self._key_cache.pop(msg["public_key"], None)  # it may have been tried, and refused, a moment ago
        log.info("user %s added by %s", msg["name"], name)
        self._reply(identity, "ok", detail=f"user {msg['name']} added")

    def _on_users(self, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        shares = self.queue.shares
        self._reply(identity, "users_reply", users=[
            {"name": user, "public_key": key, "added_at": added, "queued": self.queue.queued(user),
             "running": shares.running(user)} for user, role, key, added in self.store.keys() if role == USER])

    def _on_user_rm(self, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        keys = {user: (role, key) for user, role, key, _ in self.store.keys()}
        role, key = keys.get(msg["name"], (None, ""))
        if role != USER:
            why = (f"no user named {msg['name']!r}; see `coordinator user list`" if role is None else
                   f"{msg['name']} is an {role} key, not a user (`coordinator keys remove` on the coordinator host)")
            self._reply(identity, "error", code="not-found", message=why, in_reply_to="user_rm")
            return
        self.store.remove_key(msg["name"])
        self._key_cache.pop(key, None)  # refused from its next request on, not after the cache's delay
        log.info("user %s removed by %s", msg["name"], name)
        self._reply(identity, "ok", detail=f"user {msg['name']} removed; their jobs stay as they are")

    # --- placement and liveness --------------------------------------------------------------------------
    def _views(self) -> list[NodeView]:
        """What placement and the move policies see of every connected node."""
        return [node.view(name in self.drained) for name, node in self.nodes.items()]

    def _refresh(self, node: Node) -> None:
        """Keep *node*'s place among the open nodes true after anything that changes whether it can take work or
        how it ranks for the next job."""
        if self.nodes.get(node.name) is node:
            self.open_nodes.update(node.view(node.name in self.drained))
        else:
            self.open_nodes.discard(node.name)

    def _occupy(self, node: Node, guest: int, owner: str) -> None:
        """The node runs *guest* of a job of *owner*'s (placed, resumed, or found there after a restart)."""
        node.running.add(guest)
        self.queue.shares.started(guest, owner)
        self._refresh(node)

    def _release(self, node: Node, job_id: int) -> None:
        """The node no longer runs *job_id* (finished, failed, vacated, cancelled)."""
        node.running.discard(job_id)
        self.queue.shares.stopped(job_id)
        self.peers.guest_gone(job_id)
        self._refresh(node)
        self._job_left(job_id, node.name, ran=True)

    def schedule(self) -> None:
        """Place queued jobs on nodes that can take them, in the queue's fair order (queue.py); a gang all at
        once or not at all.

        Only the open nodes are looked at, and only while some have room: with the pool full, a submission
        costs no placement work at all, however long the queue; a one-guest job looks at the open nodes in
        placement's order up to the first that fits.
        """
        if not self.open_nodes or not len(self.queue):
            return
        largest: tuple[int, int, int] | None = None  # most guest memory, slots and image cache, found when needed
        placed: list[int] = []
        unreachable: list[Node] = []
        for job_id in self.queue:
            if not self.open_nodes:
                break
            if job_id in self._fences:
                continue  # a gang to go on from its set: its ranks' old nodes have not yet let them go
            queued = self.queue.get(job_id)
            mem_mib, guests, image_bytes = queued.mem_mib, queued.guests, queued.image_bytes
            if guests == 1:
                single = self.open_nodes.choose(mem_mib, image_bytes)
                chosen = None if single is None else [single]
            else:
                chosen = choose_gang(mem_mib, guests, self.open_nodes.views(), image_bytes)
            if chosen is None:
                if largest is None:
                    largest = (max(n.mem_mib for n in self.nodes.values()),
                               sum(n.cores for n in self.nodes.values()),
                               max(n.view(False).image_bytes for n in self.nodes.values()))
                if mem_mib > largest[0] or guests > largest[1] or image_bytes > largest[2]:
                    continue  # bigger or more nodes may join later: keep it queued, try the next job
                break  # nodes are busy: later jobs wait their turn
            nodes = [self.nodes[name] for name in chosen]
            failed = self._place(job_id, nodes)
            if failed is None:
                placed.append(job_id)
            else:
                unreachable.append(failed)
                self.open_nodes.discard(failed.name)  # lost below; offered nothing more meanwhile
        for job_id in placed:
            self.queue.remove(job_id)
        for node in unreachable:
            self._lose_node(node, "unreachable")

    def _network_of(self, job: Job) -> str:
        return network_name(job.gang if job.gang is not None else job.id, job.network)

    def _tell_peers(self) -> None:
        """Send the agents whose guests' networks changed the conet switches they must now reach (and the relay,
        for those they cannot reach); the relay forwards only between them."""
        relay = {"relay": self.relay.endpoint} if self.relay is not None else {}
        for name, peers in self.peers.changes().items():
            node = self.nodes.get(name)
            if node is not None:
                if self.relay is not None:
                    self.relay.set_peers(node.key, name, [peer["key"] for peer in peers])
                self.server.send(node.identity, protocol.encode("conet_peers", peers=peers, **relay))

    def _place(self, job_id: int, nodes: list[Node]) -> Node | None:
        """Send a queued job to its node (a gang: rank i to nodes[i]); the node that could not be reached
        (the job then still queued), else None.

        None means the job left the queue: placed, or failed because it breaks the limits (only a job queued
        by an older coordinator can).
        """
        job = self.store.job(job_id)
        assert job is not None and job.state == "queued", job_id
        inputs, modes = self.store.job_files_in(job_id)
        argv = launch.guest_argv(job.argv, job.env or {}, modes, launch.STDIN_INPUT in inputs)
        disk = self._job_disk(job)
        resume = self.checkpoints.chain(job_id) if job.guests == 1 else []
        if job.owner:  # shown by the agent's status: whose job runs on that workstation
            disk = {**disk, "owner": job.owner}
        own_fields = dict(disk)
        if self.checkpoint_s > 0 and job.guests == 1:
            own_fields["checkpoint_s"] = self.checkpoint_s
        if resume:
            own_fields["resume"] = [link.wire() for link in resume]
        try:  # a one-guest job's own message; for a gang, one check of the limits covers every rank's message,
            # as they differ only in their identities (small, and valid by construction)
            own = job_identities(job_id, [job_id], self.subnet, job.network)[0]
            checked = protocol.encode("run_job", job=job_id, argv=argv, inputs=inputs, outputs=job.wanted,
                                      mem_mib=job.mem_mib, net=own.wire(), **own_fields)
        except ProtocolError as exc:
            self.store.finish(job_id, "failed", None, f"not runnable within the pool's limits: {exc}")
            log.warning("job %d failed: not runnable within the pool's limits: %s", job_id, exc)
            return None
        resume_set = self._resume_set(job_id) if job.guests > 1 else None
        if resume_set is not None:  # its ranks go on from their pieces of the set, under their own ids
            guests = [rank for rank, _ in resume_set.pieces]
            self.store.resume_gang(job_id, guests, [node.name for node in nodes])
            for rank in guests:
                self.store.truncate_output(rank, self.checkpoints.outputs(rank))
            self._resumed.update(guests)
        elif job.guests > 1:
            guests = self.store.start_gang(job_id, [node.name for node in nodes])
        else:
            if resume:  # what it wrote after its checkpoint it writes again
                self.store.truncate_output(job_id, self.checkpoints.outputs(job_id))
            else:
                self.store.clear_output(job_id)
            self.store.mark_running(job_id, nodes[0].name)
            guests = [job_id]
        identities = job_identities(job_id, guests, self.subnet, job.network)
        for guest, node, net in zip(guests, nodes, identities):
            self.peers.guest_placed(guest, net.network, node.name)
        self._tell_peers()  # before the guests start: their switches must already admit each other
        if job.guests > 1:
            self._gang_placed(job_id)
        rank_fields = {"cuts": True} if self.checkpoint_s > 0 else {}  # a rank is checkpointed in its gang's cuts
        for guest, node, net in zip(guests, nodes, identities):
            chain = resume if job.guests == 1 else self.checkpoints.chain(guest) if resume_set is not None else []
            payload = checked if job.guests == 1 else protocol.encode(
                "run_job", job=guest, argv=argv, inputs=inputs, outputs=job.wanted, mem_mib=job.mem_mib,
                net=net.wire(), **disk, **rank_fields, **({"resume": [link.wire() for link in chain]} if chain else {}))
            if not (self._send_chain(node, guest, chain) and self.server.send(node.identity, payload)):
                if job.guests > 1:
                    self._restart_gang(job_id, f"node {node.name} unreachable", requeue_now=False)
                else:
                    self.peers.guest_gone(guest)
                    self.store.requeue(job_id, f"node {node.name} unreachable")
                return node
            node.last_placed = self._clock()
            self._occupy(node, guest, job.owner)
        self.counters.placed += 1
        queued_at = self._queued_at.pop(job_id, None)
        if queued_at is not None:
            self.counters.placement_latency_s.append(self._clock() - queued_at)
            self.counters.placement_buckets.observe(self._clock() - queued_at)
        where = ", ".join(node.name for node in nodes)
        if resume:
            self._resumed.add(job_id)
            log.info("job %d placed on %s, to go on from its checkpoint (piece %d)", job_id, where, resume[-1].seq)
        elif resume_set is not None:
            log.info("job %d placed on %s, every rank to go on from set %d", job_id, where, resume_set.number)
        else:
            self._resumed.discard(job_id)
            log.info("job %d placed on %s", job_id, where)
        return None

    # --- checkpoints -----------------------------------------------------------------------------------------
    def _send_chain(self, node: Node, job_id: int, chain: list[Any]) -> bool:
        """Send the pieces of the job's checkpoint chain ahead of its run_job; whether they all went."""
        try:
            for seq, index, data in self.checkpoints.chunks(job_id) if chain else ():
                if not self.server.send(node.identity, protocol.encode("checkpoint_data", job=job_id, seq=seq,
                                                                       index=index, data=data)):
                    return False
        except OSError as exc:  # the agent then refuses the chain, and the job's next attempt starts afresh
            log.warning("job %d: its checkpoint cannot be read (%s)", job_id, exc)
        return True

    def _checkpoints_after_move(self, job_id: int) -> dict[str, Any] | None:
        """What a job's checkpoints go on from on the node its guest was just handed over to (None: it takes
        none): the interval, a piece number past every piece heard of from its source, and the output stored
        now (the source's is all in, and no more is taken from it)."""
        job = self.store.job(job_id)
        if self.checkpoint_s <= 0 or job is None or (job.guests != 1 and job.gang is None):
            return None
        return {"interval_s": self.checkpoint_s if job.gang is None else 0.0,  # 0: a rank, in its gang's cuts
                "seq": self.checkpoints.next_seq(job_id),
                **self.store.output_sizes(job_id)}

    def _checkpoint_problem(self, name: str, job_id: int) -> str | None:
        job = self.store.job(job_id)
        if job is None or job.state != "running" or job.node != name or (job.guests != 1 and job.gang is None):
            return f"job {job_id} does not run on {name}: its checkpoints are not taken from there"
        return None

    def _on_checkpoint_put(self, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        self.liveness.heard(name)
        job_id = msg["job"]
        problem = self._checkpoint_problem(name, job_id) or self.checkpoints.put(job_id, msg["seq"], msg["index"],
                                                                                  msg["data"])
        if problem is not None:
            self._checkpoint_refused(identity, name, msg, problem)
            self._cut_piece_refused(job_id, msg["seq"], problem)

    def _on_checkpoint_commit(self, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        self.liveness.heard(name)
        job_id = msg["job"]
        problem = self._checkpoint_problem(name, job_id) or self.checkpoints.commit_later(
            job_id, msg["seq"], msg["base"], msg["size"], msg["sha256"], (identity, name, msg))
        if problem is not None:
            self._checkpoint_refused(identity, name, msg, problem)
            self._cut_piece_refused(job_id, msg["seq"], problem)

    def checkpoints_checked(self, wait: bool = False) -> None:
        """Keep, or refuse, the pieces whose check has ended (all of them, with *wait*)."""
        for (identity, name, msg), commit in self.checkpoints.checked(wait):
            moved = self._checkpoint_problem(name, commit.job)  # it may have moved while it was checked
            if self._rank_piece((identity, name, msg), commit, moved):
                continue  # a gang's rank's: kept aside for its cut's set, or refused with the cut
            if moved is not None:
                self.checkpoints.reject(commit)
            problem = moved or self.checkpoints.accept(commit)
            if problem is not None:
                self._checkpoint_refused(identity, name, msg, problem)
                continue
            self._refused_piece.pop(commit.job, None)
            log.info("job %d: checkpoint %d from %s kept (%s, %.1f MiB; checkpoints take %.0f MiB)", commit.job,
                     commit.seq, name, "full" if commit.base < 0 else "delta", commit.size / (1 << 20),
                     self.checkpoints.used / (1 << 20))
            self._reply(identity, "checkpoint_reply", job=commit.job, seq=commit.seq, ok=True)

    def _checkpoint_refused(self, identity: bytes, name: str, msg: dict[str, Any], problem: str) -> None:
        """Say once per piece why it is not kept (the agent's next piece is then a full one)."""
        job_id, seq = msg["job"], msg["seq"]
        if self._refused_piece.get(job_id) == (name, seq):
            return
        self._refused_piece[job_id] = (name, seq)
        log.warning("job %d: checkpoint %d from %s refused: %s", job_id, seq, name, problem)
        self._reply(identity, "checkpoint_reply", job=job_id, seq=seq, ok=False, reason=problem[:200])

    # --- gangs: jobs of several guests ---------------------------------------------------------------------
    def _stop_ranks(self, gang: Job, reason: str) -> None:
        """Cancel what the gang's ranks of this attempt still run or hold (nothing for a one-guest job)."""
        if gang.guests == 1:
            return
        for rank in self.store.ranks(gang.id):
            if rank.state in TERMINAL_STATES:
                continue
            self.store.finish(rank.id, "cancelled", None, reason)
            node = self.nodes.get(rank.node or "")
            if node is not None:
                self._release(node, rank.id)
                self.server.send(node.identity, protocol.encode("cancel_job", job=rank.id))

    def _gang_progress(self, gang_id: int) -> None:
        """A rank ended: the gang ends when all its ranks have, and fails (the rest cancelled) when one fails."""
        gang = self.store.job(gang_id)
        if gang is None or gang.state != "running":
            return
        ranks = self.store.ranks(gang_id)
        failed = next((r for r in ranks if r.state == "failed"), None)
        if failed is not None:
            self._stop_ranks(gang, f"rank {failed.rank} failed")
            self.store.finish(gang_id, "failed", None, f"rank {failed.rank} failed: {failed.reason}")
            log.warning("job %d failed: rank %d failed: %s", gang_id, failed.rank, failed.reason)
        elif all(r.state in TERMINAL_STATES for r in ranks):
            status = next((r.exit_status for r in ranks if r.exit_status), 0)
            reasons = [f"rank {r.rank}: {r.reason}" for r in ranks if r.reason]
            self.store.finish(gang_id, "done", status, "; ".join(reasons) or None,
                              cpu_s=sum(r.cpu_s or 0.0 for r in ranks))
            log.info("job %d done: %d ranks, status %d", gang_id, len(ranks), status)

    def _restart_gang(self, gang_id: int, reason: str, requeue_now: bool = True) -> None:
        """A rank was lost: the whole gang starts again (its ranks depend on each other), or fails when it has
        been tried too often."""
        gang = self.store.job(gang_id)
        if gang is None or gang.state != "running":
            return
        resume = self._gang_stopping(gang_id)
        self._stop_ranks(gang, f"gang restarted: {reason}")
        if gang.attempts >= MAX_ATTEMPTS:
            self.store.finish(gang_id, "failed", None, f"{reason}; gave up after {gang.attempts} attempts")
            return
        self.store.requeue_gang(gang_id, reason)
        if requeue_now:
            self._enqueue(gang)
        self._queued_at[gang_id] = self._clock()
        self.counters.requeued += 1
        log.info("job %d requeued: %s%s", gang_id, reason,
                 f"; it goes on from set {resume.number}" if resume is not None else "")

    def housekeeping(self, caught_up: bool = True) -> None:
        """Expire silent nodes; once a second, sweep the job table for stranded jobs.

        *caught_up*: whether every message that arrived has been read. Only then is a silent node lost: a
        coordinator that falls behind must not lose nodes whose heartbeats wait in its own queue (they would
        all come back with a hello, and put it further behind)."""
        now = self._clock()
        self._keys_checked()
        for name in self.liveness.due(expire=caught_up):
            self._lose_node(self.nodes[name], "missed its heartbeats")
        if now >= self._next_sweep:
            self._next_sweep = now + 1.0
            self._sweep_jobs(now)

    def _sweep_jobs(self, now: float) -> None:
        self.checkpoints.sweep(self._needs_checkpoint)
        self._take_cuts()
        self._expire_moves()
        self._move_from_owners()
        self._move_to_faster()
        self._move_from_owner_load()
        for job in self.store.overdue(self._wall()):
            reason = f"time limit {job.timeout_s:g} s reached"
            self._end(job, "failed", reason)
            log.info("job %d failed: %s", job.id, reason)
            self.schedule()
        for job_id in self.store.vacated_jobs(older_than=self._wall() - VACATED_HOLD_S):
            job = self.store.job(job_id)
            self._requeue(job_id, f"vacated on {job.node if job else '?'} for over {VACATED_HOLD_S:.0f} s")
            self.schedule()
        if now - self._started > ORPHAN_GRACE_S:
            # Jobs left running by a previous coordinator on nodes that never came back.
            for job in self.store.running_jobs():
                if job.node not in self.nodes:
                    self._requeue(job.id, f"node {job.node} did not come back")
                    self.schedule()

    def _needs_checkpoint(self, job_id: int) -> bool:
        job = self.store.job(job_id)
        if job is not None and job.gang is not None:  # a rank's chain lasts as long as its gang
            job = self.store.job(job.gang)
        if job is None or job.state in TERMINAL_STATES:
            self._resumed.discard(job_id)
            self._refused_piece.pop(job_id, None)
            return False
        return True

    def _lose_node(self, node: Node, why: str) -> None:
        log.warning("node %s lost: %s", node.name, why)
        self.counters.nodes_lost += 1
        self.down.left(DownNode(node.name, self._wall(), why, node.cores, node.mem_mib))
        self._capacity = None
        self.nodes.pop(node.name, None)
        self.by_identity.pop(node.identity, None)
        self.open_nodes.discard(node.name)
        self.liveness.remove(node.name)
        self.peers.node_left(node.name)
        if self.relay is not None:
            self.relay.set_peers(node.key, node.name, None)
        self._moves_on_node_lost(node.name)
        self._fence_node_lost(node.name)
        for job_id in sorted(node.running):
            self._requeue(job_id, f"node {node.name} lost ({why})")
            self.queue.shares.stopped(job_id)
        node.running.clear()
        self._tell_peers()
        self.schedule()

    def _requeue(self, job_id: int, reason: str) -> None:
        """Put a running or vacated job back in the queue, or fail it if it has been tried too often; a gang's
        rank takes its whole gang back."""
        job = self.store.job(job_id)
        if job is None or job.state not in ("running", "vacated"):
            return
        if job.gang is not None:
            self._restart_gang(job.gang, f"rank {job.rank}: {reason}")
            return
        self._job_left(job_id, job.node, ran=False)
        if job.state == "running" and job.attempts >= MAX_ATTEMPTS:
            self.store.finish(job_id, "failed", None, f"{reason}; gave up after {job.attempts} attempts")
            return
        self.store.requeue(job_id, reason)
        self._enqueue(job)
        self._queued_at[job_id] = self._clock()
        self.counters.requeued += 1
        log.info("job %d requeued: %s", job_id, reason)

    def _enqueue(self, job: Job) -> None:
        image = self.store.image(job.image) if job.image is not None else None
        self.queue.add(QueuedJob(job.id, job.mem_mib, job.guests, image.size if image is not None else 0, job.owner,
                                 job.priority))

    def _job_disk(self, job: Job) -> dict[str, Any]:
        """The run_job fields for a job's disk: the image its guests boot from and their disk budget."""
        fields: dict[str, Any] = {}
        image = self.store.image(job.image) if job.image is not None else None
        if image is not None:
            fields["image"] = image.wire()
        if job.disk_mib is not None:
            fields["disk_mib"] = job.disk_mib
        return fields

    # --- disk images -----------------------------------------------------------------------------------------
    def _on_image_missing(self, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        self._reply(identity, "image_missing_reply", chunks=[d for d in msg["chunks"] if not self.chunks.has(d)])

    def _on_image_put(self, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        try:
            self.chunks.put(msg["digest"], msg["data"])
        except ChunkError as exc:
            self._reply(identity, "error", code="invalid", message=str(exc), in_reply_to="image_put")
            return
        self._reply(identity, "ok")

    def _on_image_commit(self, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        problem = check_image_name(msg["name"]) or self._chunks_problem(msg["size"], msg["chunks"])
        known = self.store.image(msg["name"])
        if problem is None and known is not None:
            if known.sha256 == msg["sha256"] and known.chunks == msg["chunks"]:
                self._reply(identity, "ok", detail=f"image {known.name} is there already")
                return
            problem = f"an image named {known.name!r} exists; remove it first (`coordinator image rm {known.name}`)"
        if problem is not None:
            self._reply(identity, "error", code="invalid", message=problem, in_reply_to="image_commit")
            return
        self.store.add_image(msg["name"], msg["sha256"], msg["size"], msg["chunks"], name)
        log.info("image %s added by %s: %d bytes in %d chunks, sha256 %s", msg["name"], name, msg["size"],
                 len(msg["chunks"]), msg["sha256"])
        self._reply(identity, "ok", detail=f"image {msg['name']} added")

    def _chunks_problem(self, size: int, chunks: list[bytes]) -> str | None:
        """Why *chunks* do not make an image of *size* bytes here (absent, or not the sizes they must be)."""
        if len(chunks) != protocol.image_chunk_count(size):
            return f"an image of {size} bytes has {protocol.image_chunk_count(size)} chunks, not {len(chunks)}"
        for index, digest in enumerate(chunks):
            wanted = IMAGE_CHUNK_BYTES if index < len(chunks) - 1 else size - IMAGE_CHUNK_BYTES * index
            try:
                stored = self.chunks.size(digest)
            except OSError:
                return f"chunk {index} ({digest.hex()[:16]}) is not on the coordinator; send it first"
            if stored != wanted:
                return f"chunk {index} ({digest.hex()[:16]}) has {stored} bytes where the image needs {wanted}"
        return None

    def _on_image_list(self, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        images = [{"name": image.name, "size": image.size, "sha256": image.sha256, "chunks": len(image.chunks),
                   "added_by": image.added_by, "added_at": image.added_at,
                   "jobs": self.store.jobs_using_image(image.name)} for image in self.store.images()]
        self._reply(identity, "image_list_reply", images=images)

    def _on_image_rm(self, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        image = self.store.image(msg["name"])
        users = self.store.jobs_using_image(msg["name"])
        if image is None or users:
            why = (f"no image named {msg['name']!r}" if image is None else
                   f"image {image.name} is used by jobs not yet ended ({', '.join(map(str, users[:20]))}); cancel "
                   f"them or wait for them to end")
            self._reply(identity, "error", code="not-found" if image is None else "in-use", message=why,
                        in_reply_to="image_rm")
            return
        self.store.remove_image(image.name)
        still_used = {digest for other in self.store.images() for digest in other.chunks}
        self.chunks.discard(set(image.chunks) - still_used)
        log.info("image %s removed by %s", image.name, name)
        self._reply(identity, "ok", detail=f"image {image.name} removed")

    def _on_image_chunk_get(self, identity: bytes, name: str, msg: dict[str, Any]) -> None:
        """A chunk for an agent's fetch socket (any enrolled agent may fetch any chunk of the pool's images),
        answered by serve_chunks; a request beyond the queue's bound is dropped (the agent asks again)."""
        if len(self._chunk_requests) < MAX_CHUNK_REQUESTS:
            self._chunk_requests.append((identity, name, msg["digest"]))

    def serve_chunks(self) -> None:
        """Answer waiting chunk requests, for at most CHUNK_TURN_S."""
        deadline = time.monotonic() + CHUNK_TURN_S
        while self._chunk_requests and time.monotonic() < deadline:
            identity, name, digest = self._chunk_requests.popleft()
            try:
                self._reply(identity, "image_chunk", digest=digest, data=self.chunks.get(digest))
            except ChunkError as exc:
                log.warning("node %s asked for a chunk: %s", name, exc)
                self._reply(identity, "image_chunk", digest=digest, problem=str(exc))
