"""Checkpoint pieces: a running job's guest saved incrementally, so that it can go on elsewhere if its workstation
dies.

A *chain* is a full piece (every page of RAM, every cluster of the disk overlay) followed by deltas (the pages
changed and the overlay clusters written since the piece before). Every piece also holds the whole device state
(the Guest snapshot envelope without RAM pages and disk clusters: small) and how many bytes of stdout and stderr
the job had written when it was taken, so the chain's last piece alone says where the job goes on from. A piece
is a snapshot file (conode/vm/snapshot.py: header, SHA-256 of the payload, one msgpack map) whose map holds
``checkpoint`` (job, seq, base: the seq of the piece it applies to, or -1 for a full one; outputs), ``ram`` (a
RamState record listing the pages it carries, in compressed chunks), ``state`` and, for a guest with a disk,
``disk`` (a DiskDelta record: the overlay's cluster map and the clusters it carries, conode/vm/disk/delta.py).

Pieces come from the agent that ran the guest, so the coordinator and the agent that resumes check every one:
the file, then each field (:func:`read_piece`), then that the chunks inflate, within bounds, to exactly the pages
the bitmap lists and the disk clusters the delta lists (:func:`check_pages`), and that a chain is whole
(:func:`check_chain`).
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conode.errors import SnapshotError
from conode.limits import MAX_STREAM_BYTES
from conode.vm import state
from conode.vm.disk.delta import Changes, load_changes, merge_changes, whole_state
from conode.vm.guest import GuestSnapshot
from conode.vm.machine import CoMachine
from conode.vm.snapshot import PAGE, PAGES_PER_CHUNK, RamState, ram_pages, read_snapshot, write_snapshot

KEYS = ("checkpoint", "ram", "state")
FULL = -1  # the base of a piece that holds every page
MAX_SEQ = 1 << 40
STREAMS = ("stdout", "stderr")


class CheckpointError(SnapshotError):
    """A checkpoint piece or chain that is not valid: it is refused, and the job goes on from the one before."""


@dataclass(frozen=True)
class Piece:
    """One checkpoint piece, its fields checked (its pages by :func:`check_pages`)."""

    job: int
    seq: int
    base: int
    outputs: dict[str, int]  # stream -> bytes the job had written when the piece was taken
    ram: RamState
    state: dict[str, Any]  # the GuestSnapshot envelope, its RAM and disk clusters elsewhere (the chain)
    disk: Changes | None  # the disk overlay's clusters written since the piece before (None: no disk)

    @property
    def full(self) -> bool:
        return self.base == FULL

    @property
    def pages(self) -> int:
        return int.from_bytes(self.ram.bitmap, "little").bit_count()


def page_runs(bitmap: bytes | bytearray) -> Iterator[tuple[int, int]]:
    """(first page, count) of each run of set bits of *bitmap*, at most PAGES_PER_CHUNK long."""
    first = count = 0
    for index, byte in enumerate(bitmap):
        if not byte:
            if count:
                yield first, count
                count = 0
            continue
        for bit in range(8):
            page = index * 8 + bit
            if byte >> bit & 1:
                if count and (page != first + count or count == PAGES_PER_CHUNK):
                    yield first, count
                    count = 0
                if not count:
                    first = page
                count += 1
            elif count:
                yield first, count
                count = 0
    if count:
        yield first, count


def encode_pages(pages: Iterator[bytes], bitmap: bytes, ram_bytes: int) -> dict[str, Any]:
    """A RamState record of the pages *bitmap* lists, given in order by *pages* (whole pages, joined or not),
    compressed PAGES_PER_CHUNK pages a chunk."""
    chunks: list[bytes] = []
    batch = bytearray()
    limit = PAGES_PER_CHUNK * PAGE
    for data in pages:
        batch += data
        while len(batch) >= limit:
            chunks.append(zlib.compress(bytes(batch[:limit]), 1))
            del batch[:limit]
    if batch:
        chunks.append(zlib.compress(bytes(batch), 1))
    return state.dump(RamState(ram_bytes, PAGE, bytes(bitmap), tuple(chunks)))


def write_piece(path: Path, job: int, seq: int, base: int, outputs: dict[str, int], ram: dict[str, Any],
                envelope: GuestSnapshot, disk: dict[str, Any] | None = None) -> int:
    """Write a piece atomically (*disk*: a DiskDelta record, for a guest with a disk); return its size."""
    meta = {"job": job, "seq": seq, "base": base, "outputs": {s: int(outputs.get(s, 0)) for s in STREAMS}}
    return write_snapshot(path, {"checkpoint": meta, "ram": ram, "state": envelope.to_data(),
                                 **({"disk": disk} if disk is not None else {})})


def _int(value: Any, low: int, high: int, what: str, origin: str) -> int:
    if type(value) is not int or not low <= value <= high:
        raise CheckpointError(f"{origin}: its {what} {value!r} is not an integer from {low} to {high}")
    return value


def read_piece(path: Path) -> Piece:
    """Read and check a piece file (not yet its pages: :func:`check_pages`); CheckpointError if it is not one."""
    origin = f"checkpoint piece {path.name}"
    try:
        data = read_snapshot(path, KEYS)
    except CheckpointError:
        raise
    except SnapshotError as exc:
        raise CheckpointError(str(exc)) from None
    meta = data["checkpoint"]
    job = _int(meta.get("job"), 0, (1 << 63) - 1, "job", origin)
    seq = _int(meta.get("seq"), 0, MAX_SEQ, "sequence number", origin)
    base = _int(meta.get("base"), FULL, seq - 1, "base", origin)
    outputs = meta.get("outputs")
    if not isinstance(outputs, dict) or set(outputs) != set(STREAMS):
        raise CheckpointError(f"{origin}: it does not say how much output the job had written")
    offsets = {s: _int(outputs[s], 0, 1 << 40, f"{s} offset", origin) for s in STREAMS}
    try:
        ram = state.load(RamState, data["ram"])
        snapshot = GuestSnapshot.from_data(data["state"], origin)
        config = CoMachine.config_from_state(snapshot.machine)
        disk = load_changes(data["disk"]) if data.get("disk") is not None else None
    except SnapshotError as exc:
        raise CheckpointError(f"{origin}: {exc}") from None
    if (disk is None) != (config.disk is None):
        raise CheckpointError(f"{origin}: its disk overlay does not match its guest's disk configuration")
    if base == FULL and disk is not None and not disk.whole:
        raise CheckpointError(f"{origin}: a full piece that does not hold its whole disk overlay")
    if snapshot.job is None:
        raise CheckpointError(f"{origin}: its guest runs no job")
    if ram.size != config.mem_mib << 20 or len(ram.bitmap) != (ram.size // PAGE + 7) // 8:
        raise CheckpointError(f"{origin}: its RAM of {ram.size} bytes does not fit its guest of {config.mem_mib} MiB")
    if base == FULL and int.from_bytes(ram.bitmap, "little") != (1 << ram.size // PAGE) - 1:
        raise CheckpointError(f"{origin}: a full piece that does not hold every page")
    if sum(offsets.values()) > MAX_STREAM_BYTES * 2:
        raise CheckpointError(f"{origin}: its output offsets are beyond any job's output")
    return Piece(job, seq, base, offsets, ram, data["state"], disk)


def iter_pages(ram: RamState) -> Iterator[tuple[int, bytes]]:
    """(page, contents) of each page a piece carries, in order; CheckpointError if the chunks do not hold
    exactly the pages the bitmap lists."""
    try:
        yield from ram_pages(ram)
    except SnapshotError as exc:
        raise CheckpointError(f"a checkpoint's RAM is not valid: {exc}") from None


def check_pages(piece: Piece) -> None:
    """Inflate every chunk of *piece*, checking it holds exactly the pages its bitmap lists and the disk
    clusters its delta lists."""
    for _ in iter_pages(piece.ram):
        pass
    try:
        for _ in piece.disk.clusters() if piece.disk is not None else ():
            pass
    except SnapshotError as exc:
        raise CheckpointError(f"checkpoint piece {piece.seq}: {exc}") from None


def check_chain(pieces: list[Piece]) -> None:
    """A chain is a full piece, then deltas each on the one before, all of one job and one RAM size."""
    if not pieces or not pieces[0].full:
        raise CheckpointError("a checkpoint chain must begin with a full piece")
    for before, after in itertools.pairwise(pieces):
        if after.full or after.base != before.seq or after.job != before.job or after.ram.size != before.ram.size \
                or _disk_of(after) != _disk_of(before):
            raise CheckpointError(f"checkpoint piece {after.seq} of job {after.job} does not follow piece "
                                  f"{before.seq}: the chain is broken")


def _disk_of(piece: Piece) -> tuple[str, int] | None:
    return (piece.disk.base_sha256, piece.disk.base_size) if piece.disk is not None else None


def merge(pieces: list[Piece]) -> tuple[dict[str, Any], dict[str, Any] | None, Piece]:
    """The RAM and disk records of one piece equal to *pieces* applied in order (a full one if the first is),
    and the last piece (whose state and outputs it takes). Memory: at most the guest's RAM."""
    if not pieces:
        raise CheckpointError("nothing to merge")
    newest: dict[int, bytes] = {}
    for piece in pieces:
        newest.update(iter_pages(piece.ram))
    size = pieces[-1].ram.size
    bitmap = bytearray((size // PAGE + 7) // 8)
    for page in newest:
        bitmap[page >> 3] |= 1 << (page & 7)
    order = sorted(newest)
    try:
        disk = merge_changes([p.disk for p in pieces if p.disk is not None]) if pieces[-1].disk else None
    except SnapshotError as exc:
        raise CheckpointError(f"the checkpoint's disk cannot be merged: {exc}") from None
    return encode_pages((newest[p] for p in order), bytes(bitmap), size), disk, pieces[-1]


def materialize(pieces: list[Piece], memory: memoryview) -> None:
    """Write the chain's RAM into *memory* (zeroed, the guest's size); CheckpointError if it is not valid."""
    check_chain(pieces)
    if len(memory) != pieces[0].ram.size:
        raise CheckpointError(f"the checkpoint's RAM is {pieces[0].ram.size} bytes, the guest has {len(memory)}")
    for piece in pieces:
        for index, page in iter_pages(piece.ram):
            memory[index * PAGE:(index + 1) * PAGE] = page


def guest_state(pieces: list[Piece]) -> GuestSnapshot:
    """The chain's device state: its last piece's, with the disk overlay its pieces add up to."""
    origin = f"checkpoint piece {pieces[-1].seq}"
    envelope = pieces[-1].state
    if pieces[-1].disk is not None:
        machine = envelope.get("machine")
        devices = machine.get("devices") if isinstance(machine, dict) else None
        if not isinstance(devices, dict):
            raise CheckpointError(f"{origin} has no device state")
        try:
            disk = whole_state(load_changes(merge_changes([p.disk for p in pieces if p.disk is not None])))
        except SnapshotError as exc:
            raise CheckpointError(f"the checkpoint's disk overlay is not whole: {exc}") from None
        envelope = {**envelope, "machine": {**machine, "devices": {**devices, "disk": disk}}}
    return GuestSnapshot.from_data(envelope, origin)

