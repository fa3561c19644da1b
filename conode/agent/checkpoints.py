"""The agent's side of checkpoints: the pieces its workers take go to the coordinator, and the chains the
coordinator sends come in for a job to go on from.

Out: a worker writes each piece into ``checkpoints/out`` and says so (its message checked by wire.py); the agent
sends it in IMAGE_CHUNK_BYTES chunks (``checkpoint_put``) and then ``checkpoint_commit`` with its size and SHA-256,
and deletes it. Pieces are sent only while the link is up with nothing waiting before them (the job's output
must reach the coordinator before the checkpoint that counts it); one that cannot go now is dropped, and the
worker makes its next piece a full one, as it does when the coordinator refuses one (a gang's rank's piece of a
cut: the agent says ``cut_failed``, so that the coordinator discards the cut at once).

In: ``checkpoint_data`` chunks are written to ``checkpoints/in/job-N/SEQ.piece``; the ``run_job`` that follows lists
the chain (seq, size, SHA-256 of each piece), and each piece must be there, whole and matching, before the job
goes to a worker (which checks every field again as it restores).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Protocol

from conode.agent.disk import StateDisk
from conode.cluster.protocol import PIECE_NUMBER, PIECE_SIZE, SHA256, ProtocolError, _check_field
from conode.errors import ConodeError
from conode.limits import IMAGE_CHUNK_BYTES, MAX_SNAPSHOT_BYTES

log = logging.getLogger("conode.agent")


class BulkLink(Protocol):
    def send_now(self, kind: str, **fields: Any) -> bool: ...


class CheckpointRefused(ConodeError):
    """A chain to resume from that is not here whole: the job starts elsewhere, or from scratch."""


class Checkpoints:
    def __init__(self, state_dir: Path, link: BulkLink, disk: StateDisk) -> None:
        self.out_dir = state_dir / "checkpoints" / "out"
        self.in_dir = state_dir / "checkpoints" / "in"
        self._link = link
        self._disk = disk
        disk.attempt("clear the checkpoint directories", self._clear)

    def _clear(self) -> None:
        for directory in (self.out_dir, self.in_dir):
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True, exist_ok=True)

    def settings(self, interval_s: float, seq: int) -> dict[str, Any]:
        """What a worker's run or restore message carries for it to take checkpoints."""
        return {"dir": str(self.out_dir), "interval_s": interval_s, "seq": seq}

    # --- out: a worker's piece to the coordinator ------------------------------------------------------------
    def _out_path(self, job: int, seq: int) -> Path:
        return self.out_dir / f"job-{job}-{seq}.ckpt"

    def discard(self, job: int, seq: int) -> None:
        """Delete a piece no longer wanted (its job ended meanwhile)."""
        path = self._out_path(job, seq)
        self._disk.attempt("remove a checkpoint piece", lambda: path.unlink(missing_ok=True))

    def send(self, message: dict[str, Any]) -> str | None:
        """Send the piece a worker announced (and delete it): None once it all went, else why it did not."""
        job, seq = message["job"], message["seq"]
        path = self._out_path(job, seq)
        try:
            if Path(message["path"]) != path:
                problem = f"a worker announced it at {message['path'][:200]}, not in {self.out_dir}"
            else:
                problem = self._send_file(path, message)
        finally:
            self.discard(job, seq)
        if problem is not None:
            log.warning("job %d: checkpoint piece %d not sent: %s", job, seq, problem)
        return problem

    def _send_file(self, path: Path, message: dict[str, Any]) -> str | None:
        job, seq, size = message["job"], message["seq"], message["size"]
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            return f"it is not readable: {exc.strerror or exc}"
        try:
            if os.fstat(fd).st_size != size:
                return "it is not the size its worker said"
            for index in range(-(-size // IMAGE_CHUNK_BYTES)):
                data = os.pread(fd, IMAGE_CHUNK_BYTES, index * IMAGE_CHUNK_BYTES)
                if not self._link.send_now("checkpoint_put", job=job, seq=seq, index=index, data=data):
                    return "the coordinator link is busy or down"
        finally:
            os.close(fd)
        if not self._link.send_now("checkpoint_commit", job=job, seq=seq, base=message["base"], size=size,
                                   sha256=message["sha256"]):
            return "the coordinator link is busy or down"
        return None

    # --- in: a chain from the coordinator ----------------------------------------------------------------------
    def _piece_path(self, job: int, seq: int) -> Path:
        return self.in_dir / f"job-{job}" / f"{seq}.piece"

    def receive(self, message: dict[str, Any]) -> None:
        """Write one chunk of a piece the coordinator sends ahead of a run_job that resumes from it."""
        job, seq, index, data = message["job"], message["seq"], message["index"], message["data"]
        if seq < 0 or not 0 <= index < MAX_SNAPSHOT_BYTES // IMAGE_CHUNK_BYTES:
            log.warning("job %d: checkpoint chunk %d of piece %d is out of bounds; ignored", job, index, seq)
            return
        path = self._piece_path(job, seq)

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "r+b" if index and path.exists() else "wb") as piece:  # chunk 0 starts it afresh
                piece.seek(index * IMAGE_CHUNK_BYTES)
                piece.write(data)

        self._disk.attempt("store a checkpoint chunk", write)

    def chain(self, job: int, pieces: Any) -> list[str]:
        """The files of the chain *pieces* (a run_job's ``resume``), each checked whole against its size and
        SHA-256; CheckpointRefused if one is missing or different."""
        paths = []
        for entry in pieces:
            try:
                if not isinstance(entry, dict):
                    raise ProtocolError("not a map")
                _check_field("seq", entry.get("seq"), PIECE_NUMBER)
                _check_field("size", entry.get("size"), PIECE_SIZE)
                _check_field("sha256", entry.get("sha256"), SHA256)
            except ProtocolError as exc:
                raise CheckpointRefused(f"the coordinator's checkpoint chain is not valid: {exc}") from None
            path = self._piece_path(job, entry["seq"])
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise CheckpointRefused(f"checkpoint piece {entry['seq']} did not arrive: {exc.strerror}") from None
            if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise CheckpointRefused(f"checkpoint piece {entry['seq']} arrived damaged or incomplete")
            paths.append(str(path))
        if not paths:
            raise CheckpointRefused("the checkpoint chain is empty")
        return paths

    def forget(self, job: int) -> None:
        """The job no longer needs the chain it came with."""
        directory = self.in_dir / f"job-{job}"
        self._disk.attempt("remove a job's checkpoint chain", lambda: shutil.rmtree(directory, ignore_errors=True))
