"""The node agent: joins the pool, offers its guests, runs the jobs the coordinator places on them.

Single-threaded: one poll loop over the coordinator socket and the worker pipes. The coordinator link follows
the Paranoid Pirate pattern: the agent says hello, beats every second, and when it has not heard from the
coordinator for three beats it rebuilds its socket and says hello again, backing off up to a cap. Its guests and
their jobs keep running meanwhile; output is buffered and results wait in the outbox until acknowledged.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import psutil
import zmq

import conode
from conode.agent.outbox import Outbox
from conode.agent.pipe import PipeError
from conode.agent.supervisor import WorkerProcess
from conode.cluster import protocol
from conode.cluster.heartbeat import PeerLiveness
from conode.cluster.keys import KeyPair, load_key_pair
from conode.cluster.protocol import ProtocolError
from conode.cluster.transport import AuthRefused, ClientSocket
from conode.errors import ConodeError

log = logging.getLogger("conode.agent")

AGENT_KEY_NAME = "agent"
MAX_BUFFERED_BYTES = 64 << 20  # output kept while the coordinator is unreachable


@dataclass(frozen=True)
class AgentConfig:
    state_dir: Path
    name: str
    coordinator: str
    coordinator_key: str
    cores: int
    mem_mib: int
    owner_present: bool = False


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
        self.workers = [WorkerProcess(i, config.mem_mib) for i in range(config.cores)]
        self.jobs: dict[int, WorkerProcess] = {}  # running jobs and the worker running each
        self.backlog: deque[dict[str, Any]] = deque()  # run_job messages waiting for a free worker
        self._idle_since = time.time()
        self._running = True
        self._process = psutil.Process()

    # --- state -------------------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        if self.config.owner_present:
            return "Owner"
        return "Claimed" if self.jobs else "Unclaimed"

    def _held_jobs(self) -> list[int]:
        return sorted(set(self.jobs) | set(self.outbox.jobs()))

    def _speed(self) -> float:
        speeds = [w.speed for w in self.workers if w.speed]
        return sum(speeds) / len(speeds) if speeds else 0.0

    # --- the loop ------------------------------------------------------------------------------------------
    def run(self) -> None:
        for worker in self.workers:
            worker.start()
        log.info("agent %s: %d guest(s) of %d MiB, coordinator %s", self.config.name, self.config.cores,
                 self.config.mem_mib, self.config.coordinator)
        try:
            while self._running:
                self._poll_once(timeout_ms=200)
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
        self._keep_link()

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
        return 0.0 if self.config.owner_present else time.time() - self._idle_since

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
            self._dispatch_backlog()
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
            if not self.jobs:
                self._idle_since = time.time()
            self._dispatch_backlog()

    def _supervise_workers(self) -> None:
        now = self._clock()
        for worker in self.workers:
            if worker.process is not None and not worker.alive:
                self._drain_worker(worker)
                worker.read_stderr()
                why = worker.crashed(now)
                log.error("guest %d crashed: %s", worker.index, why)
                if worker.job is not None:
                    job, worker.job = worker.job, None
                    self.jobs.pop(job, None)
                    self._job_failed(job, f"guest crashed: {why}", retry=True)
            elif worker.process is None and worker.restart_at is not None and now >= worker.restart_at:
                worker.start()
