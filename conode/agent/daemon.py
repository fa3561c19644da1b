"""The node agent: joins the pool, offers its guests, runs the jobs the coordinator places on them.

AgentDaemon composes the parts, each in its own module: the coordinator link with its buffer and outbox
(link.py), the guests with their workers, backlog and vacated snapshots (guests.py), the owner (owner.py) and
status.json (status.py). One thread runs the loop; it waits on ZeroMQ sockets only (the coordinator's and a
wake-up socket the worker pipe threads signal), at most TICK_MS, so the owner's return is always noticed within
a tick. Time comes from the injected clocks (monotonic and wall), so every decision can be tested without sleeps.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import psutil
import zmq

import conode
from conode import shell
from conode.agent.checkpoints import Checkpoints
from conode.agent.disk import StateDisk
from conode.agent.conet import OFF, ConetSwitch, local_address
from conode.agent.guests import Guests
from conode.agent.images import ChunkSource, CoordinatorChunks, ImageCache, ImageFetcher
from conode.agent.link import CoordinatorLink, Transport, ZmqTransport
from conode.agent.moves import AgentMoves, MoveSettings
from conode.agent.outbox import Outbox
from conode.agent.owner import FIXED_SOURCES, OwnerMonitor, make_sources
from conode.agent.pause import PauseWatch
from conode.agent.settings import AGENT_KEY_NAME, AgentConfig
from conode.agent.status import StatusFile
from conode.agent.supervisor import StartWorker, process_starter
from conode.agent.wake import Waker
from conode.cluster import protocol
from conode.cluster.keys import KeyPair, load_key_pair
from conode.cluster.transport import AuthRefused
from conode.errors import ConodeError
from conode.idle.explain import explain
from conode.idle.policy import guest_may_run
from conode.idle.sources import CgroupLoad, IdleSource

log = logging.getLogger("conode.agent")

TICK_MS = 20  # how often the owner is observed: the bound on noticing that the owner is back
MAX_IDLE_REPORTED_S = 1e9  # "forever" as a finite number for the wire

__all__ = ["TICK_MS", "AgentConfig", "AgentDaemon", "agent_keys"]


def log_engine() -> None:
    """Say which CPU engine the guests run on; the stock one is about ten times slower, so it is a warning."""
    from conode.vm import ENGINE

    if ENGINE.name == "stock":
        log.warning("engine: stock Unicorn, about ten times slower than the fast engine (%s); build it with "
                    "`conode engine build` or install a prebuilt one in the cache directory", ENGINE.reason)
    else:
        log.info("engine: %s (%s)", ENGINE.name, ENGINE.reason)


def agent_keys(state_dir: Path) -> KeyPair:
    return load_key_pair(state_dir / "keys", AGENT_KEY_NAME)


class AgentDaemon:
    def __init__(self, config: AgentConfig, context: zmq.Context | None = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 transport: Transport | None = None, start_worker: StartWorker | None = None,
                 sources: list[IdleSource] | None = None, chunks: Callable[[], ChunkSource] | None = None) -> None:
        """*transport*, *start_worker*, *sources* and *chunks* replace the real coordinator socket, worker
        processes, idle sources and image fetch socket (conode/testing has stand-ins); by default the agent uses
        the real ones."""
        self.config = config
        self._clock = clock
        self._wall = wall
        self._context = context or zmq.Context.instance()
        self.disk = StateDisk()
        self.waker = Waker(self._context)
        self._public_key = ""
        if transport is None:
            keys = agent_keys(config.state_dir)
            self._public_key = keys.public
            transport = ZmqTransport(self._context, config.coordinator, config.coordinator_key, keys)
        # Images come over a connection of their own (images.py): a fetch never delays a heartbeat.
        self.images = ImageFetcher(
            ImageCache(config.state_dir / "images", config.image_cache_mib << 20, wall),
            chunks or (lambda: CoordinatorChunks(self._context, config.coordinator, config.coordinator_key,
                                                 agent_keys(config.state_dir))),
            self.waker.signal)
        self.outbox = Outbox(config.state_dir / "outbox", self.disk)
        self.link = CoordinatorLink(transport, self.outbox, clock, hello=self._hello, heartbeat=self._heartbeat)
        listen = config.conet_listen if start_worker is None else OFF  # stand-in workers have no guests to join
        start_worker = start_worker or process_starter(config.mem_mib, config.cpu_cap, self.waker.signal)
        self.conet = ConetSwitch(config.state_dir, listen, config.coordinator, config.state_dir / "keys",
                                 self.waker.signal, clock, config.coordinator_key)
        self.checkpoints = Checkpoints(config.state_dir, self.link, self.disk)
        self.guests = Guests(config.cores, config.mem_mib, config.state_dir, start_worker, self.link, clock,
                             self.disk, self.conet, self.images, self.checkpoints)
        if self._public_key:  # guests move agent to agent over CURVE, with the agent's own key pair
            self.guests.mover = AgentMoves(self.guests, self.link, MoveSettings(
                str(config.state_dir / "keys"), self._public_key, f"tcp://{local_address(config.coordinator)}:*",
                config.migrate_max_mib_s * (1 << 20)))
        fixed = sources is not None or config.idle_source in FIXED_SOURCES
        if sources is None:
            sources = make_sources(config.idle_source, clock, wall, config.idle_reports)
        pauses = PauseWatch([config.state_dir, *([config.idle_reports] if config.idle_reports else [])], wall, clock)
        # The owner's load: its session's cgroup if named; else all the CPU but conode's, unless the owner is
        # declared away or present (then nothing is measured).
        load = CgroupLoad(config.owner_cgroup, clock) if config.owner_cgroup is not None else None
        self.owner = OwnerMonitor(sources, config.policy, load, clock=clock, wall=wall,
                                  fixed_load=0.0 if fixed and load is None else None, pauses=pauses)
        self.status_file = StatusFile(config.state_dir, clock, self.disk, config.idle_reports)
        self._process = psutil.Process()
        self._running = True
        self.last_status: dict[str, Any] = {}  # what status.json says, for the metrics (replaced, never changed)

    # --- state -------------------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        return self.owner.policy.state.value

    def held_jobs(self) -> list[int]:
        """Every job this agent answers for: running, waiting, vacated to disk, or finished but unacknowledged."""
        return sorted(self.guests.held_jobs() | set(self.outbox.jobs()))

    def _idle_s(self) -> float:
        idle = self.owner.last.idle_s
        if idle is None or idle != idle:  # unknown (or a source that answered NaN) never counts as idle
            return 0.0
        return max(0.0, min(idle, MAX_IDLE_REPORTED_S))

    @staticmethod
    def _shown_idle(idle: float | None) -> float | None:
        """An idle time for status.json: "forever" as a large finite number that readers show as such."""
        return None if idle is None else min(idle, MAX_IDLE_REPORTED_S)

    def _cpu_percent(self) -> float:
        """CPU used by the agent and its guests, in percent of a core, as the last status measured it: one
        measurement a second (psutil measures since its last call, so a second caller would halve the window)."""
        return float(self.last_status.get("cpu_percent", 0.0))

    def _hello(self) -> bytes:
        conet = {"conet": self.conet.endpoint} if self.conet.endpoint else {}
        return protocol.encode("hello", node=self.config.name, cores=self.config.cores, mem_mib=self.config.mem_mib,
                               speed=self.guests.speed(), state=self.state, idle_s=self._idle_s(),
                               running=self.held_jobs(), software=f"conode {conode.__version__}",
                               image_cache_mib=self.config.image_cache_mib, **conet)

    def _heartbeat(self) -> bytes:
        load = self.owner.last.owner_load
        measured = {"owner_load": load} if load is not None and math.isfinite(load) else {}
        return protocol.encode("heartbeat", node=self.config.name, state=self.state, idle_s=self._idle_s(),
                               running=self.held_jobs(), speed=self.guests.speed(), cpu_percent=self._cpu_percent(),
                               **measured)

    # --- the loop ------------------------------------------------------------------------------------------
    def run(self) -> None:
        log.info("agent %s: %d guest(s) of %d MiB, coordinator %s", self.config.name, self.config.cores,
                 self.config.mem_mib, self.config.coordinator)
        log_engine()
        self.conet.start()
        try:
            while self._running:
                self.poll_once(TICK_MS)
        finally:
            self.shutdown()

    def stop(self) -> None:
        self._running = False

    def shutdown(self) -> None:
        self.link.close(bye=protocol.encode("bye", node=self.config.name))
        self.guests.stop_all()
        self.images.close()
        self.conet.close()
        self.waker.close()

    def poll_once(self, timeout_ms: int) -> None:
        """Wait (at most *timeout_ms*) for the coordinator or a worker, then step."""
        poller = zmq.Poller()
        poller.register(self.waker.socket, zmq.POLLIN)
        if self.link.transport.pollable is not None:
            poller.register(self.link.transport.pollable, zmq.POLLIN)
        poller.poll(timeout_ms)
        self.waker.drain()
        self.step()

    def step(self) -> None:
        """One pass over everything: coordinator messages, worker messages, supervision, owner, link, status."""
        for message in self.link.receive():
            self._on_message(message)
        self.guests.pump()
        self.conet.pump()
        self.guests.supervise(guest_may_run(self.owner.policy.state))
        self.owner.load.set_own_pids({self._process.pid} | self.guests.pids() | self.conet.pids())
        self._follow_owner()
        try:
            self.link.keep()
        except AuthRefused:
            enrol = shell.command("coordinator", "keys", "add", "--state-dir", "STATE", "--role", "agent", "--",
                                  self.config.name, self._public_key)
            raise ConodeError(f"the coordinator at {self.config.coordinator} refused this agent's key; enrol it "
                              f"there with: {enrol}") from None
        if self.status_file.due():
            self.last_status = self.status()
            self.status_file.write(self.last_status)

    def _on_message(self, message: dict[str, Any]) -> None:
        if message["type"] == "run_job":
            if message["job"] not in self.outbox:  # else finished here already, its result not yet acknowledged
                self.guests.accept(message)
        elif message["type"] == "cancel_job":
            self.guests.cancel(message["job"])
            self.outbox.remove(message["job"])
        elif message["type"] == "load_vacated":
            self.guests.load_vacated(message["job"])
        elif message["type"] in ("move_in", "move_out", "move_go", "move_abort"):
            if self.guests.mover is not None:
                self.guests.mover.on_coordinator(message)
        elif message["type"] == "conet_peers":
            self.conet.set_peers(message["peers"], message.get("relay"))
        elif message["type"] == "checkpoint_data":
            self.checkpoints.receive(message)
        elif message["type"] == "checkpoint_start":
            self.guests.checkpoints_go_on(message["job"], message)
        elif message["type"] == "checkpoint_cut":
            self.guests.cut(message["job"], message["cut"])
        elif message["type"] in ("cut_final", "cut_resume"):
            self.guests.cut_step(message["type"], message["job"], message["cut"])
        elif message["type"] == "checkpoint_reply" and not message["ok"]:
            self.guests.checkpoint_refused(message["job"], message.get("reason", "no reason given"))

    def _follow_owner(self) -> None:
        previous, current = self.owner.step(has_jobs=self.guests.busy, vacated=not self.guests.jobs)
        if current is not previous:
            log.info("owner state %s -> %s", previous.value, current.value)
            if guest_may_run(previous) and not guest_may_run(current):
                idle, pause = self.owner.last.idle_s, self.owner.last.pause
                # what stopped the guests: the owner's input, or the pause they asked for (whichever came last)
                self.guests.activity_at = max(self._wall() - (idle if idle is not None and idle < 1e9 else 0.0),
                                              pause.at if pause is not None else -math.inf)
            self.link.beat_soon()  # tell the coordinator at once
        self.guests.follow_owner(current, self.config.shutdown_while_owner)

    def status(self) -> dict[str, Any]:
        last = self.owner.last
        guests = self.guests.status()
        guest_cpu = sum(guest["cpu_percent"] for guest in guests)
        try:
            own_cpu = self._process.cpu_percent(None)
        except psutil.Error:
            own_cpu = 0.0
        try:
            saved = self.guests.saved_bytes()
        except OSError:
            saved = None
        pause = last.pause
        return {
            "time": self._wall(), "node": self.config.name, "pid": self._process.pid,
            "owner_state": self.state, "state_since_s": self._clock() - self.owner.policy.since,
            "sources": [{"name": r.source, "idle_s": self._shown_idle(r.idle_s), "detail": r.detail}
                        for r in last.readings],
            "idle_s": self._shown_idle(last.idle_s), "owner_load": last.owner_load, "on_battery": last.on_battery,
            "coordinator": self.config.coordinator, "connected": self.link.welcomed,
            "link_problem": self.link.transport.problem,
            "guests": guests, "cpu_percent": own_cpu + guest_cpu, "guest_cpu_percent": guest_cpu,
            "saved_bytes": saved, "saved_budget_bytes": self.guests.saved_budget_bytes(),
            "paused_until": pause.until if pause is not None else None, "paused_by": pause.by if pause else None,
            "pool_rule": explain(self.owner.policy.state, self.config.policy, self._shown_idle(last.idle_s),
                                 pause.until if pause is not None else None),
            "jobs": sorted(self.guests.jobs), "vacated_jobs": sorted(self.guests.vacated),
            "images": {"fetching": sorted(self.images.pending), "waiting_jobs": sorted(self.guests.fetching),
                       "cache_mib": self.config.image_cache_mib},
            "unacknowledged": self.outbox.jobs(), "disk_problems": self.disk.problems,
            "yield_ms": [round(x * 1000, 1) for x in self.guests.yield_latencies],
            "conet": {"endpoint": self.conet.endpoint, "problem": self.conet.problem, **self.conet.stats},
        }
