"""The agent's guests: one worker slot per offered core, the jobs they run, the backlog, vacated guests on disk.

Everything a worker says is validated (wire.py) before it is acted on: a worker that sends something invalid is
discarded like a crashed one (its job fails with the reason and is retried elsewhere; the slot restarts with
back-off), and a result whose files exceed the pool's limits fails that job alone. What the coordinator must
hear goes out through a Reports (the coordinator link): live messages, and results kept until acknowledged.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Protocol

import psutil

from conode.agent.checkpoints import CheckpointRefused, Checkpoints
from conode.agent.conet import Unplugged
from conode.agent.disk import StateDisk
from conode.agent.moves import AgentMoves
from conode.agent.images import ImageFetcher, ImageRefused, ImageSpec
from conode.agent.pipe import PipeError
from conode.agent.supervisor import StartWorker, WorkerHandle, restart_delay
from conode.agent.wire import OutputLimitError, validate_from_worker, validate_to_worker
from conode.cluster.protocol import CUT_HOLD_S
from conode import output_cap
from conode.errors import ConodeError
from conode.idle.policy import OwnerState, guest_may_run
from conode.limits import DEFAULT_DISK_BUDGET_MIB, MAX_DISK_BUDGET_MIB, MAX_STREAM_BYTES, OUTPUT_CHUNK_BYTES
from conode.metrics import Buckets
from conode.tomlfile import read_toml, write_toml
from conode.vm.guest_image import image_tag

log = logging.getLogger("conode.agent")

MOVE_MESSAGES = ("listening", "move_ready", "moved_out", "moved_in", "move_failed")  # for the mover (moves.py)

DRAIN_S = 2.0  # how long an exited worker's last words may take to arrive before it is judged without them
YIELD_SAMPLES = 100
YIELD_LATENCY_BOUNDS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


def _resident_bytes(pid: int) -> int | None:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return None


class Reports(Protocol):
    """Where the guests' news goes: the coordinator link."""

    def report(self, kind: str, **fields: Any) -> None:
        """A live message (output, vacated, resumed): sent now, or buffered while the coordinator is away."""

    def result(self, job: int, kind: str, **fields: Any) -> None:
        """A job's final word (job_finished, job_failed): kept until the coordinator acknowledges it."""


@dataclass
class WorkerSlot:
    """One guest slot: the agent's knowledge of the worker running in it (if any) and its job."""

    index: int
    handle: WorkerHandle | None = None
    ready: bool = False
    paused: bool = False  # the worker confirmed its guest is stopped
    pause_requested: bool = False
    vacating: bool = False
    stopping: bool = False
    broken: str | None = None  # why the agent discarded the worker
    exited_at: float | None = None
    resumed_jobs: list[int] = field(default_factory=list)  # jobs continued from a vacated snapshot this run
    speed: float = 0.0
    guest: str = ""
    job: int | None = None
    crashes: int = 0  # in a row, before a worker came up ready
    restart_at: float | None = None
    receiving: int | None = None  # the job whose guest the worker is taking in from another agent (moves.py)

    @property
    def alive(self) -> bool:
        return self.handle is not None and self.handle.exit_code() is None

    def clear(self) -> None:
        """Forget the worker (it has exited); keep the slot's history (crashes, speed)."""
        self.handle = None
        self.ready = self.paused = self.pause_requested = self.vacating = self.stopping = False
        self.broken = None
        self.receiving = None
        self.exited_at = None

    @property
    def state(self) -> str:
        if not self.alive:
            return "stopped"
        if self.receiving is not None:
            return "receiving"
        return "paused" if self.paused else "running" if self.ready else "starting"


class Ports(Protocol):
    """Where a guest's NIC is plugged in (the agent's conet switch)."""

    def attach(self, guest: int, net: dict[str, Any]) -> dict[str, Any]: ...

    def plug(self, guest: int, port: dict[str, Any]) -> dict[str, Any] | None: ...

    def port_of(self, guest: int) -> dict[str, Any] | None: ...

    def detach(self, guest: int) -> None: ...


class Guests:
    def __init__(self, cores: int, mem_mib: int, state_dir: Path, start_worker: StartWorker, reports: Reports,
                 clock: Callable[[], float], disk: StateDisk, ports: Ports | None = None,
                 images: ImageFetcher | None = None, checkpoints: Checkpoints | None = None) -> None:
        self.mem_mib = mem_mib
        self._checkpoints = checkpoints
        self._ports = ports or Unplugged()
        self._start_worker = start_worker
        self._reports = reports
        self._clock = clock
        self._disk = disk
        self.slots = [WorkerSlot(i) for i in range(cores)]
        self.jobs: dict[int, WorkerSlot] = {}  # running jobs and the slot running each
        self.backlog: deque[dict[str, Any]] = deque()  # run messages waiting for a free worker
        self.fetching: dict[int, dict[str, Any]] = {}  # run messages waiting for their image
        self.job_images: dict[int, str] = {}  # the image (SHA-256) of each job held here that runs on one
        self.owners: dict[int, str] = {}  # who submitted each job held here, when the coordinator said
        self._images = images
        self._streamed: dict[int, int] = {}  # job -> stdout and stderr bytes forwarded
        self._cut_pieces: dict[int, tuple[int, int]] = {}  # job -> (cut, piece number) of its latest cut_taken
        self.yield_latencies: deque[float] = deque(maxlen=YIELD_SAMPLES)  # owner input -> guest stopped, s
        self.yield_buckets = Buckets(YIELD_LATENCY_BOUNDS)  # all of them, for the metrics
        self.activity_at: float | None = None  # wall time of the owner's input that stopped the guests
        self.vacated_dir = state_dir / "vacated"
        disk.attempt("create the vacated-guests directory", lambda: self.vacated_dir.mkdir(exist_ok=True))
        # The guests' disk overlays: a job's lives as long as its guest; a vacated guest's is in its snapshot.
        self.overlay_dir = state_dir / "overlays"
        disk.attempt("clear the disk overlays", lambda: self._clear_overlays())
        # A post-boot snapshot belongs to one guest image: a new image (an upgrade) boots afresh.
        self.boot_snapshot = state_dir / f"boot-{image_tag()}.snap"
        disk.attempt("remove stale boot snapshots", lambda: self._remove_stale_boot_snapshots(state_dir))
        self._vacated_ports: dict[int, dict[str, Any]] = {}  # a vacated job's conet port (mac, ip, network)
        self._vacated_checkpoints: dict[int, dict[str, Any]] = {}  # what a vacated job's checkpoints go on from
        self.vacated: dict[int, int] = disk.attempt("read the vacated guests", self._read_vacated) or {}
        self.mover: AgentMoves | None = None  # moves of guests to and from other agents, if the agent moves them

    # --- what the agent holds ----------------------------------------------------------------------------
    def held_jobs(self) -> set[int]:
        incoming = set(self.mover.incoming) if self.mover is not None else set()
        return (set(self.jobs) | set(self.vacated) | set(self.fetching) | {int(m["job"]) for m in self.backlog}
                | incoming)

    def images_in_use(self) -> set[str]:
        """The images a guest here uses or waits for: never evicted from the cache."""
        return {self.job_images[job] for job in self.held_jobs() if job in self.job_images}

    @property
    def busy(self) -> bool:
        return bool(self.jobs or self.vacated)

    def speed(self) -> float:
        speeds = [slot.speed for slot in self.slots if slot.speed]
        return sum(speeds) / len(speeds) if speeds else 0.0

    def pids(self) -> set[int]:
        return {slot.handle.pid for slot in self.slots if slot.handle is not None and slot.alive}

    def status(self) -> list[dict[str, Any]]:
        """Each guest: its state, job (and the job's owner when the coordinator said), CPU and memory used."""
        rows = []
        for s in self.slots:
            live = s.handle is not None and s.alive
            rows.append({"index": s.index, "pid": s.handle.pid if live else None,  # type: ignore[union-attr]
                         "state": s.state, "job": s.job, "owner": self.owners.get(s.job) if s.job else None,
                         "guest": s.guest, "speed": s.speed, "crashes": s.crashes,
                         "cpu_percent": s.handle.cpu_percent() if live else 0.0,  # type: ignore[union-attr]
                         "memory_bytes": _resident_bytes(s.handle.pid) if live else None})  # type: ignore[union-attr]
        return rows

    def saved_bytes(self) -> int:
        """What the vacated guests take on disk."""
        total = 0
        for entry in os.scandir(self.vacated_dir):
            try:
                total += entry.stat().st_size if entry.is_file() else 0
            except OSError:
                pass  # removed meanwhile
        return total

    def saved_budget_bytes(self) -> int:
        """The most the vacated guests can take: each guest's memory and the largest disk budget, per slot."""
        return len(self.slots) * ((self.mem_mib + MAX_DISK_BUDGET_MIB) << 20)

    # --- jobs from the coordinator ------------------------------------------------------------------------
    def accept(self, message: dict[str, Any]) -> None:
        job = int(message["job"])
        if job in self.held_jobs():
            return  # a duplicate placement: we have it already
        if "owner" in message:
            self.owners[job] = message["owner"]
        if message["mem_mib"] > self.mem_mib:
            self._fail(job, f"needs {message['mem_mib']} MiB, guests here have {self.mem_mib}", retry=False)
            return
        run: dict[str, Any] = {"type": "run", "job": job, "argv": message["argv"], "inputs": message["inputs"],
                               "outputs": message["outputs"]}
        seq = 0  # the number of the job's next checkpoint piece
        if "resume" in message:  # it goes on from its checkpoint, taken on a workstation that died
            try:
                if self._checkpoints is None:
                    raise CheckpointRefused("this agent does not take jobs from checkpoints")
                run = {"type": "restore", "job": job, "pieces": self._checkpoints.chain(job, message["resume"])}
            except CheckpointRefused as exc:
                self._fail(job, str(exc), retry=True)
                return
            seq = max(entry["seq"] for entry in message["resume"]) + 1
        if (message.get("checkpoint_s", 0) > 0 or message.get("cuts")) and self._checkpoints is not None:
            # a gang's rank is checkpointed only in its gang's cuts (interval 0), a job every checkpoint_s
            run["checkpoint"] = self._checkpoints.settings(0.0 if message.get("cuts") else message["checkpoint_s"],
                                                           seq)
        if "net" in message:
            run["net"] = self._ports.attach(job, message["net"])
        if "image" in message:
            if self._images is None:
                self._fail(job, "this agent does not run jobs on pool images", retry=True)
                return
            spec = ImageSpec.of(message["image"])
            self.job_images[job] = spec.sha256
            run["disk"] = {"base": str(self._images.cache.path(spec.sha256)),
                           "overlay": str(self.overlay_path(job)),
                           "budget_mib": message.get("disk_mib", DEFAULT_DISK_BUDGET_MIB)}
        try:
            run = validate_to_worker(run)
        except PipeError as exc:
            self._fail(job, f"cannot run it: {exc}", retry=False)
            return
        if "image" in message and not self._image_ready(job, ImageSpec.of(message["image"])):
            self.fetching[job] = run
            return
        self.backlog.append(run)
        self.dispatch()

    def free_slot(self) -> WorkerSlot | None:
        """A worker that is up, running (not paused) and has nothing to do: one to take a guest in."""
        return next((s for s in self.slots if s.alive and s.ready and s.job is None and s.receiving is None
                     and not (s.vacating or s.stopping or s.paused or s.pause_requested)), None)

    def image_path(self, spec: ImageSpec) -> Path | None:
        """Where *spec* is in the image cache, or None if it is not there (it is then fetched)."""
        if self._images is not None and self._images.cache.ready(spec.sha256):
            return self._images.cache.path(spec.sha256)
        if self._images is not None:
            self._fetch_image(spec)
        return None

    def overlay_path(self, job: int) -> Path:
        return self.overlay_dir / f"job-{job}.cow"

    def _image_ready(self, job: int, spec: ImageSpec) -> bool:
        """Whether the job's image is here; if not, it is fetched (the job waits) or the job fails saying why."""
        problem = self._fetch_image(spec)
        if problem is not None:
            self._fail(job, problem, retry=True)
        elif self._images is not None and spec.sha256 in self._images.pending:
            log.info("job %d waits for %s", job, spec.shown)
            return False
        return problem is None

    def _fetch_image(self, spec: ImageSpec) -> str | None:
        """Have *spec* fetched unless it is here (making room for it in the cache); why it cannot be, or None."""
        assert self._images is not None
        cache = self._images.cache
        try:
            if cache.ready(spec.sha256):
                cache.touch(spec)
                return None
            if spec.sha256 not in self._images.pending:
                cache.make_room(spec, self.images_in_use() - {spec.sha256})
        except ImageRefused as exc:
            return str(exc)
        except OSError as exc:  # the state disk is full or read-only: this job cannot have its image here
            log.warning("cannot use the image cache: %s", exc)
            return f"this agent cannot keep {spec.shown}: {exc.strerror or exc}"
        self._images.want(spec)
        return None

    def _images_fetched(self) -> None:
        """Start the jobs whose image arrived; fail those whose image could not be had (to run elsewhere)."""
        if self._images is None:
            return
        for sha, problem in self._images.results():
            for job in [job for job in self.fetching if self.job_images.get(job) == sha]:
                run = self.fetching.pop(job)
                if problem is None:
                    self.backlog.append(run)
                else:
                    self._fail(job, problem, retry=True)
            for index in {index for job, index in self.vacated.items() if self.job_images.get(job) == sha}:
                if problem is not None:
                    self._discard_vacated(index, problem)
        self.dispatch()

    def cancel(self, job: int) -> None:
        if self.mover is not None:
            self.mover.cancel(job)
        if job in self.vacated:
            self._discard_vacated(self.vacated.pop(job), f"job {job}, saved with it, was cancelled")
        self.backlog = deque(m for m in self.backlog if m["job"] != job)
        self.fetching.pop(job, None)
        slot = self.jobs.pop(job, None)
        self.forget(job)
        if slot is not None:
            self.send_to(slot, {"type": "cancel", "job": job})
            slot.job = None
            self.dispatch()

    def dispatch(self) -> None:
        while self.backlog:
            slot = next((s for s in self.slots if s.alive and s.job is None and s.receiving is None
                         and not (s.vacating or s.stopping)), None)
            if slot is None:
                return
            run = self.backlog.popleft()
            job = run["job"]
            slot.job = job
            self.jobs[job] = slot
            self.send_to(slot, run)
            if run["type"] == "restore":
                log.info("job %d goes on from its checkpoint on guest %d", job, slot.index)
            else:
                log.info("job %d started on guest %d: %s", job, slot.index, " ".join(run["argv"])[:120])

    def _fail(self, job: int, reason: str, retry: bool) -> None:
        self.forget(job)
        self._reports.result(job, "job_failed", reason=reason, retry=retry)

    def forget(self, job: int) -> None:
        """The job no longer runs here (ended, failed, cancelled): let go of what its guest had."""
        self._streamed.pop(job, None)
        self._cut_pieces.pop(job, None)
        self._ports.detach(job)
        self.job_images.pop(job, None)
        self.owners.pop(job, None)
        self.remove_overlay(job)
        if self._checkpoints is not None:
            self._checkpoints.forget(job)

    def remove_overlay(self, job: int) -> None:
        path = self.overlay_path(job)
        self._disk.attempt("remove a guest's disk overlay", partial(path.unlink, missing_ok=True))

    def _clear_overlays(self) -> None:
        self.overlay_dir.mkdir(exist_ok=True)
        for stale in self.overlay_dir.glob("job-*.cow"):  # no worker runs yet: nothing uses them
            stale.unlink()

    def send_to(self, slot: WorkerSlot, message: dict[str, Any]) -> None:
        if slot.handle is not None:
            slot.handle.send(validate_to_worker(message))

    # --- what the workers say ------------------------------------------------------------------------------
    def pump(self) -> None:
        """Act on everything the workers and the image fetcher have said since the last call."""
        self._images_fetched()
        for slot in self.slots:
            if slot.handle is not None:
                self._pump(slot)

    def _pump(self, slot: WorkerSlot) -> None:
        try:
            messages = slot.handle.messages()  # type: ignore[union-attr]
        except PipeError as exc:
            self._discard(slot, str(exc))
            return
        for raw in messages:
            try:
                message = validate_from_worker(raw)
            except OutputLimitError as exc:
                if self.jobs.get(exc.job) is slot:
                    self._job_done(slot, exc.job)
                    self._fail(exc.job, str(exc), retry=False)
                    log.warning("job %d failed: %s", exc.job, exc)
                continue
            except PipeError as exc:
                self._discard(slot, str(exc))
                return
            self._on_message(slot, message)

    def _discard(self, slot: WorkerSlot, why: str) -> None:
        """A worker that broke the pipe's rules is ended; supervise() then treats it as crashed."""
        log.error("guest worker %d sent an invalid message (%s); restarting it", slot.index, why)
        slot.broken = f"it sent an invalid message: {why}"
        slot.handle.kill()  # type: ignore[union-attr]

    def _on_message(self, slot: WorkerSlot, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "ready":
            slot.ready = True
            slot.crashes = 0
            slot.speed, slot.guest = float(message["speed"]), message["guest"]
            log.info("guest %d ready: %s, speed %.0f loops/s", slot.index, slot.guest, slot.speed)
            self._take_resumed_jobs(slot)
            self.dispatch()
        elif kind == "paused":
            slot.paused = True
            if self.activity_at is not None:
                latency = message["at"] - self.activity_at
                self.yield_latencies.append(latency)
                self.yield_buckets.observe(max(0.0, latency))
                log.info("guest %d stopped %.0f ms after the owner's input", slot.index, latency * 1000)
        elif kind == "resumed":
            slot.paused = False
        elif kind == "vacated":
            self._on_vacated(slot, message)
        elif kind in MOVE_MESSAGES:
            if self.mover is not None:
                self.mover.on_worker(slot, message)
        elif self.jobs.get(message["job"]) is not slot:
            if kind == "checkpoint" and self._checkpoints is not None:
                self._checkpoints.discard(message["job"], message["seq"])
            return  # a cancelled job's last words
        elif kind == "output":
            self._forward_output(message["job"], message["stream"], message["data"])
        elif kind == "checkpoint":
            self._send_checkpoint(slot, message)
        elif kind == "cut_ready":
            self._reports.report("cut_ready", job=message["job"], cut=message["cut"])
        elif kind == "cut_taken":
            self._cut_pieces[message["job"]] = (message["cut"], message["seq"])
            self._reports.report("cut_taken", job=message["job"], cut=message["cut"], seq=message["seq"])
        elif kind == "cut_failed":
            log.warning("job %d: its piece of cut %d failed: %s", message["job"], message["cut"], message["reason"])
            self._reports.report("cut_failed", job=message["job"], cut=message["cut"], reason=message["reason"])
        elif kind == "cut_resumed":
            log.info("job %d: its guest stood still %.1f ms after its piece of cut %d", message["job"],
                     message["held_s"] * 1000, message["cut"])
        elif kind == "finished":
            job = message["job"]
            self._job_done(slot, job)
            self._reports.result(job, "job_finished", status=message["status"], outputs=message["outputs"],
                                 missing=message["missing"], runtime_s=message["runtime_s"])
            log.info("job %d finished with status %d", job, message["status"])
        elif kind == "failed":
            self._job_done(slot, message["job"])
            self._fail(message["job"], message["reason"], retry=False)

    def _send_checkpoint(self, slot: WorkerSlot, message: dict[str, Any]) -> None:
        job = message["job"]
        cut = self._cut_pieces.pop(job, None)
        problem = "this agent takes no checkpoints" if self._checkpoints is None else self._checkpoints.send(message)
        if problem is not None:
            self.send_to(slot, {"type": "checkpoint_reset", "job": job})
            if cut is not None and cut[1] == message["seq"]:  # its gang's cut can be no set: said now
                self._reports.report("cut_failed", job=job, cut=cut[0],
                                     reason=f"piece {message['seq']} not sent: {problem}"[:200])
            return
        log.info("job %d: checkpoint %d sent (%s, %d pages, %.1f MiB; the guest stalled %.1f ms, %d pages in the "
                 "stall; %.2f s to take)", job, message["seq"], "full" if message["base"] < 0 else "delta",
                 message["pages"], message["size"] / (1 << 20), message["stall_s"] * 1000, message["final_pages"],
                 message["took_s"])

    def cut(self, job: int, cut: int) -> None:
        """A gang's cut: the rank's worker takes its piece now and keeps its guest still until cut_resume."""
        slot = self.jobs.get(job)
        if slot is None:
            log.info("job %d does not run here (any more): no piece of cut %d", job, cut)
            return
        self.send_to(slot, {"type": "cut", "job": job, "cut": cut, "hold_s": CUT_HOLD_S})

    def cut_step(self, kind: str, job: int, cut: int) -> None:
        """cut_final (every rank's piece is pre-copied) or cut_resume (every rank's is taken), for the worker."""
        slot = self.jobs.get(job)
        if slot is not None:
            self.send_to(slot, {"type": kind, "job": job, "cut": cut})

    def checkpoint_refused(self, job: int, reason: str) -> None:
        """The coordinator did not keep a piece: the job's next one must hold every page."""
        log.warning("job %d: the coordinator refused its checkpoint: %s", job, reason)
        slot = self.jobs.get(job)
        if slot is not None:
            self.send_to(slot, {"type": "checkpoint_reset", "job": job})

    def _job_done(self, slot: WorkerSlot, job: int) -> None:
        del self.jobs[job]
        self.forget(job)
        if slot.job == job:
            slot.job = None
        self.dispatch()

    def _forward_output(self, job: int, stream: str, data: bytes) -> None:
        """Pass output on in control-plane-sized chunks, within the per-job stream cap (output_cap.py)."""
        sent = self._streamed.get(job, 0)
        passed = output_cap.clip(sent, data, output_cap.DOWNSTREAM_LIMIT)
        self._streamed[job] = sent + len(data)
        if len(passed) < len(data) and sent <= output_cap.DOWNSTREAM_LIMIT:
            log.warning("job %d wrote more than %d bytes of output; the rest is dropped", job, MAX_STREAM_BYTES)
        for start in range(0, len(passed), OUTPUT_CHUNK_BYTES):
            self._reports.report("job_output", job=job, stream=stream, data=passed[start:start + OUTPUT_CHUNK_BYTES])

    # --- supervising the workers -------------------------------------------------------------------------
    def supervise(self, may_run: bool) -> None:
        """Notice exited workers (a crash fails their job for a retry elsewhere); start workers when allowed."""
        now = self._clock()
        for slot in self.slots:
            handle = slot.handle
            if handle is None:
                if may_run and (slot.restart_at is None or now >= slot.restart_at):
                    self._start(slot)
                continue
            code = handle.exit_code()
            if code is None:
                continue
            if slot.exited_at is None:
                slot.exited_at = now
            if slot.broken is None:  # a worker discarded for garbage has nothing more worth reading
                if not handle.drained() and now - slot.exited_at < DRAIN_S:
                    continue  # its last words are still on their way
                self._pump(slot)
            handle.kill()
            if (slot.vacating or slot.stopping) and slot.job is None and slot.broken is None:
                slot.clear()  # it exited as told
            else:
                self._crashed(slot, code, now)

    def _crashed(self, slot: WorkerSlot, code: int, now: float) -> None:
        slot.crashes += 1
        slot.restart_at = now + restart_delay(slot.crashes)
        handle = slot.handle
        last = handle.stderr_tail[-1] if handle is not None and handle.stderr_tail else "no message"
        why = slot.broken or f"guest worker exited with status {code}: {last}"
        log.error("guest %d crashed: %s; restarting in %.0f s", slot.index, why, slot.restart_at - now)
        if self.mover is not None:
            self.mover.worker_lost(slot, why)
        for job in [job for job, holder in self.jobs.items() if holder is slot]:
            del self.jobs[job]
            self._fail(job, f"guest crashed: {why}", retry=True)
        if slot.resumed_jobs:  # it died resuming a vacated guest: that snapshot is not to be tried again
            self._discard_vacated(slot.index, f"the guest could not be resumed: {why}")
        slot.job = None
        slot.resumed_jobs = []
        slot.clear()

    def _start(self, slot: WorkerSlot) -> None:
        saved = self.vacated_dir / f"worker-{slot.index}.snap"
        if saved.exists() and not self._vacated_images_ready(slot.index):
            return  # its image is being fetched again; supervise() starts it when it is here
        if saved.exists():
            slot.resumed_jobs = sorted(job for job, index in self.vacated.items() if index == slot.index)
            slot.handle = self._start_worker(slot.index, self.boot_snapshot, saved)
            log.info("guest %d resumes its vacated jobs %s", slot.index, slot.resumed_jobs)
        else:
            slot.resumed_jobs = []
            slot.handle = self._start_worker(slot.index, self.boot_snapshot, None)
        slot.restart_at = None

    def stop_all(self) -> None:
        for slot in self.slots:
            if slot.handle is not None:
                slot.handle.stop()
                slot.clear()

    # --- following the owner -------------------------------------------------------------------------------
    def follow_owner(self, state: OwnerState, shutdown_while_owner: bool) -> None:
        """Tell every worker what the owner's state asks of it: run, pause, vacate to disk, or quit."""
        for slot in self.slots:
            if not slot.alive:
                continue
            if guest_may_run(state):
                if slot.pause_requested:
                    slot.pause_requested = False
                    self.send_to(slot, {"type": "resume"})
            elif state is OwnerState.VACATING and slot.job is not None:
                if not slot.vacating:
                    slot.vacating = True
                    self.send_to(slot, {"type": "vacate", "path": str(self.vacated_dir / f"worker-{slot.index}.snap")})
            elif state is OwnerState.OWNER and shutdown_while_owner and slot.job is None:
                if not slot.stopping:
                    slot.stopping = True
                    self.send_to(slot, {"type": "quit"})
            elif not slot.pause_requested:
                slot.pause_requested = True
                self.send_to(slot, {"type": "pause"})

    # --- vacated guests on disk ----------------------------------------------------------------------------
    def _remove_stale_boot_snapshots(self, state_dir: Path) -> None:
        for stale in state_dir.glob("boot-*.snap"):
            if stale != self.boot_snapshot:
                stale.unlink()

    def _read_vacated(self) -> dict[int, int]:
        """Jobs saved in vacated guests on disk, and the slot each belongs to (and their conet ports)."""
        jobs: dict[int, int] = {}
        for meta in self.vacated_dir.glob("worker-*.toml"):
            try:
                index = int(meta.stem.split("-")[1])
                record = read_toml(meta)
                listed, image = record.get("jobs", []), record.get("image")
                if isinstance(listed, str):  # the space-separated form of earlier versions
                    listed = listed.split()
                for job in listed:
                    jobs[int(job)] = index
                    if isinstance(image, str):
                        self.job_images[int(job)] = image
                if isinstance(record.get("checkpoint"), dict) and len(listed) == 1:
                    self._vacated_checkpoints[int(listed[0])] = record["checkpoint"]
                for job, port in record.get("ports", {}).items():
                    self._vacated_ports[int(job)] = {"mac": bytes.fromhex(port["mac"]), "ip": str(port["ip"]),
                                                     "network": str(port["network"])}
            except (ValueError, IndexError, KeyError, TypeError, AttributeError, ConodeError) as exc:
                log.warning("ignoring damaged vacated-guest record %s: %s", meta, exc)
        return jobs

    def _vacated_images_ready(self, index: int) -> bool:
        """Whether the images a vacated guest's disk needs are here; if one is not, have it fetched again, or
        give the guest up when the cache does not know the image any more."""
        for sha in sorted({self.job_images[job] for job, i in self.vacated.items() if i == index
                           and job in self.job_images}):
            spec = self._images.cache.spec(sha) if self._images is not None else None
            problem = (f"its disk image (sha256 {sha}) is missing from this agent's image cache" if spec is None
                       else self._fetch_image(spec))
            if problem is not None:
                self._discard_vacated(index, problem)
                return False
            if sha in self._images.pending:  # type: ignore[union-attr]
                return False
        return True

    def _on_vacated(self, slot: WorkerSlot, message: dict[str, Any]) -> None:
        jobs = sorted(message["jobs"])
        ports = {job: port for job in jobs if (port := self._ports.port_of(job)) is not None}
        image = next((self.job_images[job] for job in jobs if job in self.job_images), None)
        record: dict[str, Any] = {"jobs": jobs,
                                  "ports": {str(job): {**port, "mac": port["mac"].hex()} for job, port in ports.items()},
                                  **({"image": image} if image else {}),  # one guest, one disk
                                  **({"checkpoint": message["checkpoint"]} if "checkpoint" in message else {})}
        meta = self.vacated_dir / f"worker-{slot.index}.toml"
        self._disk.attempt("record a vacated guest's jobs", lambda: write_toml(meta, record))
        for job in jobs:
            self.jobs.pop(job, None)
            self._ports.detach(job)  # its guest is on disk: nothing to deliver frames to
            self.remove_overlay(job)  # its disk's changes are in the snapshot
            self.vacated[job] = slot.index
            if job in ports:
                self._vacated_ports[job] = ports[job]
            if "checkpoint" in message:
                self._vacated_checkpoints[job] = message["checkpoint"]
            self._reports.report("job_vacated", job=job)
        slot.job = None
        log.info("guest %d saved to %s with jobs %s", slot.index, message["path"], jobs)

    def load_vacated(self, job: int) -> None:
        """Load the vacated guest holding *job* into a worker, paused (the owner is still here), so that it can
        move to another workstation: the coordinator hears job_resumed, then moves it."""
        index = self.vacated.get(job)
        slot = self.slots[index] if index is not None else None
        if slot is None or slot.handle is not None:
            return
        self._start(slot)
        if slot.handle is not None:
            slot.pause_requested = True  # queued before the worker has restored it: it never runs here
            self.send_to(slot, {"type": "pause"})
            log.info("guest %d loads its vacated jobs %s, paused, to move them", slot.index, slot.resumed_jobs)

    def _take_resumed_jobs(self, slot: WorkerSlot) -> None:
        for job in slot.resumed_jobs:
            self.jobs[job] = slot
            slot.job = job
            self.rejoin_conet(slot, job, self._vacated_ports.pop(job, None))
            self._resume_checkpoints(slot, job, self._vacated_checkpoints.pop(job, None))
            self._reports.report("job_resumed", job=job)
        if slot.resumed_jobs:
            self._drop_vacated_files(slot.index)
            self.vacated = {job: i for job, i in self.vacated.items() if i != slot.index}
        slot.resumed_jobs = []

    def rejoin_conet(self, slot: WorkerSlot, job: int, port: dict[str, Any] | None) -> None:
        """A guest resumed or moved here keeps its conet identity (*port*: mac, ip, network): its NIC joins the
        switch again."""
        plug = self._ports.plug(job, port) if port is not None else None
        if plug is not None:
            self.send_to(slot, {"type": "plug", **plug})

    def checkpoints_go_on(self, job: int, carried: dict[str, Any]) -> None:
        """The coordinator says what the checkpoints of a guest moved here go on from (interval_s, seq, stdout,
        stderr: where its output stood at the hand-over)."""
        slot = self.jobs.get(job)
        if slot is None:
            log.info("job %d does not run here (any more): its checkpoints do not start", job)
            return
        self._resume_checkpoints(slot, job, carried)

    def _resume_checkpoints(self, slot: WorkerSlot, job: int, carried: dict[str, Any] | None) -> None:
        """A guest resumed from a vacate, or moved here, is checkpointed again: a full piece first (its new worker
        has no dirty log), numbered after the pieces the coordinator may hold, its output offsets where they
        stood as it left its previous worker (the worker adds what it wrote since)."""
        if carried is None or self._checkpoints is None:
            return
        try:
            self.send_to(slot, {"type": "checkpoint_start", "job": job,
                                "checkpoint": self._checkpoints.settings(carried.get("interval_s"), carried.get("seq")),
                                "outputs": {s: carried.get(s) for s in ("stdout", "stderr")}})
        except PipeError as exc:
            log.warning("job %d is not checkpointed any more: what they go on from is not valid (%s)", job, exc)

    def _discard_vacated(self, index: int, why: str) -> None:
        """Give up a vacated guest: its other jobs fail for a retry elsewhere."""
        for job in sorted(job for job, i in self.vacated.items() if i == index):
            del self.vacated[job]
            self._vacated_ports.pop(job, None)
            self._vacated_checkpoints.pop(job, None)
            if job not in self.jobs:
                self._fail(job, f"its saved guest was discarded: {why}", retry=True)
        self._drop_vacated_files(index)

    def _drop_vacated_files(self, index: int) -> None:
        for suffix in ("snap", "toml"):
            path = self.vacated_dir / f"worker-{index}.{suffix}"
            self._disk.attempt("remove a vacated guest", partial(path.unlink, missing_ok=True))
