"""A guest session: one :class:`~conode.vm.guest.Guest` running one command for ``conode vm run`` and ``resume``.

Boot (or restore), wait for the in-guest agent, run the command, stream its stdout and stderr, and return its
exit status — or stop at a given guest time and write the guest's snapshot, which another process continues.
"""

from __future__ import annotations

import stat
import threading
import time
from pathlib import Path
from typing import BinaryIO, Callable

from conode.errors import ConodeError, GuestCrashed, GuestTimeout, SnapshotError
from conode.vm.guest import Guest, GuestSnapshot, JobSpec
from conode.vm.guest_image import GuestImage
from conode.vm.machine import MachineConfig

JOB_ID = 1
DEFAULT_BOOT_TIMEOUT_S = 120.0


class GuestSession:
    """Runs one command in one guest; output goes to *stdout*/*stderr*, progress lines to *progress*."""

    def __init__(self, guest: Guest, stdout: BinaryIO, stderr: BinaryIO,
                 progress: Callable[[str], None] = lambda line: None) -> None:
        self.guest = guest
        self.machine = guest.machine
        self._stdout = stdout
        self._stderr = stderr
        self._progress = progress
        self._spec: JobSpec | None = None
        self.exit_status: int | None = None
        self._stop_reason: str | None = None
        self.ready_at: float | None = None
        self._snapshot_after_ns: int | None = None
        self._started = time.monotonic()
        guest.on_ready = self._on_agent_ready
        guest.on_job_started = self._on_job_started

    # --- construction ---------------------------------------------------------------------------------------
    @classmethod
    def boot(cls, image: GuestImage, config: MachineConfig, stdout: BinaryIO, stderr: BinaryIO,
             progress: Callable[[str], None] = lambda line: None, verbose: bool = False,
             console: Callable[[bytes], None] | None = None) -> "GuestSession":
        session = cls(Guest.boot(image, config, verbose, console), stdout, stderr, progress)
        progress(f"booting the guest ({config.mem_mib} MiB)")
        return session

    @classmethod
    def resume(cls, path: Path, stdout: BinaryIO, stderr: BinaryIO,
               progress: Callable[[str], None] = lambda line: None, disk_base: Path | None = None) -> "GuestSession":
        snapshot = GuestSnapshot.read(path)
        if snapshot.job is None:
            raise SnapshotError(f"{path} holds a guest with no command to continue")
        session = cls(Guest.restore(snapshot, disk_base=disk_base), stdout, stderr, progress)
        session.guest.attach_sink(session)
        session.ready_at = time.monotonic()
        progress(f"resumed {path} ({session.machine.config.mem_mib} MiB guest)")
        return session

    # --- the job ----------------------------------------------------------------------------------------
    def _on_agent_ready(self, name: str) -> None:
        self.ready_at = time.monotonic()
        self._progress(f"guest ready: {name} ({self.ready_at - self._started:.2f} s)")
        self._start_job()

    def _start_job(self) -> None:
        if self._spec is not None and self.guest.agent.ready and self.guest.job is None:
            self.guest.start_job(self._spec, self)

    def _on_job_started(self) -> None:
        if self._snapshot_after_ns is not None:
            self.machine.pause_at_ns = self.machine.clock.now() + self._snapshot_after_ns

    # JobSink
    def output(self, job: int, stream: str, data: bytes) -> None:
        out = self._stdout if stream == "stdout" else self._stderr
        out.write(data)
        out.flush()

    def finished(self, job: int, status: int, outputs: dict[str, bytes], missing: list[str],
                 runtime_s: float) -> None:
        self.exit_status = status

    def failed(self, job: int, reason: str) -> None:
        pass  # the guest keeps the reason (guest.failure)

    def _stop(self, reason: str) -> None:
        if self._stop_reason is None:
            self._stop_reason = reason
        self.machine.pause()

    # --- running -------------------------------------------------------------------------------------------
    def start(self, argv: list[str], cwd: str = "/") -> None:
        self._spec = JobSpec(JOB_ID, list(argv), cwd)
        self._start_job()

    def run(self, snapshot_after_s: float | None = None, snapshot_to: Path | None = None,
            timeout_s: float | None = None, boot_timeout_s: float = DEFAULT_BOOT_TIMEOUT_S) -> int:
        """Run until the command exits (return its status) or the snapshot point (write it, return 0).

        The snapshot point is *snapshot_after_s* seconds of guest time after the command started.
        """
        if timeout_s is not None and timeout_s <= 0:
            raise ConodeError("--timeout must be a positive number of seconds")
        if snapshot_after_s is not None:
            self._snapshot_after_ns = int(snapshot_after_s * 1e9)
            job = self.guest.job
            if job is not None and job.command is not None:
                self.machine.pause_at_ns = self.machine.clock.now() + self._snapshot_after_ns
        timers = [threading.Timer(boot_timeout_s, self._boot_timed_out)]
        if timeout_s is not None:
            timers.append(threading.Timer(timeout_s, lambda: self._stop("timeout")))
        for timer in timers:
            timer.daemon = True
            timer.start()
        try:
            self.guest.run()
        finally:
            for timer in timers:
                timer.cancel()
        return self._finish(snapshot_to, timeout_s, boot_timeout_s)

    def _boot_timed_out(self) -> None:
        if not self.guest.agent.ready:
            self._stop("boot-timeout")

    def _finish(self, snapshot_to: Path | None, timeout_s: float | None, boot_timeout_s: float) -> int:
        guest = self.guest
        if guest.failure is not None:
            if guest.crashed:
                raise GuestCrashed(guest.failure)
            raise ConodeError(guest.failure)
        if self.exit_status is not None:
            if snapshot_to is not None:
                self._progress(f"the command finished before the snapshot point; no snapshot written to {snapshot_to}")
            return self.exit_status
        reason = self._stop_reason
        if reason == "boot-timeout":
            lines = [line for line in self.machine.console_tail.decode(errors="replace").splitlines() if line.strip()]
            said = f"; its console last said: {lines[-1][-200:]!r}" if lines else \
                "; its console said nothing (--verbose shows the boot messages)"
            raise GuestTimeout(f"the guest did not become ready within {boot_timeout_s:g} s{said}")
        if reason == "timeout":
            raise GuestTimeout(f"the command did not finish within {timeout_s:g} s; the guest was stopped")
        # Paused at the snapshot point.
        if snapshot_to is None:
            raise ConodeError("the guest was paused with nowhere to write its snapshot")
        size = self.save(snapshot_to)
        self._progress(f"snapshot written to {snapshot_to} ({size / 1e6:.1f} MB)")
        return 0

    def save(self, path: Path) -> int:
        """Write the guest, its command included, to *path* (the machine must be paused)."""
        if path.exists() and not stat.S_ISREG(path.stat().st_mode):
            raise SnapshotError(f"{path} exists and is not a regular file; choose another snapshot path")
        return self.guest.save(path)

