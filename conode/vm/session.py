"""A guest session: a machine plus the host side of its in-guest agent, running one command.

This is what ``conode vm run`` and ``conode vm resume`` drive: boot (or restore), wait for the in-guest agent,
run the command, stream its stdout and stderr, and return its exit status — or stop at a given guest time and
write a snapshot that another process continues from.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable

from conode.errors import ConodeError, GuestCrashed, GuestTimeout
from conode.vm.guest_agent import GuestAgentClient
from conode.vm.guest_image import BASE_CMDLINE, GuestImage
from conode.vm.machine import CoMachine, MachineConfig, MachineExit
from conode.vm.snapshot import read_snapshot, write_snapshot

JOB_ID = 1
DEFAULT_BOOT_TIMEOUT_S = 120.0
SESSION_FORMAT = 2


@dataclass
class _JobState:
    argv: list[str] = field(default_factory=list)
    cwd: str = "/"
    exec_sent: bool = False
    exit_status: int | None = None
    agent_error: str | None = None


class GuestSession:
    """Runs commands in one guest; output goes to *stdout*/*stderr*, progress lines to *progress*."""

    def __init__(self, config: MachineConfig, stdout: BinaryIO, stderr: BinaryIO,
                 progress: Callable[[str], None] = lambda line: None,
                 console: Callable[[bytes], None] | None = None) -> None:
        self._stdout = stdout
        self._stderr = stderr
        self._progress = progress
        self.job = _JobState()
        self.machine = CoMachine(config, console or (lambda data: None), self._on_channel_bytes)
        self.agent = GuestAgentClient(self.machine.channel.send)
        self.agent.on_ready = self._on_agent_ready
        self._stop_reason: str | None = None
        self.ready_at: float | None = None
        self._snapshot_after_ns: int | None = None
        self._started = time.monotonic()

    # --- construction ---------------------------------------------------------------------------------------
    @classmethod
    def boot(cls, image: GuestImage, config: MachineConfig, stdout: BinaryIO, stderr: BinaryIO,
             progress: Callable[[str], None] = lambda line: None, verbose: bool = False,
             console: Callable[[bytes], None] | None = None) -> "GuestSession":
        session = cls(config, stdout, stderr, progress, console)
        cmdline = BASE_CMDLINE if verbose else BASE_CMDLINE + " quiet"
        session.machine.boot(image.kernel, image.initrd, cmdline)
        progress(f"booting the guest ({config.mem_mib} MiB)")
        return session

    @classmethod
    def resume(cls, path: Path, stdout: BinaryIO, stderr: BinaryIO,
               progress: Callable[[str], None] = lambda line: None) -> "GuestSession":
        state = read_snapshot(path)
        try:
            session_state = state["session"]
            if session_state.get("format") != SESSION_FORMAT:
                raise ConodeError(f"{path} holds a session of format {session_state.get('format')}")
            session = cls(CoMachine.config_from_state(state["machine"]), stdout, stderr, progress)
            session.machine.set_state(state["machine"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConodeError(f"{path} is not a complete conode snapshot ({exc!r})") from None
        session.job = _JobState(**session_state["job"])
        session.agent.set_state(session_state["agent"])
        if session.job.exec_sent and session.job.exit_status is None:
            session.agent.attach(JOB_ID, session)
        progress(f"resumed {path} ({session.machine.config.mem_mib} MiB guest)")
        return session

    # --- the host channel ------------------------------------------------------------------------------------
    def _on_channel_bytes(self, data: bytes) -> None:
        self.agent.feed(data)

    def _on_agent_ready(self, guest: str) -> None:
        self.ready_at = time.monotonic()
        self._progress(f"guest ready: {guest} ({self.ready_at - self._started:.2f} s)")
        self._send_exec()

    # CommandHandler for the one command this session runs.
    def on_output(self, stream: str, data: bytes) -> None:
        out = self._stdout if stream == "stdout" else self._stderr
        out.write(data)
        out.flush()

    def on_exit(self, status: int) -> None:
        self.job.exit_status = status
        self._stop("exit")

    def on_error(self, message: str) -> None:
        self.job.agent_error = message
        self._stop("agent-error")

    def _send_exec(self) -> None:
        job = self.job
        if self.agent.ready and job.argv and not job.exec_sent:
            self.agent.run(job.argv, self, job.cwd, ident=JOB_ID)
            job.exec_sent = True
            if self._snapshot_after_ns is not None:
                self.machine.pause_at_ns = self.machine.clock.now() + self._snapshot_after_ns

    def _stop(self, reason: str) -> None:
        if self._stop_reason is None:
            self._stop_reason = reason
        self.machine.pause()

    # --- running -------------------------------------------------------------------------------------------
    def start(self, argv: list[str], cwd: str = "/") -> None:
        self.job.argv = list(argv)
        self.job.cwd = cwd
        self._send_exec()

    def run(self, snapshot_after_s: float | None = None, snapshot_to: Path | None = None,
            timeout_s: float | None = None, boot_timeout_s: float = DEFAULT_BOOT_TIMEOUT_S) -> int:
        """Run until the command exits (return its status) or the snapshot point (write it, return 0).

        The snapshot point is *snapshot_after_s* seconds of guest time after the command started.
        """
        if snapshot_after_s is not None:
            self._snapshot_after_ns = int(snapshot_after_s * 1e9)
            if self.job.exec_sent:
                self.machine.pause_at_ns = self.machine.clock.now() + self._snapshot_after_ns
        timers = [threading.Timer(boot_timeout_s, self._boot_timed_out)]
        if timeout_s is not None:
            timers.append(threading.Timer(timeout_s, lambda: self._stop("timeout")))
        for timer in timers:
            timer.daemon = True
            timer.start()
        try:
            outcome = self.machine.run()
        finally:
            for timer in timers:
                timer.cancel()
        return self._finish(outcome, snapshot_to, timeout_s, boot_timeout_s)

    def _boot_timed_out(self) -> None:
        if not self.agent.ready:
            self._stop("boot-timeout")

    def _finish(self, outcome: MachineExit, snapshot_to: Path | None, timeout_s: float | None,
                boot_timeout_s: float) -> int:
        job = self.job
        if outcome is MachineExit.RESET or outcome is MachineExit.POWER_OFF:
            panic = self.machine.panic_message()
            if panic:
                raise GuestCrashed(f"guest kernel panic: {panic}")
            what = "rebooted" if outcome is MachineExit.RESET else "powered off"
            raise GuestCrashed(f"the guest {what} before the command finished")
        reason = self._stop_reason
        if reason == "exit" and job.exit_status is not None:
            if snapshot_to is not None:
                self._progress(f"the command finished before the snapshot point; no snapshot written to {snapshot_to}")
            return job.exit_status
        if reason == "agent-error":
            raise ConodeError(f"the in-guest agent refused the command: {job.agent_error}")
        if reason == "boot-timeout":
            raise GuestTimeout(f"the guest did not become ready within {boot_timeout_s:g} s")
        if reason == "timeout":
            raise GuestTimeout(f"the command did not finish within {timeout_s:g} s; the guest was stopped")
        # Paused at the snapshot point.
        if snapshot_to is None:
            raise ConodeError("the guest was paused with nowhere to write its snapshot")
        size = self.save(snapshot_to)
        self._progress(f"snapshot written to {snapshot_to} ({size / 1e6:.1f} MB)")
        return 0

    def save(self, path: Path) -> int:
        """Write machine and session to *path* (the machine must be paused)."""
        state = {
            "machine": self.machine.get_state(),
            "session": {
                "format": SESSION_FORMAT,
                "job": vars(self.job).copy(),
                "agent": self.agent.get_state(),
            },
        }
        return write_snapshot(path, state)
