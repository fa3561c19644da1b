#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""How the coordinator scales with the number of agents: CPU, memory, placement latency, round trips.

For each N in ``--agents``, a real coordinator runs as a separate process (``coordinator init``, N agent keys
enrolled in its database, ``coordinator serve`` on a free localhost port). Generator processes (one per
``--per-generator`` agents, 2,500 by default: one Python process cannot play 10,000) play the N agents speaking
the real protocol over real CURVE DEALER sockets with the agent's link options (a connection whose data stays
unacknowledged for ``--link-timeout-ms`` drops): each says ``hello``, beats every second, answers ``run_job`` with
``job_finished`` after a short simulated run and takes ``ack``/``reconnect``. This process holds
an admin socket (the admin key ``init`` wrote) that submits jobs at ``--jobs-per-second`` meanwhile.

Measured per N, once every agent has joined:

* the coordinator's CPU use as % of one core: its CPU time (all its threads, user + system, from /proc via
  psutil) per second of wall time, over a window with heartbeats only and over the window with jobs flowing,
  plus the busiest second. CPU time, not wall time: on a shared host the coordinator may wait for a core,
  which costs it latency but not CPU time;
* its resident memory at the end of the window;
* placement latency: from the admin sending ``submit`` to the simulated agent receiving ``run_job`` (both on
  the system-wide monotonic clock, in different processes);
* agent round trip: ``job_finished`` sent to ``ack`` received (heartbeats are one-way in this protocol, so
  this is the agent-side round trip there is), and admin round trip of a cheap ``job`` request;
* jobs completed, and that every submitted job ended ``done`` (asked with the admin ``jobs`` request);
* the generators' own CPU and the lateness of their heartbeats (when each went out after it was due) and the
  heartbeats actually sent per second: if the generators fall behind, the coordinator gets fewer messages and
  the figures are not the coordinator's; reconnects (the coordinator lost a node) say the same of it.

Targets: 1,000 agents at a 1 Hz heartbeat under 10 % of one core (the design's, heartbeats only), and 10,000
agents at 1 Hz with 50 jobs/s under 50 % of one core with placement p95 under 20 ms (issue 15).

``--queue-depth N`` measures something else: how submission throughput holds up as the queue grows. A real
coordinator with no agents (so that every job stays queued) takes N submissions, one after another, from the
Python admin client (coordinator/client.py); the rate and the coordinator's CPU are printed per window of
``--window`` submissions. The target is 300 submissions/s or more with 2,000 jobs queued.
``--coordinator-code DIR`` runs the coordinator from another source tree (e.g. an older commit unpacked with
``git archive``), so that the same client measures before and after a change. ``--profile`` runs the coordinator under cProfile (which slows it: CPU figures are then
inflated) and prints its top costs. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import ctypes
import heapq
import json
import multiprocessing
import os
import platform
import pstats
import random
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil
import zmq

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from conode.cluster import protocol  # noqa: E402
from conode.cluster.transport import SOCKET_MAX_MESSAGE  # noqa: E402
from conode.limits import MAX_GUEST_MEM_MIB  # noqa: E402
from coordinator.config import StateDir, load_client_config  # noqa: E402
from coordinator.store import Store  # noqa: E402
from common import free_port  # noqa: E402

TARGET_IDLE_AGENTS = 1000  # the design target: heartbeats only
TARGET_IDLE_CPU_PERCENT = 10.0
TARGET_AGENTS = 10_000  # issue 15: heartbeats and a stream of jobs
TARGET_JOBS_PER_S = 50.0
TARGET_CPU_PERCENT = 50.0
TARGET_PLACEMENT_P95_MS = 20.0
AGENTS_PER_GENERATOR = 2500
HELLOS_IN_FLIGHT = 100  # per generator
JOB_MEM_MIB = 128


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile, None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(fraction * len(ordered) + 0.5)) - 1))
    return ordered[rank]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards *wanted* (up to the hard limit); return the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft




def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: the coordinator never outlives the benchmark
    except (OSError, AttributeError):
        pass


# --- the coordinator process --------------------------------------------------------------------------------
class CoordinatorProcess:
    """A real coordinator in its own process, in a scratch state directory with its own HOME."""

    def __init__(self, scratch: Path, profile: bool = False, log_level: str = "INFO",
                 code: Path | None = None) -> None:
        self.scratch = scratch
        self.state = StateDir(scratch / "state")
        self.port = free_port()
        self.bind = f"tcp://127.0.0.1:{self.port}"
        self.profile_path = scratch / "serve.prof" if profile else None
        self.log_level = log_level
        self.log_path = scratch / "coordinator.log"
        home = scratch / "home"
        home.mkdir(parents=True, exist_ok=True)
        # `init` also writes ~/.config/conode/client.toml: keep it out of the user's home.
        self.env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
                    "PYTHONUNBUFFERED": "1"}
        self.env.pop("CONODE_CLIENT_CONFIG", None)
        self.env.pop("CONODE_COORDINATOR", None)
        # `python -m` puts the working directory first on the path: run from the tree to measure.
        self.code = (code or REPO).resolve()
        self.env["PYTHONPATH"] = str(self.code)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    def init(self) -> None:
        done = subprocess.run([sys.executable, "-m", "coordinator.cli", "init", "--state-dir",
                               str(self.state.root), "--bind", self.bind],
                              capture_output=True, text=True, env=self.env, cwd=self.code, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"coordinator init failed: {done.stderr.strip()}")

    def enrol(self, agents: list[tuple[str, str]]) -> None:
        """Enrol (name, public key) pairs as agents, in one transaction, before `serve` starts."""
        store = Store(self.state.database)
        try:
            store.add_keys([(name, "agent", public) for name, public in agents])
        finally:
            store.close()

    def serve(self) -> None:
        command = [sys.executable]
        if self.profile_path is not None:
            command += ["-m", "cProfile", "-o", str(self.profile_path)]
        command += ["-m", "coordinator.cli", "serve", "--state-dir", str(self.state.root), "--log-level",
                    self.log_level]
        self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, env=self.env, cwd=self.code,
                                     preexec_fn=_die_with_parent)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it does not stop within 10 s; the exit status (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return self.proc.returncode

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# --- simulated agents, in generator processes ---------------------------------------------------------------
@dataclass
class SimAgent:
    index: int
    name: str
    public: str
    secret: str
    owner: bool = False
    sock: zmq.Socket | None = None
    welcomed_at: float | None = None
    joined: bool = False  # welcomed, and not told to reconnect since: beats go out only then, as an agent's do
    running: set[int] = field(default_factory=set)
    finished_at: dict[int, float] = field(default_factory=dict)  # job_finished sent, ack awaited
    idle_since: float = field(default_factory=time.time)

    @property
    def state(self) -> str:
        if self.owner:
            return "Owner"
        return "Claimed" if self.running else "Unclaimed"


@dataclass
class Stats:
    """What one generator saw; merged over the generators at the end."""

    welcomes: int = 0
    heartbeats: int = 0
    beat_lateness_s: list[float] = field(default_factory=list)
    send_failures: int = 0
    reconnects: int = 0  # the coordinator said reconnect (it had lost the node)
    hello_timeouts: int = 0  # no welcome within 5 s of a hello: said again
    errors: list[str] = field(default_factory=list)
    run_jobs: int = 0
    duplicate_run_jobs: int = 0
    ack_rtt_s: list[float] = field(default_factory=list)
    placed_at: dict[int, float] = field(default_factory=dict)  # job id -> run_job received (first time)
    finished: set[int] = field(default_factory=set)  # acked job_finished


def curve_dealer(context: zmq.Context, endpoint: str, server_public: str, public: str, secret: str,
                 link_timeout_ms: int = 0) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)  # the same options as conode.cluster.transport.ClientSocket
    sock.curve_serverkey = server_public.encode()
    sock.curve_publickey = public.encode()
    sock.curve_secretkey = secret.encode()
    sock.setsockopt(zmq.MAXMSGSIZE, SOCKET_MAX_MESSAGE)
    sock.setsockopt(zmq.IMMEDIATE, 1)
    if link_timeout_ms:  # an agent's link (conode/agent/link.py)
        sock.setsockopt(zmq.TCP_MAXRT, link_timeout_ms)
    sock.linger = 0
    sock.connect(endpoint)
    return sock


class Generator:
    """A share of the simulated agents, served by one epoll loop in a process of its own.

    zmq_poll looks at every socket on every call, which at thousands of sockets would make the generator the
    bottleneck; here epoll watches each socket's ZMQ_FD (level-triggered) and only the sockets it names are
    read. ZMQ_FD signals pending commands, not messages, and a send may consume the signal of a message that
    arrived meanwhile: so every send is followed by a look at ZMQ_EVENTS.
    """

    def __init__(self, endpoint: str, server_public: str, agents: list[SimAgent], job_seconds: float,
                 control: Any, link_timeout_ms: int, heartbeat_s: float = protocol.HEARTBEAT_INTERVAL_S) -> None:
        self.endpoint = endpoint
        self.server_public = server_public
        self.agents = agents
        for position, agent in enumerate(agents):
            agent.index = position  # this generator's own numbering: what its timers name
        self.job_seconds = job_seconds
        self.link_timeout_ms = link_timeout_ms
        self.heartbeat_s = heartbeat_s
        self.control = control  # the multiprocessing connection to the benchmark's main process
        self.context = zmq.Context()
        self.context.set(zmq.MAX_SOCKETS, len(agents) + 64)
        self.stats = Stats()
        self.epoll = select.epoll()
        self.by_fd: dict[int, SimAgent] = {}
        self.timers: list[tuple[float, int, str, int, int]] = []  # (due, seq, kind, agent index, job)
        self._seq = 0
        self.need_hello: set[int] = set()
        self.awaiting_welcome: set[int] = set()
        self.mark = (0, 0)  # heartbeats and lateness samples when the current window began
        self.running = True

    def close(self) -> None:
        for agent in self.agents:
            if agent.sock is not None:
                agent.sock.close(linger=0)
                agent.sock = None
        self.epoll.close()
        self.context.term()

    def _at(self, due: float, kind: str, agent: int, job: int = 0) -> None:
        self._seq += 1
        heapq.heappush(self.timers, (due, self._seq, kind, agent, job))

    def connect_all(self) -> None:
        for agent in self.agents:
            agent.sock = curve_dealer(self.context, self.endpoint, self.server_public, agent.public, agent.secret,
                                      self.link_timeout_ms)
            fd = agent.sock.getsockopt(zmq.FD)
            self.by_fd[fd] = agent
            self.epoll.register(fd, select.EPOLLIN)
            self.need_hello.add(agent.index)
        self.epoll.register(self.control.fileno(), select.EPOLLIN)

    def _hello(self, agent: SimAgent) -> bytes:
        return protocol.encode("hello", node=agent.name, cores=2, mem_mib=MAX_GUEST_MEM_MIB, speed=5.0e6,
                               state=agent.state, idle_s=time.time() - agent.idle_since,
                               running=sorted(agent.running), software="coordinator_scale benchmark")

    def _send(self, agent: SimAgent, payload: bytes, now: float) -> bool:
        sock = agent.sock
        assert sock is not None
        try:
            sock.send(payload, flags=zmq.NOBLOCK)
            sent = True
        except zmq.Again:
            self.stats.send_failures += 1
            sent = False
        if sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._drain(agent, now)
        return sent

    def _send_hellos(self, now: float) -> None:
        """Hellos for the agents that need one, at most HELLOS_IN_FLIGHT unanswered at a time: a whole pool
        joining within a second would measure a storm the coordinator's reconnect back-off does not make."""
        for index in list(self.need_hello):
            if len(self.awaiting_welcome) >= HELLOS_IN_FLIGHT:
                return
            agent = self.agents[index]
            if not agent.sock.getsockopt(zmq.EVENTS) & zmq.POLLOUT:  # type: ignore[union-attr]
                continue  # not connected yet (IMMEDIATE): try again on the next turn
            agent.sock.send(self._hello(agent), flags=zmq.NOBLOCK)  # type: ignore[union-attr]
            self.need_hello.discard(index)
            self.awaiting_welcome.add(index)
            self._at(now + 5.0, "hello_timeout", index)
            self._drain(agent, now)

    def _drain(self, agent: SimAgent, now: float) -> None:
        sock = agent.sock
        assert sock is not None
        while True:
            try:
                frame = sock.recv(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            self._on_message(agent, frame, now)
        sock.getsockopt(zmq.EVENTS)  # settles the ZMQ_FD signal

    def _on_message(self, agent: SimAgent, frame: bytes, now: float) -> None:
        try:
            message = protocol.decode(frame)
        except protocol.ProtocolError as exc:
            self.stats.errors.append(f"{agent.name}: malformed frame from the coordinator: {exc}")
            return
        kind = message["type"]
        if kind == "welcome":
            self.awaiting_welcome.discard(agent.index)
            agent.joined = True
            if agent.welcomed_at is None:
                self.stats.welcomes += 1
                # The first beat at a random phase, as agents that joined at different times would.
                self._at(now + random.uniform(0.0, self.heartbeat_s), "beat", agent.index)
            agent.welcomed_at = now
        elif kind == "run_job":
            job = int(message["job"])
            self.stats.run_jobs += 1
            if job in self.stats.placed_at:
                self.stats.duplicate_run_jobs += 1
            else:
                self.stats.placed_at[job] = now
            if job not in agent.running and job not in agent.finished_at:
                agent.running.add(job)
                self._at(now + self.job_seconds, "finish", agent.index, job)
        elif kind == "ack":
            job = int(message["job"])
            sent = agent.finished_at.pop(job, None)
            if sent is not None:
                self.stats.ack_rtt_s.append(now - sent)
                self.stats.finished.add(job)
        elif kind == "cancel_job":
            agent.running.discard(int(message["job"]))
        elif kind == "reconnect":
            self.stats.reconnects += 1
            agent.joined = False
            self.need_hello.add(agent.index)
        elif kind == "error":
            self.stats.errors.append(f"{agent.name}: {message['code']}: {message['message']}")
        else:
            self.stats.errors.append(f"{agent.name}: unexpected {kind}")

    def _on_timer(self, kind: str, index: int, job: int, due: float, now: float) -> None:
        agent = self.agents[index]
        if kind == "beat" and not agent.joined:
            self._at(max(due, now) + self.heartbeat_s, "beat", index)  # between a reconnect and a welcome: silent
        elif kind == "beat":
            payload = protocol.encode("heartbeat", node=agent.name, state=agent.state,
                                      idle_s=0.0 if agent.running else time.time() - agent.idle_since,
                                      running=sorted(agent.running | set(agent.finished_at)), speed=5.0e6,
                                      cpu_percent=100.0 * len(agent.running))
            if self._send(agent, payload, now):
                self.stats.heartbeats += 1
                self.stats.beat_lateness_s.append(now - due)
            next_due = due + self.heartbeat_s
            self._at(next_due if next_due > now else now + self.heartbeat_s, "beat", index)
        elif kind == "finish":
            if job in agent.running:
                agent.running.discard(job)
                if not agent.running:
                    agent.idle_since = time.time()
                payload = protocol.encode("job_finished", job=job, status=0, outputs={}, missing=[],
                                          runtime_s=self.job_seconds)
                agent.finished_at[job] = now
                self._send(agent, payload, now)
        elif kind == "hello_timeout":
            if agent.welcomed_at is None and index not in self.need_hello:
                self.awaiting_welcome.discard(index)
                self.stats.hello_timeouts += 1
                self.need_hello.add(index)

    def _on_command(self, command: str) -> None:
        """The main process asks; one answer per command."""
        stats = self.stats
        if command == "counts":
            self.control.send({"welcomes": stats.welcomes, "finished": len(stats.finished)})
        elif command == "mark":
            self.mark = (stats.heartbeats, len(stats.beat_lateness_s))
            self.control.send(None)
        elif command == "window":
            self.control.send({"heartbeats": stats.heartbeats - self.mark[0],
                               "lateness": stats.beat_lateness_s[self.mark[1]:]})
        elif command == "final":
            final = dict(vars(stats))
            final["beat_lateness_s"] = sorted(stats.beat_lateness_s)[-5:]  # the worst; the windows carry the rest
            self.control.send(final)
        elif command == "stop":
            self.running = False
            self.control.send(None)

    def serve(self) -> None:
        control = self.control.fileno()
        while self.running:
            now = time.monotonic()
            wait = 0.1
            if self.timers:
                wait = min(wait, self.timers[0][0] - now)
            if self.need_hello:
                wait = min(wait, 0.02)
            events = self.epoll.poll(max(0.0, wait))
            now = time.monotonic()
            for fd, _ in events:
                if fd == control:
                    while self.control.poll():
                        self._on_command(self.control.recv())
                else:
                    self._drain(self.by_fd[fd], now)
            while self.timers and self.timers[0][0] <= now:
                due, _, kind, index, job = heapq.heappop(self.timers)
                self._on_timer(kind, index, job, due, now)
            if self.need_hello:
                self._send_hellos(now)


def generator_main(control: Any, endpoint: str, server_public: str, agents: list[SimAgent],
                   job_seconds: float, link_timeout_ms: int) -> None:
    """A generator process: its agents join and live until the main process says stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process stops us
    generator = Generator(endpoint, server_public, agents, job_seconds, control, link_timeout_ms)
    try:
        generator.connect_all()
        generator.serve()
    finally:
        generator.close()


class Fleet:
    """The generator processes, each with its share of the agents, and their control connections."""

    def __init__(self, endpoint: str, server_public: str, agents: list[SimAgent], job_seconds: float,
                 per_generator: int, link_timeout_ms: int) -> None:
        count = max(1, -(-len(agents) // per_generator))
        context = multiprocessing.get_context("spawn")  # no zmq context inherited
        self.links: list[Any] = []
        self.procs: list[Any] = []
        for share in range(count):
            mine, theirs = context.Pipe()
            proc = context.Process(target=generator_main, daemon=True, name=f"generator-{share}",
                                   args=(theirs, endpoint, server_public, agents[share::count], job_seconds,
                                         link_timeout_ms))
            proc.start()
            theirs.close()
            self.links.append(mine)
            self.procs.append(proc)
        self.psutil = [psutil.Process(proc.pid) for proc in self.procs]

    def ask(self, command: str, timeout: float = 60.0) -> list[Any]:
        for link in self.links:
            link.send(command)
        answers = []
        for link, proc in zip(self.links, self.procs):
            if not link.poll(timeout):
                raise RuntimeError(f"generator {proc.name} did not answer {command!r} within {timeout:g} s")
            answers.append(link.recv())
        return answers

    def total(self, key: str) -> int:
        return sum(answer[key] for answer in self.ask("counts"))

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(proc) for proc in self.psutil)

    def stop(self) -> None:
        try:
            self.ask("stop", timeout=10.0)
        except (RuntimeError, OSError, EOFError):
            pass
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()


class Admin:
    """The admin socket in the main process: submissions at a steady rate, a `job` probe once a second."""

    def __init__(self, endpoint: str, server_public: str, public: str, secret: str) -> None:
        self.context = zmq.Context()
        self.sock = curve_dealer(self.context, endpoint, server_public, public, secret)
        self.pending: deque[tuple[str, float, Callable[[dict[str, Any]], None] | None]] = deque()
        self.unsent: deque[tuple[str, bytes, Callable[[dict[str, Any]], None] | None]] = deque()
        self.errors: list[str] = []
        self.rtt_s: list[float] = []
        self.submitted_at: dict[int, float] = {}  # job id -> submit sent
        self.submitting = False
        self.submit_interval = 0.0
        self.next_submit = 0.0
        self.next_probe = 0.0
        self.job_seconds = 0.0

    def close(self) -> None:
        self.sock.close(linger=0)
        self.context.term()

    def request(self, kind: str, on_reply: Callable[[dict[str, Any]], None] | None = None, **fields: Any) -> None:
        self.unsent.append((kind, protocol.encode(kind, **fields), on_reply))

    def _flush(self, now: float) -> None:
        while self.unsent:
            kind, payload, on_reply = self.unsent[0]
            try:
                self.sock.send(payload, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            self.unsent.popleft()
            self.pending.append((kind, now, on_reply))

    def _on_message(self, frame: bytes, now: float) -> None:
        message = protocol.decode(frame)
        if not self.pending:
            self.errors.append(f"admin: unexpected {message['type']}")
            return
        kind, sent, on_reply = self.pending.popleft()  # one connection: replies come in order
        if message["type"] == "error":
            self.errors.append(f"admin {kind}: {message['code']}: {message['message']}")
            return
        if kind == "submit":
            self.submitted_at[int(message["job"])] = sent
        elif kind == "job":
            self.rtt_s.append(now - sent)
        if on_reply is not None:
            on_reply(message)

    def start_submitting(self, rate: float, job_seconds: float) -> None:
        self.submitting = rate > 0
        self.submit_interval = 1.0 / rate if rate > 0 else 0.0
        self.job_seconds = job_seconds
        self.next_submit = time.monotonic()
        self.next_probe = time.monotonic() + 0.5

    def stop_submitting(self) -> None:
        self.submitting = False

    def run_until(self, done: Callable[[], bool], timeout: float,
                  tick: Callable[[], None] | None = None) -> bool:
        """Serve the admin socket and the submission schedule until *done()* or *timeout* s; True if done."""
        deadline = time.monotonic() + timeout
        while True:
            if done():
                return True
            now = time.monotonic()
            if now >= deadline:
                return False
            wait = min(deadline - now, 0.1)
            if self.submitting:
                wait = min(wait, self.next_submit - now, self.next_probe - now)
            if self.unsent:
                wait = min(wait, 0.005)
            if self.sock.poll(max(0, int(wait * 1000) + 1), zmq.POLLIN):
                now = time.monotonic()
                while True:
                    try:
                        frame = self.sock.recv(flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_message(frame, now)
            now = time.monotonic()
            if self.submitting:
                while self.next_submit <= now:
                    self.request("submit", argv=["sleep", str(self.job_seconds)], inputs={}, outputs=[],
                                 mem_mib=JOB_MEM_MIB)
                    self.next_submit += self.submit_interval
                if self.next_probe <= now:
                    self.request("job", job=1)
                    self.next_probe = now + 1.0
            if self.unsent:
                self._flush(now)
            if tick is not None:
                tick()

    def request_now(self, kind: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
        """Send a request and keep serving until its reply comes."""
        box: list[dict[str, Any]] = []
        errors_before = len(self.errors)
        self.request(kind, on_reply=box.append, **fields)
        if not self.run_until(lambda: bool(box) or len(self.errors) > errors_before, timeout):
            raise RuntimeError(f"the coordinator did not answer {kind} within {timeout:g} s")
        if not box:
            raise RuntimeError(self.errors[-1])
        return box[0]


# --- one run ------------------------------------------------------------------------------------------------
def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def wait_until_serving(coordinator: CoordinatorProcess, timeout: float = 30.0) -> None:
    from coordinator.client import AdminClient

    deadline = time.monotonic() + timeout
    config = load_client_config(coordinator.state.client_config)
    while time.monotonic() < deadline:
        if not coordinator.alive():
            raise RuntimeError(f"the coordinator exited:\n{coordinator.log_tail()}")
        try:
            with AdminClient(config, timeout_s=2.0, context=zmq.Context.instance()) as client:
                client.request("status", "status_reply")
            return
        except Exception:  # not listening yet
            time.sleep(0.2)
    raise RuntimeError(f"the coordinator did not start within {timeout:g} s:\n{coordinator.log_tail()}")


def run_one(n: int, args: argparse.Namespace, scratch_root: Path) -> dict[str, Any]:
    scratch = Path(tempfile.mkdtemp(prefix=f"n{n}-", dir=scratch_root))
    coordinator = CoordinatorProcess(scratch, profile=args.profile, log_level=args.log_level,
                                     code=args.coordinator_code)
    fleet: Fleet | None = None
    admin: Admin | None = None
    result: dict[str, Any] = {"agents": n}
    try:
        progress(f"N={n}: init, enrol {n} agent keys")
        coordinator.init()
        owners = int(round(n * args.owner_fraction))
        agents = []
        for i in range(n):
            public, secret = zmq.curve_keypair()
            agents.append(SimAgent(i, f"sim{i:05d}", public.decode(), secret.decode(), owner=i < owners))
        coordinator.enrol([(a.name, a.public) for a in agents])
        coordinator.serve()
        wait_until_serving(coordinator)
        proc = psutil.Process(coordinator.pid)
        cpu_start = cpu_seconds(proc)
        progress(f"N={n}: coordinator pid {coordinator.pid} serving on {coordinator.bind}; connecting agents")

        config = load_client_config(coordinator.state.client_config)
        admin = Admin(config.endpoint, config.server_public_key, config.keys.public, config.keys.secret)
        t_join = time.monotonic()
        fleet = Fleet(config.endpoint, config.server_public_key, agents, args.job_seconds, args.per_generator,
                      args.link_timeout_ms)
        result["generators"] = len(fleet.procs)
        joined = [0]

        def all_joined() -> bool:
            joined[0] = fleet.total("welcomes")  # type: ignore[union-attr]
            return joined[0] >= n

        while not all_joined():
            if time.monotonic() - t_join > 60 + n / 20:
                raise RuntimeError(f"only {joined[0]} of {n} agents were welcomed")
            admin.run_until(lambda: False, timeout=0.5)
        join_s = time.monotonic() - t_join
        join_cpu = cpu_seconds(proc) - cpu_start
        progress(f"N={n}: all agents joined in {join_s:.2f} s (coordinator CPU {join_cpu:.2f} s) through "
                 f"{len(fleet.procs)} generator processes; warming up")
        admin.run_until(lambda: False, timeout=args.warmup)

        def window(seconds: float) -> dict[str, Any]:
            """Run for *seconds*, sampling the coordinator's CPU time once a second."""
            assert fleet is not None and admin is not None
            samples: list[float] = []
            last = [time.monotonic(), cpu_seconds(proc)]

            def tick() -> None:
                t = time.monotonic()
                if t - last[0] >= 1.0:
                    c = cpu_seconds(proc)
                    samples.append(100.0 * (c - last[1]) / (t - last[0]))
                    last[0], last[1] = t, c

            fleet.ask("mark")
            t0, c0, g0 = time.monotonic(), cpu_seconds(proc), fleet.cpu_seconds()
            admin.run_until(lambda: False, timeout=seconds, tick=tick)
            elapsed = time.monotonic() - t0
            cpu, generators = cpu_seconds(proc) - c0, fleet.cpu_seconds() - g0
            answers = fleet.ask("window")
            lateness = [x for answer in answers for x in answer["lateness"]]
            return {"cpu_percent": 100.0 * cpu / elapsed,
                    "cpu_peak_1s_percent": max(samples) if samples else float("nan"),
                    "generators_cpu_percent": 100.0 * generators / elapsed,
                    "heartbeats_per_s": sum(answer["heartbeats"] for answer in answers) / elapsed,
                    "beat_lateness_ms_p50": _ms(median(lateness)),
                    "beat_lateness_ms_p95": _ms(percentile(lateness, 0.95)),
                    "beat_lateness_ms_max": _ms(max(lateness) if lateness else None),
                    "seconds": elapsed}

        idle_s = 2.0 if args.quick else args.idle_seconds
        progress(f"N={n}: {idle_s:g} s of heartbeats only")
        idle = window(idle_s)
        progress(f"N={n}: {args.duration:g} s with {args.jobs_per_second:g} jobs/s")
        admin.start_submitting(args.jobs_per_second, args.job_seconds)
        busy = window(args.duration)
        admin.stop_submitting()
        rss = proc.memory_info().rss

        # Let every submitted job finish, then ask the coordinator where each one ended.
        admin.run_until(lambda: not admin.pending and not admin.unsent, timeout=30)  # type: ignore[union-attr]
        submitted = set(admin.submitted_at)
        deadline = time.monotonic() + 30 + 2 * args.job_seconds
        while fleet.total("finished") < len(submitted) and time.monotonic() < deadline:
            admin.run_until(lambda: False, timeout=0.5)
        reply = admin.request_now("jobs", limit=len(submitted) + 100)
        states = {j["id"]: j["state"] for j in reply["jobs"]}
        for job in submitted - set(states):  # beyond what one `jobs` reply lists
            states[job] = admin.request_now("job", job=job)["job"]["state"]
        not_done = sorted(j for j in submitted if states.get(j) != "done")
        status = admin.request_now("status")
        stats = fleet.ask("final")
        placed_at = {job: t for s in stats for job, t in s["placed_at"].items()}
        finished = set().union(*(s["finished"] for s in stats))
        ack_rtt = [x for s in stats for x in s["ack_rtt_s"]]
        errors = admin.errors + [e for s in stats for e in s["errors"]]
        latencies = [placed_at[j] - admin.submitted_at[j] for j in submitted if j in placed_at]
        result.update({
            "join_s": join_s,
            "join_cpu_s": join_cpu,
            "idle": idle,
            "busy": busy,
            "rss_mib": rss / (1 << 20),
            "placement_ms_median": _ms(median(latencies)),
            "placement_ms_p95": _ms(percentile(latencies, 0.95)),
            "ack_rtt_ms_median": _ms(median(ack_rtt)),
            "ack_rtt_ms_p95": _ms(percentile(ack_rtt, 0.95)),
            "admin_rtt_ms_median": _ms(median(admin.rtt_s)),
            "admin_rtt_ms_p95": _ms(percentile(admin.rtt_s, 0.95)),
            "jobs_submitted": len(submitted),
            "jobs_completed": len(finished & submitted),
            "jobs_done_per_coordinator": len(submitted) - len(not_done),
            "jobs_not_done": not_done[:20],
            "nodes_in_status": status["totals"]["nodes"],
            "duplicate_run_jobs": sum(s["duplicate_run_jobs"] for s in stats),
            "reconnects": sum(s["reconnects"] for s in stats),
            "hello_timeouts": sum(s["hello_timeouts"] for s in stats),
            "worst_lateness_s": sorted(x for s in stats for x in s["beat_lateness_s"])[-5:],
            "send_failures": sum(s["send_failures"] for s in stats),
            "errors": errors[:20],
            "owner_nodes": owners,
        })
    finally:
        if fleet is not None:
            fleet.stop()
        if admin is not None:
            admin.close()
        result["coordinator_exit"] = coordinator.stop()
        if coordinator.profile_path is not None and coordinator.profile_path.exists():
            result["profile"] = str(coordinator.profile_path)
            print_profile(coordinator.profile_path, n)
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            progress(f"N={n}: state kept in {scratch}")
    return result


TARGET_SUBMITS_PER_S = 300.0
TARGET_QUEUE_DEPTH = 2000


def run_queue_depth(args: argparse.Namespace, scratch_root: Path) -> list[dict[str, float]]:
    """Submit args.queue_depth jobs to a coordinator with no agents; the rate per window of args.window."""
    from coordinator.client import AdminClient

    scratch = Path(tempfile.mkdtemp(prefix="queue-", dir=scratch_root))
    coordinator = CoordinatorProcess(scratch, profile=args.profile, log_level="WARNING",
                                     code=args.coordinator_code)
    windows: list[dict[str, float]] = []
    try:
        coordinator.init()
        coordinator.serve()
        wait_until_serving(coordinator)
        proc = psutil.Process(coordinator.pid)
        config = load_client_config(coordinator.state.client_config)
        progress(f"queue depth: {args.queue_depth} submissions in windows of {args.window}")
        with AdminClient(config, context=zmq.Context.instance()) as client:
            depth = 0
            while depth < args.queue_depth:
                count = min(args.window, args.queue_depth - depth)
                t0, c0 = time.perf_counter(), cpu_seconds(proc)
                for _ in range(count):
                    client.request("submit", "submitted", argv=["true"], inputs={}, outputs=[],
                                   mem_mib=JOB_MEM_MIB)
                elapsed = time.perf_counter() - t0
                windows.append({"from": depth, "to": depth + count, "per_s": count / elapsed,
                                "cpu_percent": 100.0 * (cpu_seconds(proc) - c0) / elapsed})
                depth += count
            status = client.request("status", "status_reply")
        queued = status["totals"]["jobs"]["queued"]
        if queued != args.queue_depth:
            raise RuntimeError(f"{queued} jobs queued after {args.queue_depth} submissions")
    finally:
        coordinator.stop()
        if coordinator.profile_path is not None and coordinator.profile_path.exists():
            print_profile(coordinator.profile_path, 0)
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    return windows


def print_queue_depth(windows: list[dict[str, float]], args: argparse.Namespace) -> bool:
    """The table; True if the target is met at the deepest window."""
    code = f" (coordinator from {args.coordinator_code})" if args.coordinator_code else ""
    print(f"\nsubmission throughput as the queue grows, Python admin client, no agents{code}:")
    rows = [["queued before -> after", "submissions/s", "coordinator CPU (% core)"]]
    rows += [[f"{w['from']:>6} -> {w['to']:<6}", f"{w['per_s']:.0f}", f"{w['cpu_percent']:.0f}"] for w in windows]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    last = windows[-1]
    met = last["per_s"] >= TARGET_SUBMITS_PER_S
    if last["to"] >= TARGET_QUEUE_DEPTH:
        print(f"\ntarget: >= {TARGET_SUBMITS_PER_S:.0f} submissions/s with {TARGET_QUEUE_DEPTH} queued: "
              f"{'met' if met else 'MISSED'} ({last['per_s']:.0f}/s at {last['from']}..{last['to']} queued; "
              f"first window {windows[0]['per_s']:.0f}/s)")
    return met


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000.0 * seconds


def print_profile(path: Path, n: int) -> None:
    print(f"\ncoordinator profile, N={n} (cProfile, main thread; top 25 by own time):")
    stats = pstats.Stats(str(path), stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(25)
    print(f"coordinator profile, N={n}: top 25 by cumulative time:")
    stats.sort_stats("cumulative").print_stats(25)


# --- the table ----------------------------------------------------------------------------------------------
def _fmt(value: Any, spec: str = ".1f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def print_table(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    rows: list[tuple[str, Callable[[dict[str, Any]], str], str]] = [
        ("agents joined (s to join all)", lambda r: f"{r['nodes_in_status']} ({r['join_s']:.1f} s)", ""),
        ("coordinator CPU during join (s)", lambda r: _fmt(r["join_cpu_s"], ".2f"), ""),
        ("coordinator CPU, heartbeats only (% core)", lambda r: _fmt(r["idle"]["cpu_percent"]),
         f"< {TARGET_IDLE_CPU_PERCENT:g} at {TARGET_IDLE_AGENTS}"),
        ("coordinator CPU, with jobs (% core)", lambda r: _fmt(r["busy"]["cpu_percent"]),
         f"< {TARGET_CPU_PERCENT:g} at {TARGET_AGENTS}"),
        ("coordinator CPU, busiest second (% core)", lambda r: _fmt(r["busy"]["cpu_peak_1s_percent"]), ""),
        ("coordinator RSS (MiB)", lambda r: _fmt(r["rss_mib"]), ""),
        ("placement latency median / p95 (ms)",
         lambda r: f"{_fmt(r['placement_ms_median'])} / {_fmt(r['placement_ms_p95'])}",
         f"p95 < {TARGET_PLACEMENT_P95_MS:g}"),
        ("agent round trip finished->ack med / p95 (ms)",
         lambda r: f"{_fmt(r['ack_rtt_ms_median'])} / {_fmt(r['ack_rtt_ms_p95'])}", ""),
        ("admin round trip `job` med / p95 (ms)",
         lambda r: f"{_fmt(r['admin_rtt_ms_median'])} / {_fmt(r['admin_rtt_ms_p95'])}", ""),
        ("jobs submitted / completed / done", lambda r: (f"{r['jobs_submitted']} / {r['jobs_completed']} / "
                                                         f"{r['jobs_done_per_coordinator']}"), "all done"),
        ("heartbeats sent per s, idle / with jobs", lambda r: (f"{r['idle']['heartbeats_per_s']:.0f} / "
                                                               f"{r['busy']['heartbeats_per_s']:.0f}"), "= N"),
        ("generators: processes, CPU (% core)",
         lambda r: f"{r['generators']}, {_fmt(r['busy']['generators_cpu_percent'], '.0f')}", ""),
        ("heartbeat lateness p50 / p95 / max (ms)",
         lambda r: " / ".join(_fmt(r["busy"][f"beat_lateness_ms_{q}"], ".0f") for q in ("p50", "p95", "max")),
         ""),
        ("reconnects / hellos again / send failures / errors",
         lambda r: f"{r['reconnects']} / {r['hello_timeouts']} / {r['send_failures']} / {len(r['errors'])}",
         "0 / 0 / 0 / 0"),
    ]
    headers = ["metric"] + [f"N={r['agents']}" for r in results] + ["target"]
    cells = [headers] + [[label] + [fn(r) for r in results] + [target] for label, fn, target in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    print()
    print(f"coordinator scale: {args.duration:g} s window, {args.jobs_per_second:g} jobs/s of "
          f"{args.job_seconds:g} s, 1 Hz heartbeats, owner-present nodes {args.owner_fraction:.0%}; CPU is the "
          f"coordinator's CPU time (all threads) per wall second" + (" (cProfile: CPU inflated)" if args.profile else ""))
    for row in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print()
    judge_target(results, TARGET_IDLE_AGENTS, f"{TARGET_IDLE_AGENTS} agents at 1 Hz heartbeat under "
                 f"{TARGET_IDLE_CPU_PERCENT:g} % of one core",
                 lambda r: (r["idle"]["cpu_percent"] < TARGET_IDLE_CPU_PERCENT, f"{r['idle']['cpu_percent']:.1f} %"))
    judge_target(results, TARGET_AGENTS, f"{TARGET_AGENTS} agents at 1 Hz heartbeat with {TARGET_JOBS_PER_S:g} "
                 f"jobs/s under {TARGET_CPU_PERCENT:g} % of one core, placement p95 under "
                 f"{TARGET_PLACEMENT_P95_MS:g} ms",
                 lambda r: (args.jobs_per_second >= TARGET_JOBS_PER_S and r["busy"]["cpu_percent"] < TARGET_CPU_PERCENT
                            and (r["placement_ms_p95"] or float("inf")) < TARGET_PLACEMENT_P95_MS,
                            f"{r['busy']['cpu_percent']:.1f} % with {args.jobs_per_second:g} jobs/s, p95 "
                            f"{_fmt(r['placement_ms_p95'])} ms"))
    for r in results:
        for message in r["errors"]:
            print(f"  N={r['agents']} error: {message}")
        if r["jobs_not_done"]:
            print(f"  N={r['agents']} jobs not done: {r['jobs_not_done']}")


def judge_target(results: list[dict[str, Any]], agents: int, what: str,
                 verdict: Callable[[dict[str, Any]], tuple[bool, str]]) -> None:
    """Print whether the run with *agents* agents meets a target."""
    at_target = [r for r in results if r["agents"] == agents]
    if not at_target:
        print(f"target: {what} (not measured: no run with {agents} agents)")
        return
    met, figures = verdict(at_target[0])
    print(f"target: {what}: {'met' if met else 'MISSED'} ({figures} at N={at_target[0]['agents']})")


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10)
    except OSError:
        return None
    return done.stdout.strip() or None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, nargs="+", default=None, metavar="N",
                   help="numbers of simulated agents, one run each (default: 1000 10000; --quick: 20 100)")
    p.add_argument("--duration", type=float, default=None, metavar="SECONDS",
                   help="the measured window with jobs flowing (default 20; --quick: 5)")
    p.add_argument("--jobs-per-second", type=float, default=TARGET_JOBS_PER_S,
                   help=f"admin submissions per second (default {TARGET_JOBS_PER_S:g})")
    p.add_argument("--idle-seconds", type=float, default=10.0,
                   help="the measured window with heartbeats only (default 10; --quick: 2)")
    p.add_argument("--per-generator", type=int, default=AGENTS_PER_GENERATOR, metavar="N",
                   help=f"simulated agents per generator process (default {AGENTS_PER_GENERATOR})")
    p.add_argument("--log-level", default="INFO", help="the coordinator's log level (default INFO)")
    p.add_argument("--job-seconds", type=float, default=0.5, help="simulated run time of a job (default 0.5)")
    p.add_argument("--owner-fraction", type=float, default=0.0,
                   help="share of agents reporting the owner present (state Owner, never given jobs; "
                        "default 0)")
    p.add_argument("--link-timeout-ms", type=int, default=protocol.LINK_TIMEOUT_MS, metavar="MS",
                   help=f"how long a simulated agent's link waits for its data to be acknowledged before it drops "
                        f"(default {protocol.LINK_TIMEOUT_MS}, the agent's)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds after the last join before measuring")
    p.add_argument("--quick", action="store_true", help="small and short: for development")
    p.add_argument("--profile", action="store_true",
                   help="run the coordinator under cProfile and print its top costs (inflates CPU figures)")
    p.add_argument("--keep", action="store_true", help="keep the scratch state directories")
    p.add_argument("--queue-depth", type=int, default=None, metavar="N",
                   help="instead: submit N jobs to a coordinator without agents and print the submission rate "
                        "as the queue grows (target: 300/s at 2000)")
    p.add_argument("--window", type=int, default=250, help="submissions per measured window (--queue-depth)")
    p.add_argument("--coordinator-code", type=Path, default=None, metavar="DIR",
                   help="run the coordinator from this source tree (for before/after figures)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the figures as JSON")
    args = p.parse_args(argv)
    if args.queue_depth is not None:
        if args.queue_depth < 1 or args.window < 1:
            p.error("--queue-depth and --window must be at least 1")
        with tempfile.TemporaryDirectory(prefix="conode-coord-queue-") as scratch_root:
            try:
                windows = run_queue_depth(args, Path(scratch_root))
            except RuntimeError as exc:
                progress(f"failed: {exc}")
                return 1
        met = print_queue_depth(windows, args)
        if args.json:
            args.json.write_text(json.dumps({"benchmark": "coordinator_queue_depth", "commit": _git_commit(),
                                             "coordinator_code": str(args.coordinator_code or REPO),
                                             "windows": windows}, indent=2) + "\n")
        return 0 if met or args.queue_depth < TARGET_QUEUE_DEPTH else 1
    if args.agents is None:
        args.agents = [20, 100] if args.quick else [TARGET_IDLE_AGENTS, TARGET_AGENTS]
    if args.duration is None:
        args.duration = 5.0 if args.quick else 20.0
    if args.quick:
        args.warmup = min(args.warmup, 1.0)
    if not 0.0 <= args.owner_fraction <= 1.0:
        p.error("--owner-fraction must be between 0 and 1")
    if args.per_generator < 1:
        p.error("--per-generator must be at least 1")

    # One TCP connection per agent in the coordinator, and in each generator one DEALER per agent (its TCP
    # connection and its mailbox); the children inherit this limit.
    wanted = max(max(args.agents), 3 * args.per_generator) + 256
    limit = raise_fd_limit(wanted)
    if limit < wanted:
        progress(f"warning: open-file limit {limit} is below the {wanted} this run may need")

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    results: list[dict[str, Any]] = []
    started = time.monotonic()
    failed = False
    scratch_root = Path(tempfile.mkdtemp(prefix="conode-coord-scale-"))
    try:
        try:
            for n in args.agents:
                results.append(run_one(n, args, scratch_root))
                r = results[-1]
                progress(f"N={n}: CPU {r['idle']['cpu_percent']:.1f} % idle, {r['busy']['cpu_percent']:.1f} % with "
                         f"jobs; RSS {r['rss_mib']:.0f} MiB; placement p50/p95 {_fmt(r['placement_ms_median'])} / "
                         f"{_fmt(r['placement_ms_p95'])} ms; lateness p95 "
                         f"{_fmt(r['busy']['beat_lateness_ms_p95'], '.0f')} ms; reconnects {r['reconnects']}")
        except KeyboardInterrupt:
            progress("interrupted: coordinator stopped")
            return 130
        except RuntimeError as exc:
            progress(f"failed: {exc}")
            failed = True
    finally:
        if not args.keep:
            shutil.rmtree(scratch_root, ignore_errors=True)
    if results:
        print_table(results, args)
    progress(f"done in {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "coordinator_scale",
            "host": {"machine": platform.machine(), "python": platform.python_version(),
                     "cpus": os.cpu_count(), "zmq": zmq.zmq_version(), "pyzmq": zmq.__version__},
            "commit": _git_commit(),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "results": results,
        }, indent=2) + "\n")
    bad = failed or any(r["jobs_not_done"] or r["jobs_completed"] < r["jobs_submitted"]
                        or r["nodes_in_status"] != r["agents"] for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
