"""Job results the coordinator has not acknowledged yet, kept until it does.

A finished job's result is kept here before it is sent, and removed only when the coordinator acks it, so
neither a lost connection nor a restart of the agent loses it. The memory copy is the one the agent sends from;
the disk copy is what survives a restart, written when the disk allows (StateDisk says when it does not).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from conode.agent.disk import StateDisk
from conode.atomic_file import write_atomically


class Outbox:
    def __init__(self, directory: Path, disk: StateDisk | None = None) -> None:
        self.directory = directory
        self._disk = disk or StateDisk()
        self._results: dict[int, bytes] = {}
        self._disk.attempt("create the outbox", lambda: directory.mkdir(parents=True, exist_ok=True))
        self._disk.attempt("load the outbox", self._load)

    def _load(self) -> None:
        for stale in self.directory.glob("*.tmp"):
            stale.unlink(missing_ok=True)
        for path in self.directory.glob("*.msg"):
            if path.stem.isdigit():
                self._results[int(path.stem)] = path.read_bytes()

    def put(self, job: int, payload: bytes) -> None:
        self._results[job] = payload
        self._disk.attempt("write a result to the outbox", lambda: self._write(job, payload))

    def _write(self, job: int, payload: bytes) -> None:
        path = self.directory / f"{job}.msg"
        write_atomically(path, payload, tmp=path.with_suffix(".tmp"))  # a full disk must not keep half a file

    def remove(self, job: int) -> None:
        self._results.pop(job, None)
        self._disk.attempt("remove an acknowledged result", partial((self.directory / f"{job}.msg").unlink,
                                                                    missing_ok=True))

    def __contains__(self, job: int) -> bool:
        return job in self._results

    def payload(self, job: int) -> bytes | None:
        return self._results.get(job)

    def jobs(self) -> list[int]:
        return sorted(self._results)

    def items(self) -> list[tuple[int, bytes]]:
        return [(job, self._results[job]) for job in self.jobs()]
