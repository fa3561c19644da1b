"""One Guest: a cooperative machine, the host side of its in-guest agent, and the job it runs.

Both ``conode vm`` and the agent's guest workers use this one lifecycle:

- :meth:`Guest.boot` starts a machine from the guest image; the guest is *pristine* until a job starts.
- :meth:`Guest.restore` continues from a :class:`GuestSnapshot` — the one snapshot envelope (guest id, image
  digests, format version, machine, channel and job state) that vacate files, ``vm run --snapshot-to`` and the
  post-boot snapshot all use, and that migration ships.
- :meth:`Guest.start_job` runs one job: renew the guest's clock and entropy (after a restore), stage its inputs
  in the job directory, run the command, collect its outputs within their limits. A guest runs at most one job
  and is discarded afterwards: no job ever sees what another left behind.

Everything the guest says is untrusted. A guest that breaks the channel protocol, stalls it with half a frame,
crashes or outlives a deadline ends with its job failed and a reason; the host never raises on its behalf.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from conode import limits, output_cap
from conode.errors import ConodeError, DiskImageError, GuestCrashed, SnapshotError
from conode.vm import output_globs, state
from conode.vm.channel import RENEW_ENTROPY_BYTES, ChannelError
from conode.vm.cpu.unicorn_cpu import RamImage
from conode.vm.guest_agent import GuestAgentClient
from conode.vm.guest_image import BASE_CMDLINE, GuestImage
from conode.vm.machine import CoMachine, MachineConfig, MachineExit
from conode.vm.net_identity import IdentityError, NetIdentity
from conode.vm.snapshot import read_snapshot, write_snapshot
from conode.vm.state import blob, bounded, items, one_of, uint

SNAPSHOT_KIND = "conode-guest"
SNAPSHOT_FORMAT = 1
CHANNEL_STALL_S = 10.0  # guest seconds half a frame may wait for the rest: longer is a desynchronised stream
COLLECT_TIMEOUT_S = 120.0  # guest seconds to hand back a finished job's outputs
WATCHDOG_EVERY_S = 1.0


class JobSink(Protocol):
    """Where a job's results go: the terminal for ``conode vm``, the agent for a worker."""

    def output(self, job: int, stream: str, data: bytes) -> None: ...

    def finished(self, job: int, status: int, outputs: dict[str, bytes], missing: list[str],
                 runtime_s: float) -> None: ...

    def failed(self, job: int, reason: str) -> None: ...


@dataclass
class JobSpec:
    """What to run: a command, its working directory, files to stage there first and to fetch after, and the
    guest's identity on conet (None: the guest's NIC stays unconfigured)."""

    id: int
    argv: list[str]
    cwd: str
    inputs: dict[str, bytes] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    net: NetIdentity | None = None

    @classmethod
    def in_job_directory(cls, ident: int, argv: list[str], inputs: dict[str, bytes],
                         outputs: list[str], net: NetIdentity | None = None) -> "JobSpec":
        return cls(ident, argv, f"/job/{ident}", inputs, outputs, net)


class _Phase(enum.IntEnum):
    RENEWING, STAGING, RUNNING, COLLECTING, DONE = range(5)


@dataclass(frozen=True)
class InputFile:
    name: str = blob(max_len=limits.MAX_PATH_BYTES)
    data: bytes = blob(max_len=limits.MAX_JOB_INPUT_BYTES)


@dataclass(frozen=True)
class JobState(state.Record):
    """A job as a snapshot holds it: what to run, and how far it got."""

    KIND = "job"
    VERSION = 2  # 2: the guest's conet identity
    MIGRATIONS = {1: lambda data: {**data, "net": None}}

    id: int = uint(63)
    argv: tuple[str, ...] = items(max_len=limits.MAX_ARGV)
    cwd: str = blob(max_len=limits.MAX_SMALL_FIELD)
    inputs: tuple[InputFile, ...] = items(max_len=limits.MAX_FILES)  # until staged
    outputs: tuple[str, ...] = items(max_len=limits.MAX_FILES)
    phase: int = one_of(*_Phase)
    command: int | None = uint(32)
    status: int | None = bounded(-(1 << 31), (1 << 31) - 1)
    stream_bytes: int = uint(63)
    ran_s: float
    net: NetIdentity | None


class GuestJob:
    """One job's progress through renew → staging → running → collecting. Survives a snapshot."""

    def __init__(self, guest: "Guest", spec: JobSpec, sink: JobSink) -> None:
        self.guest = guest
        self.spec = spec
        self.sink = sink
        self.phase = _Phase.RENEWING
        self.command: int | None = None
        self.status: int | None = None
        self.stream_bytes = 0
        self.ran_before_s = 0.0
        self.started = time.monotonic()
        self.collect_deadline_ns: int | None = None
        self.collected: dict[str, bytes] = {}
        self.missing: list[str] = []

    @property
    def runtime_s(self) -> float:
        return self.ran_before_s + time.monotonic() - self.started

    # --- phases --------------------------------------------------------------------------------------------
    def begin(self, renew: bool) -> None:
        if renew:
            self.guest.renew(self._renewed)
        else:
            self._configure_network()

    def _renewed(self, error: str | None) -> None:
        if error is not None:
            self.guest.fail(f"the guest could not renew its clock and entropy: {error}")
        else:
            self._configure_network()

    def _configure_network(self) -> None:
        """Give the guest its conet identity (part of the first phase: redone with it after a restore)."""
        net = self.spec.net
        if net is None:
            self._stage()
            return

        def configured(error: str | None) -> None:
            if error is not None:
                self.guest.fail(f"the guest could not take its network identity: {error}")
            else:
                self._stage()

        self.guest.agent.set_identity(net.payload(), configured)

    def _stage(self) -> None:
        self.phase = _Phase.STAGING
        remaining = set(self.spec.inputs)
        if not remaining:
            self._run()
            return

        def staged(error: str | None, name: str) -> None:
            if error is not None:
                self.guest.fail(f"staging input {name}: {error}")
                return
            remaining.discard(name)
            if not remaining and self.phase == _Phase.STAGING:
                self._run()

        for name, data in self.spec.inputs.items():
            self.guest.agent.put_file(f"{self.spec.cwd}/{name}", data, lambda error, name=name: staged(error, name),
                                      mode=0o644)

    def _run(self) -> None:
        self.phase = _Phase.RUNNING
        self.spec.inputs = {}  # staged: not carried in snapshots any more
        try:
            self.command = self.guest.agent.run(self.spec.argv, self, cwd=self.spec.cwd)
        except ChannelError as exc:
            self.guest.fail(f"the command cannot be sent to the guest: {exc}")
            return
        self.guest.job_started()

    # CommandHandler
    def on_output(self, stream: str, data: bytes) -> None:
        passed = output_cap.clip(self.stream_bytes, data)
        self.stream_bytes += len(data)
        if passed:
            self.sink.output(self.spec.id, stream, passed)

    def on_exit(self, status: int) -> None:
        self.status = status
        self.guest.agent.kill_all()  # what the job left running must not slow the collection down
        self._collect()

    def on_error(self, message: str) -> None:
        self.guest.fail(f"in-guest agent: {message}")

    def _collect(self) -> None:
        self.phase = _Phase.COLLECTING
        self.collected, self.missing = {}, []
        self.collect_deadline_ns = self.guest.machine.clock.now() + int(COLLECT_TIMEOUT_S * 1e9)
        plain = [path for path in self.spec.outputs if not output_globs.is_glob(path)]
        patterns = [path for path in self.spec.outputs if output_globs.is_glob(path)]
        if not patterns:
            self._collect_next(plain)
            return

        def expanded(matched: list[str], problems: list[str]) -> None:
            self.missing.extend(problem[:limits.MAX_SMALL_FIELD] for problem in problems)
            self._collect_next((plain + [path for path in matched if path not in plain])[:limits.MAX_FILES])

        try:
            self.guest.agent.run(output_globs.expand_argv(patterns), output_globs.Expansion(patterns, expanded),
                                 cwd=self.spec.cwd)
        except ChannelError as exc:
            expanded([], [f"{p}: cannot be expanded: {exc}" for p in patterns])

    def _collect_next(self, remaining: list[str]) -> None:
        if not remaining:
            self._finish()
            return
        path = remaining.pop(0)
        budget = limits.MAX_JOB_OUTPUT_BYTES - sum(len(data) for data in self.collected.values())
        max_bytes = max(0, min(limits.MAX_OUTPUT_FILE_BYTES, budget))

        def got(data: bytes | None, error: str | None) -> None:
            if data is None:
                reason = (error or "not found").removeprefix("get: ").removeprefix(f"{path}: ")
                self.missing.append(f"{path}: {reason}"[:limits.MAX_SMALL_FIELD])
            else:
                self.collected[path] = data
            self._collect_next(remaining)

        self.guest.agent.fetch_file(self.spec.cwd, path, max_bytes, got)

    def _finish(self) -> None:
        self.phase = _Phase.DONE
        self.sink.finished(self.spec.id, self.status if self.status is not None else -1, self.collected,
                           self.missing[:limits.MAX_FILES], self.runtime_s)
        self.guest.job_done()

    # --- snapshots -----------------------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        spec = self.spec
        return state.dump(JobState(spec.id, tuple(spec.argv), spec.cwd,
                                   tuple(InputFile(name, data) for name, data in spec.inputs.items()),
                                   tuple(spec.outputs), int(self.phase), self.command, self.status, self.stream_bytes,
                                   self.runtime_s, spec.net))

    @classmethod
    def from_state(cls, guest: "Guest", data: Any, sink: JobSink) -> "GuestJob":
        """Restore :meth:`get_state` output; raise SnapshotError if it is not valid."""
        saved = state.load(JobState, data)
        if not saved.argv:
            raise SnapshotError("the snapshot's job has no command")
        if saved.net is not None:
            try:
                saved.net.check()
            except IdentityError as exc:
                raise SnapshotError(f"the snapshot's job has an invalid network identity: {exc}") from None
        spec = JobSpec(saved.id, list(saved.argv), saved.cwd, {f.name: f.data for f in saved.inputs},
                       list(saved.outputs), saved.net)
        job = cls(guest, spec, sink)
        job.phase, job.command, job.status = _Phase(saved.phase), saved.command, saved.status
        job.stream_bytes, job.ran_before_s = saved.stream_bytes, saved.ran_s
        return job

    def continue_after_restore(self) -> None:
        """Transfers in flight at snapshot time are not in the snapshot: redo the phase that was under way."""
        if self.phase in (_Phase.RENEWING, _Phase.STAGING):
            self.begin(renew=True)
        elif self.phase == _Phase.RUNNING and self.command is not None:
            self.guest.agent.attach(self.command, self)
            self.guest.renew(lambda error: None)  # its clock stood still while it was saved
        elif self.phase == _Phase.COLLECTING:
            self._collect()
        else:
            self.guest.fail("the snapshot holds a job in an inconsistent state")


@dataclass(frozen=True)
class ImageDigests:
    kernel: str
    initrd: str

    @classmethod
    def of(cls, image: GuestImage) -> "ImageDigests":
        return cls(image.kernel_sha256, image.initrd_sha256)


@dataclass(frozen=True)
class GuestSnapshot:
    """The one snapshot envelope: a guest, its channel and its job, as plain data."""

    guest_id: str
    image: ImageDigests
    machine: dict[str, Any]
    agent: dict[str, Any]
    job: dict[str, Any] | None
    created_at: float

    def to_data(self) -> dict[str, Any]:
        return {"kind": SNAPSHOT_KIND, "format": SNAPSHOT_FORMAT, "guest_id": self.guest_id,
                "image": {"kernel": self.image.kernel, "initrd": self.image.initrd}, "machine": self.machine,
                "agent": self.agent, "job": self.job, "created_at": self.created_at}

    @classmethod
    def from_data(cls, data: Any, origin: str) -> "GuestSnapshot":
        if not isinstance(data, dict) or data.get("kind") != SNAPSHOT_KIND:
            raise SnapshotError(f"{origin} is not a conode guest snapshot")
        if data.get("format") != SNAPSHOT_FORMAT:
            raise SnapshotError(f"{origin} holds a guest snapshot of format {data.get('format')!r}; this conode "
                                f"reads format {SNAPSHOT_FORMAT}")
        try:
            image = ImageDigests(str(data["image"]["kernel"]), str(data["image"]["initrd"]))
            snapshot = cls(str(data["guest_id"]), image, data["machine"], data["agent"], data["job"],
                           float(data["created_at"]))
        except (KeyError, TypeError, ValueError):
            raise SnapshotError(f"{origin} is not a complete conode guest snapshot") from None
        if not isinstance(snapshot.machine, dict) or not isinstance(snapshot.agent, dict) or not (
                snapshot.job is None or isinstance(snapshot.job, dict)):
            raise SnapshotError(f"{origin} is not a complete conode guest snapshot")
        return snapshot

    def write(self, path: Path) -> int:
        return write_snapshot(path, self.to_data())

    def ram_image(self) -> RamImage:
        """This snapshot's RAM as a copy-on-write image: guests restored with it start without decoding."""
        return CoMachine.ram_image(self.machine)

    @classmethod
    def read(cls, path: Path) -> "GuestSnapshot":
        return cls.from_data(read_snapshot(path), str(path))


class _NoJob:
    """The sink of a guest without a job."""

    def output(self, job: int, stream: str, data: bytes) -> None:
        pass

    def finished(self, job: int, status: int, outputs: dict[str, bytes], missing: list[str],
                 runtime_s: float) -> None:
        pass

    def failed(self, job: int, reason: str) -> None:
        pass


class _Discard:
    """A command handler for host-run commands whose output nobody reads."""

    def __init__(self, on_exit: Callable[[int], None] = lambda status: None) -> None:
        self._on_exit = on_exit

    def on_output(self, stream: str, data: bytes) -> None:
        pass

    def on_exit(self, status: int) -> None:
        self._on_exit(status)

    def on_error(self, message: str) -> None:
        pass


class Guest:
    """A machine with its in-guest agent and at most one job."""

    def __init__(self, config: MachineConfig, image: ImageDigests, guest_id: str | None = None,
                 console: Callable[[bytes], None] | None = None, ram_image: RamImage | None = None) -> None:
        self.machine = CoMachine(config, console or (lambda data: None), self._from_guest, ram_image)
        self.agent = GuestAgentClient(self.machine.channel.send)
        self.agent.on_violation = self._on_violation
        self.image = image
        self.guest_id = guest_id or uuid.uuid4().hex
        self.job: GuestJob | None = None
        self.failure: str | None = None  # why this guest must be discarded, once it must
        self.crashed = False  # the failure was the guest kernel's own end (panic, reset, power-off)
        self.finished = False  # the job finished (or failed): the guest has nothing left to do
        self.on_ready: Callable[[str], None] = lambda guest: None
        self.on_job_started: Callable[[], None] = lambda: None
        self._stall_since_ns: int | None = None
        self._restored = False

    # --- construction -------------------------------------------------------------------------------------
    @classmethod
    def boot(cls, image: GuestImage, config: MachineConfig, verbose: bool = False,
             console: Callable[[bytes], None] | None = None) -> "Guest":
        guest = cls(config, ImageDigests.of(image), console=console)
        guest.agent.on_ready = lambda name: guest.on_ready(name)
        guest.machine.boot(image.kernel, image.initrd, BASE_CMDLINE if verbose else BASE_CMDLINE + " quiet")
        return guest

    @classmethod
    def restore(cls, snapshot: GuestSnapshot, sink: JobSink | None = None, new_identity: bool = False,
                ram_image: RamImage | None = None, disk_base: Path | None = None,
                disk_overlay: Path | None = None) -> "Guest":
        """Continue *snapshot*. With *new_identity* the guest is a fresh copy (a pristine guest for a new job);
        *ram_image* (:meth:`GuestSnapshot.ram_image`) maps the snapshot's RAM instead of decoding it;
        *disk_base* is where the base image of the guest's disk is, if not where it was when it was saved;
        *disk_overlay* is a new file for the disk's overlay (default: a temporary one)."""
        config = CoMachine.config_from_state(snapshot.machine)  # raises SnapshotError only, as set_state does
        if config.disk is not None and (disk_base is not None or disk_overlay is not None):
            disk = dataclasses.replace(config.disk, base=disk_base or config.disk.base, overlay=disk_overlay)
            config = dataclasses.replace(config, disk=disk)
        try:
            guest = cls(config, snapshot.image, None if new_identity else snapshot.guest_id, ram_image=ram_image)
        except DiskImageError as exc:
            raise SnapshotError(f"the snapshot's disk needs its base image: {exc}") from None
        try:
            guest.machine.set_state(snapshot.machine)
            guest.agent.set_state(snapshot.agent)
            if not guest.agent.ready:
                raise SnapshotError("the snapshot holds a guest whose agent never became ready")
            if snapshot.job is not None:
                guest.job = GuestJob.from_state(guest, snapshot.job, sink or _NoJob())
        except SnapshotError:
            guest.machine.close()  # a machine that will never run must not keep its slicer thread
            raise
        guest._restored = True
        if guest.job is not None:
            guest.job.continue_after_restore()
        return guest

    # --- the job ------------------------------------------------------------------------------------------
    def start_job(self, spec: JobSpec, sink: JobSink) -> None:
        """Run *spec* in this guest (its only job). The guest must be ready."""
        if self.job is not None:
            raise ConodeError("a guest runs one job; this one already has one")
        self.job = GuestJob(self, spec, sink)
        self.job.begin(renew=self._restored)

    def renew(self, done: Callable[[str | None], None]) -> None:
        """Give the guest the host's wall clock and fresh entropy (it may be one of many copies of a snapshot)."""
        self.agent.renew(time.time_ns(), os.urandom(RENEW_ENTROPY_BYTES), done)

    def attach_sink(self, sink: JobSink) -> None:
        """Send the restored job's results to *sink* from now on."""
        if self.job is not None:
            self.job.sink = sink

    def job_started(self) -> None:
        self.on_job_started()

    def job_done(self) -> None:
        self.finished = True
        self.machine.pause()

    def fail(self, reason: str) -> None:
        """End this guest: its job fails with *reason*; the owner discards the guest."""
        if self.failure is not None or self.finished:
            return
        self.failure = reason
        self.finished = True
        if self.job is not None:
            self.job.phase = _Phase.DONE
            self.job.sink.failed(self.job.spec.id, reason)
        self.machine.pause()

    def _on_violation(self, reason: str) -> None:
        self.fail(f"the guest broke the host-channel protocol: {reason}")

    def _from_guest(self, data: bytes) -> None:
        self.agent.feed(data)

    # --- running ------------------------------------------------------------------------------------------
    def run(self) -> MachineExit:
        """Run until paused (by the host, or because the job ended). A crash fails the job, never raises."""
        stop_watching = threading.Event()
        watcher = threading.Thread(target=self._watch, args=(stop_watching,), daemon=True)
        watcher.start()
        try:
            outcome = self.machine.run()
        except GuestCrashed as exc:
            self.crashed = True
            self.fail(str(exc))
            return MachineExit.PAUSED
        finally:
            stop_watching.set()
        if outcome is not MachineExit.PAUSED:
            panic = self.machine.panic_message()
            what = "rebooted" if outcome is MachineExit.RESET else "powered off"
            self.crashed = True
            self.fail(f"guest kernel panic: {panic}" if panic else f"the guest {what}")
            return MachineExit.PAUSED
        return outcome

    def _watch(self, stop: threading.Event) -> None:
        while not stop.wait(WATCHDOG_EVERY_S):
            self.machine.call_soon(self.watchdog)

    def watchdog(self) -> None:
        """Between slices, about once a second: end a guest whose channel stalled or whose job stopped answering."""
        if self.finished:
            return
        now = self.machine.clock.now()
        if self.agent.pending_bytes:
            if self._stall_since_ns is None:
                self._stall_since_ns = now
            elif now - self._stall_since_ns > CHANNEL_STALL_S * 1e9:
                self.fail(f"the host channel stalled on half a frame for {CHANNEL_STALL_S:g} s "
                          "(a desynchronised stream)")
                return
        else:
            self._stall_since_ns = None
        job = self.job
        if job is not None and job.phase == _Phase.COLLECTING and job.collect_deadline_ns is not None \
                and now > job.collect_deadline_ns:
            self.fail(f"the guest did not hand back the job's outputs within {COLLECT_TIMEOUT_S:g} s")

    def run_host_command(self, argv: list[str], on_exit: Callable[[int], None]) -> None:
        """Run a command of the host's own (not a job) in the guest, e.g. the speed calibration."""
        self.agent.run(argv, _Discard(on_exit))

    # --- snapshots ------------------------------------------------------------------------------------------
    def snapshot(self, with_ram: bool = True, with_disk: bool = True) -> GuestSnapshot:
        """The whole guest as plain data (the machine must be paused); see CoMachine.get_state for *with_ram*
        and *with_disk*."""
        return GuestSnapshot(self.guest_id, self.image, self.machine.get_state(with_ram, with_disk),
                             self.agent.get_state(),
                             self.job.get_state() if self.job is not None else None, time.time())

    def save(self, path: Path) -> int:
        return self.snapshot().write(path)
