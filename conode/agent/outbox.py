"""Job results the coordinator has not acknowledged yet, kept on disk until it does.

A finished job's result is written here before it is sent, and removed only when the coordinator acks it, so
neither a lost connection nor a restart of the agent loses it.
"""

from __future__ import annotations

import os
from pathlib import Path


class Outbox:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.tmp"):
            stale.unlink()

    def put(self, job: int, payload: bytes) -> None:
        path = self.directory / f"{job}.msg"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as out:
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)

    def remove(self, job: int) -> None:
        (self.directory / f"{job}.msg").unlink(missing_ok=True)

    def jobs(self) -> list[int]:
        return sorted(int(p.stem) for p in self.directory.glob("*.msg") if p.stem.isdigit())

    def items(self) -> list[tuple[int, bytes]]:
        return [(job, (self.directory / f"{job}.msg").read_bytes()) for job in self.jobs()]
