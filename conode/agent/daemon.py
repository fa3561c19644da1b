"""The node agent: joins the pool, offers its guests, runs the jobs the coordinator places on them.

Single-threaded: one poll loop over the coordinator socket and the worker pipes. The coordinator link follows
the Paranoid Pirate pattern: the agent says hello, beats every second, and when it has not heard from the
coordinator for three beats it rebuilds its socket and says hello again, backing off up to a cap. Its guests and
their jobs keep running meanwhile; output is buffered and results wait in the outbox until acknowledged.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil
import zmq

import conode
from conode.agent.outbox import Outbox
from conode.agent.owner import OwnerMonitor, make_sources
from conode.agent.pipe import PipeError
from conode.agent.supervisor import WorkerProcess
from conode.cluster import protocol
from conode.cluster.heartbeat import PeerLiveness
from conode.cluster.keys import KeyPair, load_key_pair
from conode.cluster.protocol import ProtocolError
from conode.cluster.transport import AuthRefused, ClientSocket
from conode.errors import ConodeError
from conode.idle.policy import OwnerState, PolicyConfig, guest_may_run
from conode.tomlfile import read_toml, write_toml
from conode.vm.guest_image import image_tag

log = logging.getLogger("conode.agent")

AGENT_KEY_NAME = "agent"
MAX_BUFFERED_BYTES = 64 << 20  # output kept while the coordinator is unreachable
TICK_MS = 20  # how often the owner is observed: the bound on noticing that the owner is back
STATUS_EVERY_S = 1.0


@dataclass(frozen=True)
class AgentConfig:
    state_dir: Path
    name: str
    coordinator: str
    coordinator_key: str
    cores: int
    mem_mib: int
    idle_source: str = "auto"  # auto | away | present | file:PATH
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    while_owner: str = "pause"  # keep guests paused while the owner works, or "shutdown"
    cpu_cap: float = 100.0  # percent of a core each guest may use


def agent_keys(state_dir: Path) -> KeyPair:
    return load_key_pair(state_dir / "keys", AGENT_KEY_NAME)


def default_node_name() -> str:
    return socket.gethostname().split(".")[0] or "node"


class AgentDaemon:
    def __init__(self, config: AgentConfig, context: zmq.Context | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._context = context or zmq.Context.instance()
        self.keys = agent_keys(config.state_dir)
        self.outbox = Outbox(config.state_dir / "outbox")
        self.link = ClientSocket(self._context, config.coordinator, config.coordinator_key, self.keys)
        self.liveness = PeerLiveness(clock)
        self.welcomed = False
        self._hello_sent = False
        self._reconnect_at: float | None = None
        self._buffer: deque[bytes] = deque()
        self._buffered_bytes = 0
        self.workers = [WorkerProcess(i, config.mem_mib, config.cpu_cap) for i in range(config.cores)]
        self.jobs: dict[int, WorkerProcess] = {}  # running jobs and the worker running each
        self.backlog: deque[dict[str, Any]] = deque()  # run_job messages waiting for a free worker
        self.vacated_dir = config.state_dir / "vacated"
        self.vacated_dir.mkdir(exist_ok=True)
        # A post-boot snapshot belongs to one guest image: a new image (an upgrade) boots afresh.
        self.boot_snapshot = config.state_dir / f"boot-{image_tag()}.snap"
        for stale in config.state_dir.glob("boot-*.snap"):
            if stale != self.boot_snapshot:
                stale.unlink()
        fixed = config.idle_source in ("away", "present")
        self.owner = OwnerMonitor(make_sources(config.idle_source, clock), config.policy, clock=clock,
                                  fixed_load=0.0 if fixed else None)
        self.yield_latencies: deque[float] = deque(maxlen=100)  # owner input -> guest stopped, seconds
        self._activity_at: float | None = None
        self._vacated = self.vacated_jobs()
        self._running = True
        self._process = psutil.Process()
        self._status_at = 0.0

    # --- state -------------------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        return self.owner.policy.state.value

    def vacated_jobs(self) -> dict[int, int]:
        """Jobs saved in vacated guests on disk, and the worker slot each belongs to."""
        jobs = {}
        for meta in self.vacated_dir.glob("worker-*.toml"):
            index = int(meta.stem.split("-")[1])
            for job in read_toml(meta).get("jobs", "").split():
                jobs[int(job)] = index
        return jobs

    def _held_jobs(self) -> list[int]:
        return sorted(set(self.jobs) | set(self.outbox.jobs()) | set(self._vacated))

    def _speed(self) -> float:
        speeds = [w.speed for w in self.workers if w.speed]
        return sum(speeds) / len(speeds) if speeds else 0.0

    # --- the loop ------------------------------------------------------------------------------------------
    def run(self) -> None:
        log.info("agent %s: %d guest(s) of %d MiB, coordinator %s", self.config.name, self.config.cores,
                 self.config.mem_mib, self.config.coordinator)
        try:
            while self._running:
                self._poll_once(timeout_ms=TICK_MS)
        finally:
            self.shutdown()

    def stop(self) -> None:
        self._running = False

    def shutdown(self) -> None:
        if self.welcomed:
            self.link.send(protocol.encode("bye", node=self.config.name))
        for worker in self.workers:
            worker.stop()
        self.link.close()

    def _poll_once(self, timeout_ms: int) -> None:
        poller = zmq.Poller()
        poller.register(self.link.socket, zmq.POLLIN)
        for worker in self.workers:
            if worker.alive:
                poller.register(worker.stdout_fd, zmq.POLLIN)
                poller.register(worker.stderr_fd, zmq.POLLIN)
        events = dict(poller.poll(timeout_ms))
        if self.link.socket in events:
            self._drain_link()
        for worker in self.workers:
            if worker.alive:
                worker.read_stderr()
                self._drain_worker(worker)
        self._supervise_workers()
        self._follow_owner()
        self._keep_link()
        self._write_status()

    # --- the coordinator link --------------------------------------------------------------------------
    def _keep_link(self) -> None:
        now = self._clock()
        try:
            self.link.check_refused()
        except AuthRefused:
            raise ConodeError(f"the coordinator at {self.config.coordinator} refused this agent's key; enrol it "
                              f"there with `coordinator keys add --role agent {self.config.name} {self.keys.public}`")
        if self._reconnect_at is not None:
            if now < self._reconnect_at:
                return
            self._reconnect_at = None
            self.link.reconnect()
            self.liveness.reset()
            self._hello_sent = False
        if not self._hello_sent:
            self._hello_sent = self.link.send(self._hello())
            if self._hello_sent:
                self.liveness.reset()
            return
        if self.liveness.expired():
            delay = self.liveness.next_backoff()
            log.warning("no word from the coordinator for %.0f s; reconnecting in %.1f s",
                        self.liveness.interval * self.liveness.liveness, delay)
            self.welcomed = False
            self._reconnect_at = now + delay
            return
        if self.welcomed and self.liveness.beat_due():
            self._send(protocol.encode("heartbeat", node=self.config.name, state=self.state, idle_s=self._idle_s(),
                                       running=self._held_jobs(), speed=self._speed(),
                                       cpu_percent=self._cpu_percent()))

    def _hello(self) -> bytes:
        return protocol.encode("hello", node=self.config.name, cores=self.config.cores, mem_mib=self.config.mem_mib,
                               speed=self._speed(), state=self.state, idle_s=self._idle_s(),
                               running=self._held_jobs(), software=f"conode {conode.__version__}")

    def _idle_s(self) -> float:
        idle = self.owner.last.idle_s
        return 0.0 if idle is None else min(idle, 1e9)

    def _cpu_percent(self) -> float:
        total = self._process.cpu_percent(None)
        for worker in self.workers:
            if worker.alive:
                try:
                    total += psutil.Process(worker.process.pid).cpu_percent(None)  # type: ignore[union-attr]
                except psutil.Error:
                    pass
        return total

    def _send(self, payload: bytes) -> None:
        """Send now, or keep it (bounded) until the coordinator is back."""
        if self.welcomed and not self._buffer and self.link.send(payload):
            return
        if self._buffered_bytes + len(payload) > MAX_BUFFERED_BYTES:
            log.warning("coordinator unreachable and %d bytes buffered: dropping live output", self._buffered_bytes)
            return
        self._buffer.append(payload)
        self._buffered_bytes += len(payload)

    def _flush(self) -> None:
        while self._buffer:
            if not self.link.send(self._buffer[0]):
                return
            self._buffered_bytes -= len(self._buffer.popleft())
        for _, payload in self.outbox.items():  # results not yet acknowledged
            self.link.send(payload)

    def _drain_link(self) -> None:
        while True:
            try:
                frame = self.link.socket.recv(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                message = protocol.decode(frame)
            except ProtocolError as exc:
                log.warning("malformed message from the coordinator: %s", exc)
                continue
            self.liveness.heard()
            self._on_message(message)

    def _on_message(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "welcome":
            self.welcomed = True
            log.info("joined the pool at %s", self.config.coordinator)
            self._flush()
        elif kind == "reconnect":
            self.welcomed = False
            self._hello_sent = False
        elif kind == "run_job":
            self._accept_job(message)
        elif kind == "cancel_job":
            self._cancel_job(int(message["job"]))
        elif kind == "ack":
            self.outbox.remove(int(message["job"]))
        elif kind == "error":
            log.warning("coordinator says: %s (%s)", message["message"], message["code"])

    # --- jobs ------------------------------------------------------------------------------------------
    def _accept_job(self, message: dict[str, Any]) -> None:
        job = int(message["job"])
        if job in self.jobs or job in self.outbox.jobs():
            return  # a duplicate placement: we have it already
        if message["mem_mib"] > self.config.mem_mib:
            self._job_failed(job, f"needs {message['mem_mib']} MiB, guests here have {self.config.mem_mib}", False)
            return
        self.backlog.append(message)
        self._dispatch_backlog()

    def _dispatch_backlog(self) -> None:
        while self.backlog:
            worker = next((w for w in self.workers if w.alive and w.job is None), None)
            if worker is None:
                return
            message = self.backlog.popleft()
            job = int(message["job"])
            worker.job = job
            self.jobs[job] = worker
            worker.send({"type": "run", "job": job, "argv": message["argv"], "inputs": message["inputs"],
                         "outputs": message["outputs"]})
            log.info("job %d started on guest %d: %s", job, worker.index, " ".join(message["argv"])[:120])

    def _cancel_job(self, job: int) -> None:
        if job in self._vacated:
            self._drop_vacated(self._vacated[job])
        self.backlog = deque(m for m in self.backlog if int(m["job"]) != job)
        worker = self.jobs.pop(job, None)
        if worker is not None:
            worker.send({"type": "cancel", "job": job})
            worker.job = None
            self._dispatch_backlog()
        self.outbox.remove(job)

    def _job_failed(self, job: int, reason: str, retry: bool) -> None:
        payload = protocol.encode("job_failed", job=job, reason=reason[:4000], retry=retry)
        self.outbox.put(job, payload)
        self._send(payload)

    def _drain_worker(self, worker: WorkerProcess) -> None:
        try:
            messages = worker.read_messages()
        except PipeError as exc:
            log.error("guest worker %d sent garbage: %s", worker.index, exc)
            worker.close()
            return
        for message in messages:
            self._on_worker_message(worker, message)

    def _on_worker_message(self, worker: WorkerProcess, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "ready":
            worker.ready = True
            worker.speed = float(message["speed"])
            worker.guest = str(message["guest"])
            log.info("guest %d ready: %s, speed %.0f loops/s", worker.index, worker.guest, worker.speed)
            self._on_worker_resumed_jobs(worker)
            self._dispatch_backlog()
            return
        if kind == "paused":
            worker.paused = True
            if self._activity_at is not None:
                latency = float(message["at"]) - self._activity_at
                self.yield_latencies.append(latency)
                log.info("guest %d stopped %.0f ms after the owner's input", worker.index, latency * 1000)
            return
        if kind == "resumed":
            worker.paused = False
            return
        if kind == "vacated":
            self._on_vacated(worker, message)
            return
        job = int(message.get("job", -1))
        if self.jobs.get(job) is not worker:
            return  # a cancelled job's last words
        if kind == "output":
            self._send(protocol.encode("job_output", job=job, stream=message["stream"], data=message["data"]))
        elif kind in ("finished", "failed"):
            if kind == "finished":
                payload = protocol.encode("job_finished", job=job, status=int(message["status"]),
                                          outputs=message["outputs"], missing=message["missing"],
                                          runtime_s=float(message["runtime_s"]))
                self.outbox.put(job, payload)
                self._send(payload)
                log.info("job %d finished with status %d", job, message["status"])
            else:
                self._job_failed(job, str(message["reason"]), retry=False)
            del self.jobs[job]
            worker.job = None
            self._dispatch_backlog()

    def _supervise_workers(self) -> None:
        now = self._clock()
        may_run = guest_may_run(self.owner.policy.state)
        for worker in self.workers:
            if worker.process is not None and not worker.alive:
                self._drain_worker(worker)
                worker.read_stderr()
                if worker.vacating or worker.stopping:  # it exited as told
                    worker.close()
                    continue
                why = worker.crashed(now)
                log.error("guest %d crashed: %s", worker.index, why)
                if worker.job is not None:
                    job, worker.job = worker.job, None
                    self.jobs.pop(job, None)
                    self._job_failed(job, f"guest crashed: {why}", retry=True)
            elif may_run and worker.process is None and (worker.restart_at is None or now >= worker.restart_at):
                self._start_worker(worker)

    # --- following the owner ----------------------------------------------------------------------------
    def _start_worker(self, worker: WorkerProcess) -> None:
        saved = self.vacated_dir / f"worker-{worker.index}.snap"
        if saved.exists():
            worker.resumed_jobs = [job for job, index in self._vacated.items() if index == worker.index]
            worker.start(resume=saved)
            log.info("guest %d resumes its vacated jobs %s", worker.index, worker.resumed_jobs)
        else:
            worker.resumed_jobs = []
            worker.start(boot_snapshot=self.boot_snapshot)
        worker.stopping = False
        worker.pause_requested = False
        self.owner.load.set_own_pids({self._process.pid} | {w.process.pid for w in self.workers if w.alive})

    def _on_worker_resumed_jobs(self, worker: WorkerProcess) -> None:
        for job in worker.resumed_jobs:
            self.jobs[job] = worker
            worker.job = job
            self._send(protocol.encode("job_resumed", job=job))
        if worker.resumed_jobs:
            self._drop_vacated(worker.index)
        worker.resumed_jobs = []

    def _on_vacated(self, worker: WorkerProcess, message: dict[str, Any]) -> None:
        jobs = [int(j) for j in message["jobs"]]
        write_toml(self.vacated_dir / f"worker-{worker.index}.toml", {"jobs": " ".join(map(str, jobs))})
        for job in jobs:
            self.jobs.pop(job, None)
            self._vacated[job] = worker.index
            self._send(protocol.encode("job_vacated", job=job))
        worker.job = None
        log.info("guest %d saved to %s with jobs %s", worker.index, message["path"], jobs)

    def _drop_vacated(self, index: int) -> None:
        for suffix in ("snap", "toml"):
            (self.vacated_dir / f"worker-{index}.{suffix}").unlink(missing_ok=True)
        self._vacated = {job: i for job, i in self._vacated.items() if i != index}

    def _follow_owner(self) -> None:
        previous, current = self.owner.step(has_jobs=bool(self.jobs or self._vacated), vacated=not self.jobs)
        if current is not previous:
            log.info("owner state %s -> %s", previous.value, current.value)
            if guest_may_run(previous) and not guest_may_run(current):
                idle = self.owner.last.idle_s
                self._activity_at = time.time() - (idle if idle is not None and idle < 1e9 else 0.0)
            self.liveness.next_beat = 0.0  # tell the coordinator at once
        for worker in self.workers:
            if not worker.alive:
                continue
            if guest_may_run(current):
                if worker.pause_requested:
                    worker.pause_requested = False
                    worker.send({"type": "resume"})
            elif current is OwnerState.VACATING and worker.job is not None:
                if not worker.vacating:
                    worker.vacating = True
                    worker.send({"type": "vacate", "path": str(self.vacated_dir / f"worker-{worker.index}.snap")})
            elif current is OwnerState.OWNER and self.config.while_owner == "shutdown" and worker.job is None:
                if not worker.stopping:
                    worker.stopping = True
                    worker.send({"type": "quit"})
            elif not worker.pause_requested:
                worker.pause_requested = True
                worker.send({"type": "pause"})

    def _write_status(self) -> None:
        now = self._clock()
        if now - self._status_at < STATUS_EVERY_S:
            return
        self._status_at = now
        last = self.owner.last
        status = {
            "time": time.time(), "node": self.config.name, "pid": self._process.pid,
            "owner_state": self.state, "state_since_s": now - self.owner.policy.since,
            "sources": [{"name": r.source, "idle_s": r.idle_s, "detail": r.detail} for r in last.readings],
            "idle_s": last.idle_s, "owner_load": last.owner_load, "on_battery": last.on_battery,
            "coordinator": self.config.coordinator, "connected": self.welcomed,
            "guests": [{"index": w.index, "pid": w.process.pid if w.alive else None,
                        "state": ("paused" if w.paused else "running" if w.ready else "starting") if w.alive
                        else "stopped", "job": w.job, "speed": w.speed} for w in self.workers],
            "cpu_percent": self._cpu_percent(), "jobs": sorted(self.jobs), "vacated_jobs": sorted(self._vacated),
            "yield_ms": [round(x * 1000, 1) for x in self.yield_latencies],
        }
        path = self.config.state_dir / "status.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(status, default=lambda x: None if x != x else x))
        tmp.replace(path)
