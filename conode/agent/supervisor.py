"""Supervision of guest worker processes: start, talk to, notice the death of, and restart them."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

from conode.agent.pipe import Unpacker, pack

log = logging.getLogger("conode.agent")

RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 15.0, 30.0)
STDERR_TAIL = 20


class WorkerProcess:
    """One `python -m conode.agent.worker` child and its pipes."""

    def __init__(self, index: int, mem_mib: int, cpu_cap: float = 100.0) -> None:
        self.index = index
        self.mem_mib = mem_mib
        self.cpu_cap = cpu_cap
        self.process: subprocess.Popen | None = None
        self.ready = False
        self.paused = False  # the worker confirmed its guest is stopped
        self.pause_requested = False
        self.vacating = False
        self.stopping = False
        self.resumed_jobs: list[int] = []  # jobs continued from a vacated snapshot this run
        self.speed = 0.0
        self.guest = ""
        self.job: int | None = None
        self.crashes = 0
        self.restart_at: float | None = None
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL)
        self._unpacker = Unpacker()

    def start(self, boot_snapshot: Path | None = None, resume: Path | None = None) -> None:
        args = [sys.executable, "-m", "conode.agent.worker", "--mem", str(self.mem_mib), "--cpu-cap", str(self.cpu_cap)]
        if resume is not None:
            args += ["--resume", str(resume)]
        elif boot_snapshot is not None:
            args += ["--boot-snapshot", str(boot_snapshot)]
        self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        bufsize=0)
        for stream in (self.process.stdout, self.process.stderr):
            os.set_blocking(stream.fileno(), False)  # type: ignore[union-attr]
        self.ready = False
        self.paused = False
        self.vacating = False
        self.restart_at = None
        self._unpacker = Unpacker()
        log.info("guest worker %d started (pid %d, %d MiB)", self.index, self.process.pid, self.mem_mib)

    @property
    def stdout_fd(self) -> int:
        return self.process.stdout.fileno()  # type: ignore[union-attr]

    @property
    def stderr_fd(self) -> int:
        return self.process.stderr.fileno()  # type: ignore[union-attr]

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def send(self, message: dict[str, Any]) -> bool:
        if not self.alive:
            return False
        try:
            self.process.stdin.write(pack(message))  # type: ignore[union-attr]
            return True
        except (BrokenPipeError, OSError):
            return False

    def read_messages(self) -> list[dict[str, Any]]:
        """Messages waiting on the worker's stdout (non-blocking). Raises PipeError on garbage."""
        messages: list[dict[str, Any]] = []
        while True:
            try:
                data = os.read(self.stdout_fd, 1 << 16)
            except BlockingIOError:
                return messages
            if not data:
                return messages
            messages += self._unpacker.feed(data)

    def read_stderr(self) -> None:
        try:
            data = os.read(self.stderr_fd, 1 << 16)
        except BlockingIOError:
            return
        for line in data.decode(errors="replace").splitlines():
            if line.strip():
                self.stderr_tail.append(line)
                log.debug("worker %d: %s", self.index, line)

    def crashed(self, now: float) -> str:
        """Record a crash; schedule a restart with back-off; return what the worker said last."""
        self.crashes += 1
        code = self.process.poll() if self.process else None
        self.close()
        self.restart_at = now + RESTART_BACKOFF_S[min(self.crashes - 1, len(RESTART_BACKOFF_S) - 1)]
        last = self.stderr_tail[-1] if self.stderr_tail else "no message"
        return f"guest worker exited with status {code}: {last}"

    def stop(self) -> None:
        if self.alive:
            self.send({"type": "quit"})
            try:
                self.process.wait(timeout=5)  # type: ignore[union-attr]
            except subprocess.TimeoutExpired:
                self.process.kill()  # type: ignore[union-attr]
        self.close()

    def close(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
                if stream is not None:
                    stream.close()
        self.process = None
        self.ready = False
        self.paused = False
        self.vacating = False

