"""The coordinator's checkpoints of running jobs: one chain per job (a full piece, then deltas), within a disk
budget, each piece checked before it is kept.

Pieces arrive from the agent that runs the job (and only from it: the server checks the job runs there) as
chunks, written in order to ``checkpoints/JOB/SEQ.part``, then a commit with the piece's size and SHA-256. The
piece is kept only if the whole file matches them, parses as a piece of this job and number
(conode/vm/checkpoint.py), its pages inflate to exactly what its bitmap lists, and it follows the chain (a delta
on the chain's last piece, or a full piece that starts a new chain and replaces the old). The chain is recorded
in ``checkpoints/JOB/chain.json``; a chain of more than MAX_CHAIN_PIECES pieces has its deltas merged into one.
Anything refused is deleted, logged and answered with its reason; the chain before it stays the job's newest
complete checkpoint.

The budget counts every byte under ``checkpoints``; a chunk that would pass it, or leave the disk with less than
MIN_FREE_BYTES free, is refused (the upload is dropped, the reason logged) rather than fill the disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conode.atomic_file import write_atomically
from conode.errors import ConodeError
from conode.limits import IMAGE_CHUNK_BYTES, MAX_SNAPSHOT_BYTES
from conode.vm.checkpoint import (
    FULL,
    STREAMS,
    CheckpointError,
    check_chain,
    check_pages,
    merge,
    read_piece,
    write_piece,
)
from conode.vm.guest import GuestSnapshot

log = logging.getLogger("coordinator")

MAX_CHAIN_PIECES = 8  # a full piece and deltas; past this the deltas are merged into one
MIN_FREE_BYTES = 256 << 20  # checkpoints never leave the coordinator's disk with less free than this
RECORD_BYTES = 4096  # room kept in the budget for a chain's record


@dataclass(frozen=True)
class Link:
    """One piece of a stored chain, as a run_job's ``resume`` lists it."""

    seq: int
    base: int
    size: int
    sha256: str

    def wire(self) -> dict[str, Any]:
        return {"seq": self.seq, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class _Commit:
    """A piece whose upload ended: what its commit says, and why its check refused it (None: it passed)."""

    job: int
    seq: int
    base: int
    size: int
    sha256: str
    problem: str | None


@dataclass
class _Upload:
    seq: int
    next_index: int = 0
    size: int = 0


class CheckpointStore:
    def __init__(self, root: Path, budget_bytes: int) -> None:
        self.root = root
        self.budget_bytes = budget_bytes
        root.mkdir(parents=True, exist_ok=True)
        self._uploads: dict[int, _Upload] = {}
        self._checker = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-check")
        self._checking: dict[int, tuple[Future, _Commit, Any]] = {}  # job -> its piece being checked
        self._heard: dict[int, int] = {}  # job -> the highest piece number an upload started with
        for partial in root.glob("*/*.part"):  # uploads cut short by a restart never complete
            partial.unlink()
        self.used = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())

    # --- what is kept -------------------------------------------------------------------------------------------
    def _dir(self, job: int) -> Path:
        return self.root / str(job)

    def chain(self, job: int) -> list[Link]:
        """The job's newest complete checkpoint (empty: none)."""
        try:
            data = json.loads((self._dir(job) / "chain.json").read_text())
            return [Link(int(e["seq"]), int(e["base"]), int(e["size"]), str(e["sha256"])) for e in data["pieces"]]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("job %d: its checkpoint record is damaged (%s); the job has no checkpoint", job, exc)
            return []

    def outputs(self, job: int) -> dict[str, int]:
        """How much stdout and stderr the job had written at its newest checkpoint."""
        try:
            data = json.loads((self._dir(job) / "chain.json").read_text())
            return {s: int(data["outputs"][s]) for s in STREAMS}
        except (OSError, ValueError, KeyError, TypeError):
            return {s: 0 for s in STREAMS}

    def next_seq(self, job: int) -> int:
        """The first piece number for the node a job's guest moved to: past every piece kept or heard of, so
        that none of its own is ever mistaken for one its previous node sent."""
        return max([self._heard.get(job, -1)] + [link.seq for link in self.chain(job)]) + 1

    def piece_path(self, job: int, seq: int) -> Path:
        return self._dir(job) / f"{seq}.ckpt"

    def jobs(self) -> list[int]:
        return sorted(int(d.name) for d in self.root.iterdir() if d.is_dir() and d.name.isdigit())

    def close(self) -> None:
        self._checker.shutdown(wait=True)

    def drop(self, job: int) -> None:
        """Forget the job's checkpoints (it ended, or its checkpoint cannot be resumed)."""
        checking = self._checking.pop(job, None)
        if checking is not None:
            checking[0].result()  # its file is about to go
        directory = self._dir(job)
        if directory.exists():
            self.used -= sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
            shutil.rmtree(directory, ignore_errors=True)
        self._uploads.pop(job, None)
        self._heard.pop(job, None)

    def sweep(self, keep: Callable[[int], bool]) -> None:
        """Drop the checkpoints of the jobs *keep* says no longer need them."""
        for job in self.jobs():
            if not keep(job):
                self.drop(job)

    def chunks(self, job: int) -> Iterator[tuple[int, int, bytes]]:
        """(seq, index, data) of every chunk of the job's chain, in order, read as they are taken: what an agent
        needs to resume it. OSError if a piece cannot be read."""
        for link in self.chain(job):
            with open(self.piece_path(job, link.seq), "rb") as piece:
                index = 0
                while data := piece.read(IMAGE_CHUNK_BYTES):
                    yield link.seq, index, data
                    index += 1

    # --- what arrives ---------------------------------------------------------------------------------------------
    def put(self, job: int, seq: int, index: int, data: bytes) -> str | None:
        """Store one chunk of piece *seq*; why it is refused, or None."""
        upload = self._uploads.get(job)
        if job in self._checking:
            return f"checkpoint piece {seq} arrived while the job's piece before was still being checked"
        if index == 0:
            self._abandon(job)
            upload = self._uploads[job] = _Upload(seq)
            self._heard[job] = max(seq, self._heard.get(job, -1))
        if upload is None or upload.seq != seq or upload.next_index != index:
            self._abandon(job)
            return f"chunk {index} of checkpoint piece {seq} arrived out of order; the piece is dropped"
        if upload.size + len(data) > MAX_SNAPSHOT_BYTES:
            self._abandon(job)
            return f"checkpoint piece {seq} is over the {MAX_SNAPSHOT_BYTES}-byte limit of a piece"
        if self.used + len(data) + RECORD_BYTES > self.budget_bytes:
            self._abandon(job)
            return (f"checkpoint piece {seq} would take the checkpoints past their budget of "
                    f"{self.budget_bytes >> 20} MiB (checkpoint_budget_mib in coordinator.toml)")
        try:
            if shutil.disk_usage(self.root).free - len(data) < MIN_FREE_BYTES:
                self._abandon(job)
                return f"the coordinator's disk has less than {MIN_FREE_BYTES >> 20} MiB free; no checkpoint kept"
            self._dir(job).mkdir(exist_ok=True)
            with open(self._dir(job) / f"{seq}.part", "ab") as part:
                part.write(data)
        except OSError as exc:
            self._abandon(job)
            return f"cannot store checkpoint piece {seq}: {exc.strerror or exc}"
        upload.next_index += 1
        upload.size += len(data)
        self.used += len(data)
        return None

    def _abandon(self, job: int) -> None:
        upload = self._uploads.pop(job, None)
        if upload is not None:
            part = self._dir(job) / f"{upload.seq}.part"
            if part.exists():
                self.used -= part.stat().st_size
                part.unlink()

    def commit(self, job: int, seq: int, base: int, size: int, sha256: str) -> str | None:
        """Check the uploaded piece here and now and add it to the job's chain; why it is refused, or None."""
        problem = self._committed(job, seq)
        if problem is None:
            problem = self.accept(_Commit(job, seq, base, size, sha256, self._verify(job, seq, base, size, sha256)))
        return problem

    def commit_later(self, job: int, seq: int, base: int, size: int, sha256: str, tag: Any) -> str | None:
        """Have the uploaded piece checked on the checker's thread (a full piece of a large guest takes a good
        fraction of a second: never in the coordinator's loop); :meth:`checked` hands it back with *tag*. Why
        it is refused at once, or None."""
        problem = self._committed(job, seq)
        if problem is None:
            future = self._checker.submit(self._verify, job, seq, base, size, sha256)
            self._checking[job] = (future, _Commit(job, seq, base, size, sha256, None), tag)
        return problem

    def checked(self, wait: bool = False) -> list[tuple[Any, _Commit]]:
        """The pieces whose check has ended (all of them, with *wait*): (tag, commit) each, for :meth:`accept`
        or :meth:`reject`."""
        done = []
        for job, (future, commit, tag) in list(self._checking.items()):
            if wait or future.done():
                del self._checking[job]
                done.append((tag, dataclasses.replace(commit, problem=future.result())))
        return done

    def _committed(self, job: int, seq: int) -> str | None:
        upload = self._uploads.pop(job, None)
        if upload is None or upload.seq != seq:
            if upload is not None:
                self._discard_part(job, upload.seq)
            return f"checkpoint piece {seq} was never uploaded whole"
        return None

    def _verify(self, job: int, seq: int, base: int, size: int, sha256: str) -> str | None:
        """Why the uploaded piece is not what its commit says or not a valid piece, or None. Reads only the
        piece's own file: safe on another thread."""
        part = self._dir(job) / f"{seq}.part"
        try:
            if part.stat().st_size != size:
                return f"checkpoint piece {seq} has {part.stat().st_size} bytes, its commit says {size}"
            digest = hashlib.sha256()
            with open(part, "rb") as data:
                while block := data.read(1 << 20):
                    digest.update(block)
        except OSError as exc:
            return f"checkpoint piece {seq} cannot be read back: {exc.strerror or exc}"
        if digest.hexdigest() != sha256:
            return f"checkpoint piece {seq} does not match its SHA-256; it was damaged on the way"
        try:
            piece = read_piece(part)
            check_pages(piece)
        except CheckpointError as exc:
            return str(exc)
        if (piece.job, piece.seq, piece.base) != (job, seq, base):
            return (f"checkpoint piece {seq} (on {base}) of job {job} holds piece {piece.seq} (on {piece.base}) of job "
                    f"{piece.job}")
        return None

    def follows(self, commit: _Commit) -> str | None:
        """Why a checked piece cannot join its job's chain (its check refused it, or it does not follow the
        chain), or None."""
        seq, base = commit.seq, commit.base
        chain = self.chain(commit.job)
        last = chain[-1].seq if chain else None
        if commit.problem is not None:
            return commit.problem
        if base == FULL and last is not None and seq <= last:
            return f"checkpoint piece {seq} is older than the job's newest ({last})"
        if base != FULL and base != last:
            return (f"checkpoint piece {seq} is a delta on piece {base}, but the job's newest checkpoint is "
                    f"{'none' if last is None else last}; send a full piece")
        return None

    def accept(self, commit: _Commit) -> str | None:
        """Add a checked piece to its job's chain if it follows it; why not, or None."""
        job, seq, base = commit.job, commit.seq, commit.base
        problem = self.follows(commit)
        if problem is not None:
            self._discard_part(job, seq)
            return problem
        chain = self.chain(job)
        os.replace(self._dir(job) / f"{seq}.part", self.piece_path(job, seq))
        piece = read_piece(self.piece_path(job, seq))
        chain = [] if base == FULL else chain
        chain.append(Link(seq, base, commit.size, commit.sha256))
        self._record(job, chain, piece.outputs)
        if len(chain) > MAX_CHAIN_PIECES:
            self._compact(job, chain)
        return None

    def reject(self, commit: _Commit) -> None:
        """Forget a checked piece that is no longer wanted (its job moved meanwhile, its gang's cut was
        discarded)."""
        self._discard_part(commit.job, commit.seq)

    def _discard_part(self, job: int, seq: int) -> None:
        part = self._dir(job) / f"{seq}.part"
        if part.exists():
            self.used -= part.stat().st_size
            part.unlink()

    def _record(self, job: int, chain: list[Link], outputs: dict[str, int]) -> None:
        """Make *chain* the job's checkpoint and delete the pieces it no longer uses."""
        record = {"pieces": [{"seq": l.seq, "base": l.base, "size": l.size, "sha256": l.sha256} for l in chain],
                  "outputs": outputs}
        directory = self._dir(job)
        before = (directory / "chain.json").stat().st_size if (directory / "chain.json").exists() else 0
        write_atomically(directory / "chain.json", json.dumps(record).encode())
        self.used += (directory / "chain.json").stat().st_size - before
        wanted = {f"{l.seq}.ckpt" for l in chain}
        for old in directory.glob("*.ckpt"):
            if old.name not in wanted:
                self.used -= old.stat().st_size
                old.unlink()

    def _compact(self, job: int, chain: list[Link]) -> None:
        """Merge the chain's deltas into one (the newest's number, on the full piece)."""
        try:
            pieces = [read_piece(self.piece_path(job, l.seq)) for l in chain[1:]]
            check_chain([read_piece(self.piece_path(job, chain[0].seq))] + pieces)
            ram, disk, last = merge(pieces)
            path = self._dir(job) / f"{last.seq}.merged"
            snapshot = GuestSnapshot.from_data(last.state, "the newest checkpoint piece")
            size = write_piece(path, job, last.seq, chain[0].seq, last.outputs, ram, snapshot, disk)
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
        except (ConodeError, OSError) as exc:
            log.warning("job %d: its checkpoint chain could not be merged (%s); it stays as it is", job, exc)
            return
        self.used += size - chain[-1].size
        os.replace(path, self.piece_path(job, last.seq))
        merged = [chain[0], Link(last.seq, chain[0].seq, size, sha)]
        self._record(job, merged, last.outputs)
        log.info("job %d: checkpoint deltas %d..%d merged into one of %.1f MiB", job, chain[1].seq, last.seq,
                 size / (1 << 20))
