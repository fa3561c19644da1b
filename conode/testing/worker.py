"""Stand-in guest workers: they record what the agent tells them and say what a test makes them say.

FakeWorkers is a StartWorker (conode/agent/supervisor.py): the agent starts its "workers" through it, and the
test finds each one, in order of starting, in ``started``. Messages a fake worker sends go through the same
validation as a real worker's.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conode.agent.pipe import PipeError

_pids = itertools.count(1_000_000)


@dataclass
class FakeWorker:
    index: int
    boot_snapshot: Path | None
    resume: Path | None
    pid: int = field(default_factory=lambda: next(_pids))
    received: list[dict[str, Any]] = field(default_factory=list)
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    code: int | None = None
    stopped: bool = False
    _outgoing: list[Any] = field(default_factory=list)
    _garbage: str | None = None

    # --- the WorkerHandle the agent uses ---------------------------------------------------------------------
    def exit_code(self) -> int | None:
        return self.code

    def send(self, message: dict[str, Any]) -> bool:
        if self.code is not None:
            return False
        self.received.append(message)
        return True

    def messages(self) -> list[dict[str, Any]]:
        if self._garbage is not None:
            raise PipeError(self._garbage)
        out, self._outgoing = self._outgoing, []
        return out

    def drained(self) -> bool:
        return not self._outgoing

    def cpu_percent(self) -> float:
        return 0.0

    def stop(self) -> None:
        self.stopped = True
        self.kill()

    def kill(self) -> None:
        if self.code is None:
            self.code = -9

    # --- the test's side ---------------------------------------------------------------------------------------
    def emit(self, kind: str, **fields: Any) -> None:
        self._outgoing.append({"type": kind, **fields})

    def emit_raw(self, message: Any) -> None:
        self._outgoing.append(message)

    def ready(self, speed: float = 1000.0, guest: str = "Linux fake 6.1 i686") -> None:
        self.emit("ready", guest=guest, speed=speed)

    def finish(self, job: int, status: int = 0, outputs: dict[str, bytes] | None = None,
               missing: list[str] | None = None, runtime_s: float = 1.0) -> None:
        self.emit("finished", job=job, status=status, outputs=outputs or {}, missing=missing or [],
                  runtime_s=runtime_s)

    def fail(self, job: int, reason: str) -> None:
        self.emit("failed", job=job, reason=reason)

    def send_garbage(self, why: str = "undecodable message on the worker pipe") -> None:
        """The pipe itself breaks (what Unpacker raises on bytes that are not a message)."""
        self._garbage = why

    def crash(self, code: int = 1, last_words: str = "Segmentation fault") -> None:
        self.stderr_tail.append(last_words)
        self.code = code

    def exit(self, code: int = 0) -> None:
        self.code = code

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.received if m["type"] == kind]


class FakeWorkers:
    """Starts FakeWorkers for the agent and keeps them, in order of starting, for the test."""

    def __init__(self) -> None:
        self.started: list[FakeWorker] = []

    def __call__(self, index: int, boot_snapshot: Path | None, resume: Path | None) -> FakeWorker:
        worker = FakeWorker(index, boot_snapshot, resume)
        self.started.append(worker)
        return worker

    def current(self, index: int) -> FakeWorker:
        """The latest worker started in slot *index*."""
        return [w for w in self.started if w.index == index][-1]
