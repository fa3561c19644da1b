"""A guest's disk: a shared read-only base image plus the guest's own copy-on-write overlay.

The overlay is a sparse file holding the clusters (4 KiB) the guest wrote, each at its own offset, and a
cluster map (one byte per cluster: 1 = the overlay holds it). Reads of clusters the guest never wrote go
straight to the base image; a write of part of such a cluster first copies the rest of it up from the base.
The base is never written. Discarding whole clusters punches holes in the overlay and gives them back to the
base; flushing is an fsync of the overlay (and of its map, for an overlay kept in a named file).

The guest may hold at most its budget in the overlay: a write that needs more clusters fails, as does one
the host cannot carry out (its disk full, its quota reached). Either way the guest sees an I/O error for that
request and the host carries on. The map is saved in snapshots with the clusters it lists; checkpoints
(conode/vm/checkpoint.py) save only the clusters written since the one before (:meth:`CowDisk.take_changes`,
merged by :mod:`.delta`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import logging
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Sequence, Union

from conode.errors import DiskImageError, SnapshotError
from conode.limits import MAX_DISK_BUDGET_MIB
from conode.vm import state
from conode.vm.disk.image import BaseImage
from conode.vm.state import blob, items, one_of, uint

log = logging.getLogger(__name__)

CLUSTER = 4096
MAGIC = b"CONODEOV"
FORMAT = 1
HEADER = struct.Struct("<8sIIQ32s32s")  # magic, format, cluster size, disk size, base SHA-256, map SHA-256
MAP_OFFSET = 4096
STATE_CHUNK = 1 << 20  # clusters in a snapshot are compressed 1 MiB at a time
_ZEROES = bytes(STATE_CHUNK)
_MAX_STATE_CHUNKS = (MAX_DISK_BUDGET_MIB << 20) // STATE_CHUNK


Buffer = Union[bytes, bytearray, memoryview]


class DiskIOError(Exception):
    """A request the disk cannot carry out; the guest gets an I/O error for it."""


@dataclass(frozen=True)
class DiskState(state.Record):
    """An overlay as a snapshot holds it: which base it lies on, its map and the clusters the map lists."""

    KIND = "disk"
    VERSION = 1

    base_sha256: str = blob(exact=64)
    base_size: int = uint(63)
    cluster_size: int = one_of(CLUSTER)
    map: bytes = blob()  # zlib-compressed cluster map
    chunks: tuple[bytes, ...] = items(max_len=_MAX_STATE_CHUNKS)  # the listed clusters, in order, compressed


@dataclass(frozen=True)
class DiskDelta(state.Record):
    """An overlay's clusters written since an earlier checkpoint: its whole map, and the clusters *carried*
    lists (a subset of the map's: those the overlay holds and were written since), in order, compressed. One
    that carries every cluster of its map is the whole overlay."""

    KIND = "disk delta"
    VERSION = 1

    base_sha256: str = blob(exact=64)
    base_size: int = uint(63)
    cluster_size: int = one_of(CLUSTER)
    map: bytes = blob()  # zlib-compressed cluster map
    carried: bytes = blob()  # zlib-compressed, one byte per cluster: 1 = its contents are in chunks
    chunks: tuple[bytes, ...] = items(max_len=_MAX_STATE_CHUNKS)


def pack_clusters(parts: Iterator[Buffer]) -> tuple[bytes, ...]:
    """Clusters given in order (whole clusters, joined or not) as chunks of STATE_CHUNK bytes, compressed."""
    chunks: list[bytes] = []
    batch = bytearray()
    for part in parts:
        batch += part
        while len(batch) >= STATE_CHUNK:
            chunks.append(zlib.compress(batch[:STATE_CHUNK], 1))
            del batch[:STATE_CHUNK]
    if batch:
        chunks.append(zlib.compress(batch, 1))
    return tuple(chunks)


def listed_runs(listed: Buffer) -> Iterator[tuple[int, int]]:
    """(start, stop) of each run of clusters *listed* (one byte per cluster: 1 = listed)."""
    data = bytes(listed)
    first = 0
    while (start := data.find(b"\x01", first)) >= 0:
        stop = data.find(b"\x00", start)
        first = stop = len(data) if stop < 0 else stop
        yield start, stop


def unpack_clusters(listed: Buffer, chunks: Sequence[bytes]) -> Iterator[tuple[int, bytes]]:
    """(first cluster, contents of whole clusters from it) of what *chunks* hold, in order along the clusters
    *listed*; SnapshotError unless they hold exactly those. Each chunk inflates to at most STATE_CHUNK bytes."""
    runs = listed_runs(listed)
    start = stop = 0
    for chunk in chunks:
        piece = _inflate(chunk, STATE_CHUNK, "clusters")
        if not piece or len(piece) % CLUSTER:
            raise SnapshotError("the snapshot's disk clusters are damaged (a chunk of partial clusters)")
        offset = 0
        while offset < len(piece):
            if start == stop:
                start, stop = next(runs, (0, 0))
                if start == stop:
                    raise SnapshotError("the snapshot's disk holds more clusters than its map lists")
            count = min(stop - start, (len(piece) - offset) // CLUSTER)
            yield start, piece[offset:offset + count * CLUSTER]
            offset += count * CLUSTER
            start += count
    if start != stop or next(runs, None) is not None:
        raise SnapshotError("the snapshot's disk holds fewer clusters than its map lists")


# --- host file operations: whole transfers, holes --------------------------------------------------------------
def _read_full(fd: int, buffer: memoryview, offset: int) -> None:
    """Fill *buffer* from *fd* at *offset*; what lies past the end of the file reads as zeros."""
    done = 0
    while done < len(buffer):
        got = os.preadv(fd, [buffer[done:]], offset + done)
        if got == 0:
            buffer[done:] = bytes(len(buffer) - done)
            return
        done += got


def _read_extents(extents: list[tuple[int, int, int]], buffer: memoryview) -> None:
    """Fill *buffer* from host file extents (fd, offset, length), in order."""
    at = 0
    for fd, offset, length in extents:
        _read_full(fd, buffer[at:at + length], offset)
        at += length


def _write_all(fd: int, parts: Sequence[Buffer], offset: int) -> None:
    """Write the concatenation of *parts* at *offset* (the disk's hot path: a part per guest page, and the
    host nearly always takes them all in one call)."""
    views: Sequence[Buffer] = parts
    while views:
        wrote = os.pwritev(fd, views, offset)
        offset += wrote
        done = 0
        while done < len(views) and wrote >= len(views[done]):
            wrote -= len(views[done])
            done += 1
        views = list(views[done:])
        if views and wrote:
            views[0] = memoryview(views[0])[wrote:]


def _load_fallocate() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True) if name else None
        fallocate = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
    except OSError:
        return None
    if fallocate is not None:
        fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        fallocate.restype = ctypes.c_int
    return fallocate


_fallocate = _load_fallocate()
_PUNCH_HOLE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """Give the host blocks of [offset, offset+length) back (they read as zeros); False where unsupported."""
    return _fallocate is not None and _fallocate(fd, _PUNCH_HOLE, offset, length) == 0


class CowDisk:
    """*base* seen through a copy-on-write overlay: in the named file *overlay* (reopened if it holds one),
    or in an unnamed temporary file that disappears with the disk. Offsets and lengths are in bytes."""

    def __init__(self, base: BaseImage, overlay: Path | None, budget_bytes: int, read_only: bool = False) -> None:
        self.base = base
        self.size = base.size
        self.read_only = read_only
        self.budget_bytes = budget_bytes
        self._budget_clusters = budget_bytes // CLUSTER
        self.clusters = -(-self.size // CLUSTER)
        self.map = bytearray(self.clusters)
        self._changed = bytearray(self.clusters)  # clusters written since the last take_changes()
        self.allocated = 0  # clusters the overlay holds
        self._data_offset = MAP_OFFSET + -(-self.clusters // CLUSTER) * CLUSTER
        self._map_dirty = False
        self._said: set[str] = set()
        self.path = overlay
        self._file: IO[bytes] | None = None
        if overlay is None:
            self._file = tempfile.TemporaryFile(prefix="conode-overlay-")
            self.fd = self._file.fileno()
            self._base_digest = bytes(32)  # an unnamed overlay is never reopened: no need to hash the base
        else:
            self.fd = self._open_named(overlay)

    # --- the named overlay file --------------------------------------------------------------------------------
    def _open_named(self, path: Path) -> int:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0),
                         0o600)
        except OSError as exc:
            raise DiskImageError(f"cannot open disk overlay {path}: {exc.strerror or exc}") from None
        try:
            if os.fstat(fd).st_size == 0:
                self._base_digest = bytes.fromhex(self.base.sha256())
                self._write_map(fd)
            else:
                self._load_named(fd, path)
        except OSError as exc:
            os.close(fd)
            raise DiskImageError(f"cannot use disk overlay {path}: {exc.strerror or exc}") from None
        except DiskImageError:
            os.close(fd)
            raise
        return fd

    def _load_named(self, fd: int, path: Path) -> None:
        header = os.pread(fd, HEADER.size, 0)
        if len(header) < HEADER.size or header[:8] != MAGIC:
            raise DiskImageError(f"{path} is not a conode disk overlay; give another overlay path")
        _, version, cluster, disk_size, base_digest, map_digest = HEADER.unpack(header)
        if version != FORMAT or cluster != CLUSTER:
            raise DiskImageError(f"disk overlay {path} has format {version} with {cluster}-byte clusters; this "
                                 f"conode reads format {FORMAT} with {CLUSTER}-byte clusters")
        if disk_size != self.size or base_digest.hex() != self.base.sha256():
            raise DiskImageError(f"disk overlay {path} was made on another base image than {self.base.path}; "
                                 f"give its own base image, or another overlay path")
        cluster_map = os.pread(fd, self.clusters, MAP_OFFSET)
        if len(cluster_map) != self.clusters or hashlib.sha256(cluster_map).digest() != map_digest \
                or cluster_map.translate(None, b"\x00\x01"):
            raise DiskImageError(f"disk overlay {path} is damaged (its cluster map does not match its checksum); "
                                 f"delete it to start afresh from the base image")
        self._base_digest = base_digest
        self.map[:] = cluster_map
        self.allocated = self.map.count(1)

    def _write_map(self, fd: int) -> None:
        header = HEADER.pack(MAGIC, FORMAT, CLUSTER, self.size, self._base_digest,
                             hashlib.sha256(self.map).digest())
        _write_all(fd, [header], 0)
        _write_all(fd, [self.map], MAP_OFFSET)

    # --- requests ------------------------------------------------------------------------------------------
    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DiskIOError(f"bytes {offset}+{length} lie outside the {self.size}-byte disk")

    def _runs(self, first: int, end: int) -> Iterator[tuple[int, int, int]]:
        """(start, end, in overlay) for the runs of clusters in [first, end) that lie in one place."""
        cluster_map = self.map
        while first < end:
            present = cluster_map[first]
            following = cluster_map.find(b"\x00" if present else b"\x01", first, end)
            stop = end if following < 0 else following
            yield first, stop, present
            first = stop

    def extents(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(host fd, file offset, length) of the bytes that hold the disk's [offset, offset+length), in order."""
        self._check(offset, length)
        end = offset + length
        out = []
        for first, stop, present in self._runs(offset // CLUSTER, -(-end // CLUSTER)):
            lo, hi = max(offset, first * CLUSTER), min(end, stop * CLUSTER)
            out.append((self.fd, self._data_offset + lo, hi - lo) if present else (self.base.fd, lo, hi - lo))
        return out

    def read(self, offset: int, buffer: memoryview) -> None:
        """Fill *buffer* with the disk's bytes at *offset*."""
        self.read_with(offset, len(buffer), lambda extents: _read_extents(extents, buffer))

    def read_with(self, offset: int, length: int, get: Callable[[list[tuple[int, int, int]]], None]) -> None:
        """Have *get* read the disk's [offset, offset+length) from its :meth:`extents` (an OSError it raises is
        the host's read error)."""
        extents = self.extents(offset, length)
        try:
            get(extents)
        except OSError as exc:
            raise self._host_error("read", exc) from None

    def write(self, offset: int, parts: Sequence[Buffer]) -> None:
        """Write the concatenation of *parts* at *offset*."""
        self.write_with(offset, sum(len(p) for p in parts), lambda fd, at: _write_all(fd, parts, at))

    def write_with(self, offset: int, length: int, put: Callable[[int, int], None]) -> None:
        """Write *length* bytes at *offset*: once the overlay is ready for them, put(fd, file offset) writes
        them into the host file (an OSError it raises is the host's write error)."""
        self._check(offset, length)
        if self.read_only:
            raise DiskIOError("the disk is read-only")
        end = offset + length
        first, stop = offset // CLUSTER, -(-end // CLUSTER)
        if first == stop:
            return
        new = self.map.count(0, first, stop)
        if new and self.allocated + new > self._budget_clusters:
            raise self._said_once("budget", f"the guest's disk budget of {self.budget_bytes / (1 << 20):g} MiB "
                                            f"is used up; its writes beyond it fail with an I/O error")
        try:
            partial = {c for c, cut in ((first, offset % CLUSTER), (stop - 1, end % CLUSTER)) if cut}
            for cluster in sorted(partial):
                if not self.map[cluster]:
                    self._copy_up(cluster)
            put(self.fd, self._data_offset + offset)
        except OSError as exc:
            raise self._host_error("write", exc) from None
        self._changed[first:stop] = b"\x01" * (stop - first)
        if new:
            self.map[first:stop] = b"\x01" * (stop - first)
            self.allocated += new
            self._map_dirty = True

    def _copy_up(self, cluster: int) -> None:
        data = bytearray(CLUSTER)
        _read_full(self.base.fd, memoryview(data), cluster * CLUSTER)
        _write_all(self.fd, [data], self._data_offset + cluster * CLUSTER)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeros (the overlay holds them: the base may not be zero)."""
        self._check(offset, length)
        end = offset + length
        for at in range(offset, end, STATE_CHUNK):
            self.write(at, [_ZEROES[:min(STATE_CHUNK, end - at)]])
        self._punch_whole_clusters(offset, end, give_back=False)

    def discard(self, offset: int, length: int) -> None:
        """The guest no longer needs [offset, offset+length): whole clusters go back to the base image."""
        self._check(offset, length)
        if self.read_only:
            raise DiskIOError("the disk is read-only")
        self._punch_whole_clusters(offset, offset + length, give_back=True)

    def _punch_whole_clusters(self, offset: int, end: int, give_back: bool) -> None:
        first, stop = -(-offset // CLUSTER), end // CLUSTER
        for start, finish, present in list(self._runs(first, stop)) if first < stop else ():
            if not present:
                continue
            if not _punch_hole(self.fd, self._data_offset + start * CLUSTER, (finish - start) * CLUSTER):
                return  # the host file system keeps the blocks: the clusters stay, discard is only a hint
            if give_back:
                self.map[start:finish] = bytes(finish - start)
                self.allocated -= finish - start
                self._map_dirty = True

    def flush(self) -> None:
        """Make every completed write durable on the host. An unnamed overlay has nothing to make durable: it
        ends with its disk, and no crash can leave it behind to reopen (its bytes reach snapshots by reading
        the file, which needs no fsync); so its flushes cost nothing, as QEMU's temporary snapshot overlays'."""
        if self.path is None:
            return
        try:
            os.fsync(self.fd)
            if self.path is not None and self._map_dirty:
                self._write_map(self.fd)
                os.fsync(self.fd)
            self._map_dirty = False
        except OSError as exc:
            raise self._host_error("flush", exc) from None

    def _host_error(self, what: str, exc: OSError) -> DiskIOError:
        return self._said_once(f"host-{what}", f"the host could not {what} the guest's disk: "
                                                f"{exc.strerror or exc}; the guest gets an I/O error")

    def _said_once(self, key: str, message: str) -> DiskIOError:
        if key not in self._said:
            self._said.add(key)
            log.warning("%s", message)
        return DiskIOError(message)

    def close(self) -> None:
        """Close the overlay (a named one keeps its map for the next run). The base stays open: it is shared."""
        if self.fd < 0:
            return
        if self.path is not None and self._map_dirty:
            try:
                self._write_map(self.fd)
            except OSError as exc:
                log.warning("cannot save the cluster map of disk overlay %s: %s", self.path, exc.strerror or exc)
        if self._file is not None:
            self._file.close()
        else:
            os.close(self.fd)
        self.fd = -1

    # --- snapshots -------------------------------------------------------------------------------------------
    def read_clusters(self, listed: Buffer) -> Iterator[bytes]:
        """The contents of the clusters *listed* (one byte per cluster), in order, a run at a time. From any
        thread: a cluster the guest writes meanwhile may read torn, and is then listed by the next
        :meth:`take_changes`."""
        for start, stop in listed_runs(listed):
            for at in range(start * CLUSTER, stop * CLUSTER, STATE_CHUNK):
                piece = bytearray(min(STATE_CHUNK, stop * CLUSTER - at))
                _read_full(self.fd, memoryview(piece), self._data_offset + at)
                yield piece

    def get_state(self) -> dict[str, Any]:
        """The overlay as plain data: the base's digest, the map and the clusters it lists (compressed)."""
        return state.dump(DiskState(self.base.sha256(), self.size, CLUSTER, zlib.compress(self.map, 1),
                                    pack_clusters(self.read_clusters(self.map))))

    def take_changes(self, whole: bool) -> bytes:
        """The clusters the overlay holds that were written since the last call (all it holds, if *whole*), one
        byte each (1: listed); the next call starts from here. Only between the guest's slices: no write is
        then half done."""
        if whole:
            listed = bytes(self.map)
        else:
            both = int.from_bytes(self.map, "little") & int.from_bytes(self._changed, "little")
            listed = both.to_bytes(self.clusters, "little")
        self._changed[:] = bytes(self.clusters)
        return listed

    def set_state(self, data: Any) -> None:
        """Fill this (fresh) overlay from :meth:`get_state` output; raise SnapshotError if it does not fit."""
        saved = state.load(DiskState, data)
        if saved.base_sha256 != self.base.sha256() or saved.base_size != self.size:
            raise SnapshotError(f"the snapshot's disk is an overlay on another base image than {self.base.path} "
                                f"(it needs SHA-256 {saved.base_sha256[:16]}…, the file has "
                                f"{self.base.sha256()[:16]}…); restore it with its own base image")
        cluster_map = inflate_map(saved.map, self.clusters, "cluster map")
        self.map[:] = cluster_map
        self.allocated = self.map.count(1)
        if self.allocated > self._budget_clusters:
            raise SnapshotError(f"the snapshot's disk overlay holds {self.allocated * CLUSTER >> 20} MiB, over "
                                f"the guest's disk budget of {self.budget_bytes >> 20} MiB")
        try:
            for first, contents in unpack_clusters(cluster_map, saved.chunks):
                _write_all(self.fd, [contents], self._data_offset + first * CLUSTER)
        except OSError as exc:
            raise SnapshotError(f"cannot write the restored disk overlay: {exc.strerror or exc}") from None
        self._map_dirty = True


def inflate_map(data: bytes, clusters: int, what: str) -> bytes:
    """A compressed map of one byte per cluster, each 0 or 1; SnapshotError if it is not one of *clusters*."""
    cluster_map = _inflate(data, clusters, what)
    if len(cluster_map) != clusters or cluster_map.translate(None, b"\x00\x01"):
        raise SnapshotError(f"the snapshot's disk {what} is damaged")
    return cluster_map


def _inflate(data: bytes, limit: int, what: str) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, limit)
    except zlib.error:
        raise SnapshotError(f"the snapshot's disk {what} is damaged") from None
    if inflater.unconsumed_tail or not inflater.eof:
        raise SnapshotError(f"the snapshot's disk {what} is damaged or too large")
    return out
