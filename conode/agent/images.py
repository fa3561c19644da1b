"""The agent's copy of the pool's disk images: fetched on demand, verified, cached on disk under a budget.

When a job on an image is placed here, the agent needs the image's file: if the cache holds it (and the file is
the one that was verified: same inode, size and modification time), the job starts at once; otherwise a fetcher
thread gets the chunks the file lacks from the coordinator and the job waits. The fetch is

- **on its own connection**: a DEALER of its own (its own TCP connection, the agent's own CURVE key), driven by
  its own thread. Chunks never queue in front of a heartbeat on the control connection, and the agent's loop
  (the owner's yield) never waits for a chunk. At most IMAGE_FETCH_WINDOW chunks are asked for at once, so the
  coordinator's loop serves one agent a few MiB at a time, between everything else it does;
- **verified**: each chunk is checked against its digest before it is written, and the whole file against the
  image's SHA-256 before it is used. A chunk that arrives damaged is discarded and asked for again (at most
  IMAGE_FETCH_TRIES times);
- **resumable**: chunks are written at their place in ``<sha256>.part``; a fetch that was cut (the agent
  stopped, the coordinator went away) starts by checking what the file already holds and asks only for the rest.
  A cached file whose identity changed since it was verified (something wrote to it) goes through the same
  check: its damaged chunks are fetched again, the rest kept.

The budget (``image_cache_mib``) bounds the images kept: before a fetch, the least recently used images that no
guest uses (running, waiting, vacated) are removed to make room; an image larger than the whole budget is refused
with both sizes, and the coordinator, told the budget in the hello, places such jobs elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import zmq

from conode.cluster import protocol
from conode.cluster.chunks import chunk_digest, chunk_span
from conode.cluster.keys import KeyPair
from conode.cluster.protocol import ProtocolError
from conode.cluster.transport import ClientSocket
from conode.atomic_file import write_atomically
from conode.errors import ConodeError
from conode.limits import IMAGE_CHUNK_BYTES, IMAGE_FETCH_TRIES, IMAGE_FETCH_WINDOW

log = logging.getLogger("conode.agent")

REPLY_TIMEOUT_S = 10.0  # no chunk for this long: the connection is rebuilt and what was asked is asked again
GIVE_UP_S = 60.0  # no chunk for this long (or no connection): the fetch fails, and its jobs run elsewhere


class ImageRefused(ConodeError):
    """An image this agent cannot hold or get."""


@dataclass(frozen=True)
class ImageSpec:
    """An image a job runs on, as run_job describes it."""

    name: str
    sha256: str
    size: int
    chunks: tuple[bytes, ...]

    @classmethod
    def of(cls, wire: dict[str, Any]) -> "ImageSpec":
        return cls(wire["name"], wire["sha256"], wire["size"], tuple(wire["chunks"]))

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "size": self.size, "chunks": [c.hex() for c in self.chunks]}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "ImageSpec":
        return cls(str(record["name"]), str(record["sha256"]), int(record["size"]),
                   tuple(bytes.fromhex(c) for c in record["chunks"]))

    @property
    def shown(self) -> str:
        return f"image {self.name} (sha256 {self.sha256[:16]}, {self.size / (1 << 20):.1f} MiB)"


class ChunkSource(Protocol):
    """Where chunks come from: the coordinator over the fetch socket, or a test's stand-in."""

    def ask(self, digest: bytes) -> bool:
        """Ask for one chunk; False if it cannot be asked now (not connected)."""

    def answers(self, timeout_s: float) -> list[tuple[bytes, bytes | None, str | None]]:
        """(digest, data or None, problem or None) for the answers that arrived within *timeout_s*."""

    def restart(self) -> None:
        """Rebuild the connection (the answers to what was asked before may never come)."""

    def close(self) -> None: ...


class CoordinatorChunks:
    """The fetch socket: a DEALER of its own to the coordinator, used only by the fetcher thread."""

    def __init__(self, context: zmq.Context, endpoint: str, server_key: str, keys: KeyPair) -> None:
        self._client = ClientSocket(context, endpoint, server_key, keys, send_hwm=IMAGE_FETCH_WINDOW * 2)

    def ask(self, digest: bytes) -> bool:
        return self._client.send(protocol.encode("image_chunk_get", digest=digest))

    def answers(self, timeout_s: float) -> list[tuple[bytes, bytes | None, str | None]]:
        socket = self._client.socket
        found = []
        if socket.poll(int(timeout_s * 1000), zmq.POLLIN):
            while True:
                try:
                    message = protocol.decode(socket.recv(flags=zmq.NOBLOCK))
                except zmq.Again:
                    break
                except ProtocolError as exc:
                    log.warning("malformed message on the image fetch socket: %s", exc)
                    continue
                if message["type"] == "image_chunk":
                    found.append((message["digest"], message.get("data"), message.get("problem")))
                elif message["type"] == "error":
                    log.warning("the coordinator refused a chunk request: %s", message["message"])
        return found

    def restart(self) -> None:
        self._client.reconnect()

    def close(self) -> None:
        self._client.close()


def _identity(path: Path) -> list[int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return [info.st_ino, info.st_size, info.st_mtime_ns]


class ImageCache:
    """Image files under one directory: ``<sha256>.img`` (whole, verified, read-only), ``<sha256>.part`` (being
    fetched) and ``<sha256>.json`` (what the image is, when it was last used, the verified file's identity)."""

    def __init__(self, root: Path, budget_bytes: int, clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self.budget_bytes = budget_bytes
        self._clock = clock
        self._lock = threading.Lock()  # records are written by the fetcher thread and read by the agent's loop

    # --- files and records ---------------------------------------------------------------------------------
    def path(self, sha256: str) -> Path:
        return self.root / f"{sha256}.img"

    def part(self, sha256: str) -> Path:
        return self.root / f"{sha256}.part"

    def _record_path(self, sha256: str) -> Path:
        return self.root / f"{sha256}.json"

    def record(self, sha256: str) -> dict[str, Any] | None:
        with self._lock:
            try:
                record = json.loads(self._record_path(sha256).read_text())
                return record if isinstance(record, dict) and record.get("sha256") == sha256 else None
            except (OSError, ValueError):
                return None

    def _write_record(self, record: dict[str, Any]) -> None:
        with self._lock:
            self.root.mkdir(parents=True, exist_ok=True)
            write_atomically(self._record_path(record["sha256"]), json.dumps(record).encode())

    def spec(self, sha256: str) -> ImageSpec | None:
        """What the cache knows of an image (enough to fetch it again), even when its file is gone."""
        record = self.record(sha256)
        try:
            return ImageSpec.from_record(record) if record is not None else None
        except (KeyError, ValueError, TypeError):
            return None

    def ready(self, sha256: str) -> bool:
        """Whether the image's file is here and is the file that was verified."""
        record = self.record(sha256)
        return record is not None and record.get("verified") is not None and \
            record["verified"] == _identity(self.path(sha256))

    def touch(self, spec: ImageSpec) -> None:
        record = self.record(spec.sha256) or {}
        self._write_record({**record, **spec.record(), "used_at": self._clock()})

    def mark_verified(self, spec: ImageSpec) -> None:
        record = self.record(spec.sha256) or spec.record()
        self._write_record({**record, "verified": _identity(self.path(spec.sha256)), "used_at": self._clock()})

    # --- the budget ------------------------------------------------------------------------------------------
    def held(self) -> dict[str, int]:
        """The images on disk (whole or partial) and the bytes each may take."""
        sizes: dict[str, int] = {}
        if not self.root.is_dir():
            return sizes
        for path in self.root.iterdir():
            if path.suffix in (".img", ".part"):
                record = self.record(path.stem)
                sizes[path.stem] = int(record["size"]) if record else path.stat().st_size
        return sizes

    def make_room(self, spec: ImageSpec, in_use: set[str]) -> None:
        """Remove the least recently used images no guest uses until *spec* fits the budget; raise
        ImageRefused (with the sizes) if it cannot fit."""
        if spec.size > self.budget_bytes:
            raise ImageRefused(f"{spec.shown} is larger than this agent's image cache of "
                               f"{self.budget_bytes / (1 << 20):.0f} MiB (image_cache_mib)")
        held = self.held()
        held.pop(spec.sha256, None)
        used = sum(held.values())
        victims = sorted((sha for sha in held if sha not in in_use),
                         key=lambda sha: (self.record(sha) or {}).get("used_at", 0.0))
        while used + spec.size > self.budget_bytes and victims:
            victim = victims.pop(0)
            used -= held[victim]
            self.remove(victim)
            log.info("image cache: removed image %s (least recently used) to make room for %s", victim[:16],
                     spec.shown)
        if used + spec.size > self.budget_bytes:
            raise ImageRefused(f"{spec.shown} does not fit this agent's image cache of "
                               f"{self.budget_bytes / (1 << 20):.0f} MiB beside the {used / (1 << 20):.0f} MiB "
                               f"of images its guests use")

    def remove(self, sha256: str) -> None:
        for path in (self.path(sha256), self.part(sha256), self._record_path(sha256)):
            path.unlink(missing_ok=True)

    # --- fetching (on the fetcher thread) ----------------------------------------------------------------------
    def fetch(self, spec: ImageSpec, source: ChunkSource, stop: threading.Event | None = None) -> int:
        """Bring the image's file here from *source*, checking what is already here first; return the number of
        chunks fetched. Raises ImageRefused if it cannot be had."""
        path, part = self.path(spec.sha256), self.part(spec.sha256)
        self.touch(spec)
        if path.exists() and not part.exists():
            os.chmod(path, 0o644)
            os.replace(path, part)  # the file changed since it was verified: check it, keep what is right
        fresh = not part.exists()
        try:
            fd = os.open(part, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o644)
        except OSError as exc:
            raise ImageRefused(f"cannot write {spec.shown} to {part}: {exc.strerror or exc}") from None
        try:
            os.ftruncate(fd, spec.size)
            wanted: dict[bytes, list[int]] = {}
            for index, digest in enumerate(spec.chunks):
                offset, length = chunk_span(index, spec.size)
                if fresh or chunk_digest(os.pread(fd, length, offset)) != digest:
                    wanted.setdefault(digest, []).append(index)
            _Fetch(fd, spec, wanted, source, stop).run()
            os.fsync(fd)
            self._check_whole(fd, spec)
        except OSError as exc:
            raise ImageRefused(f"cannot write {spec.shown} to {part}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
        os.chmod(part, 0o444)  # a base image is never written; a stray write must at least be deliberate
        os.replace(part, path)
        self.mark_verified(spec)
        return sum(len(indexes) for indexes in wanted.values())

    @staticmethod
    def _check_whole(fd: int, spec: ImageSpec) -> None:
        whole = hashlib.sha256()
        offset = 0
        while chunk := os.pread(fd, IMAGE_CHUNK_BYTES, offset):
            whole.update(chunk)
            offset += len(chunk)
        if whole.hexdigest() != spec.sha256:
            raise ImageRefused(f"the chunks of {spec.shown} do not make the file its SHA-256 names; add the image "
                               f"to the pool again")


class _Fetch:
    """One fetch: at most IMAGE_FETCH_WINDOW chunks asked for at a time, each checked before it is written."""

    def __init__(self, fd: int, spec: ImageSpec, wanted: dict[bytes, list[int]], source: ChunkSource,
                 stop: threading.Event | None) -> None:
        self.fd, self.spec, self.wanted, self.source, self.stop = fd, spec, wanted, source, stop
        self.todo = deque(wanted)
        self.asked: set[bytes] = set()
        self.tries: dict[bytes, int] = {}

    def run(self) -> None:
        heard = time.monotonic()
        while self.todo or self.asked:
            if self.stop is not None and self.stop.is_set():
                raise ImageRefused(f"the fetch of {self.spec.shown} was stopped")
            while self.todo and len(self.asked) < IMAGE_FETCH_WINDOW:
                if not self.source.ask(self.todo[0]):
                    break  # not connected (yet)
                self.asked.add(self.todo.popleft())
            answers = self.source.answers(REPLY_TIMEOUT_S if self.asked else 0.1)
            if answers:
                heard = time.monotonic()
            elif time.monotonic() - heard > GIVE_UP_S:
                raise ImageRefused(f"the coordinator sent no chunk of {self.spec.shown} for {GIVE_UP_S:.0f} s")
            elif self.asked:  # nothing for REPLY_TIMEOUT_S: perhaps the connection broke; ask on a new one
                self.source.restart()
                self.todo.extendleft(self.asked)
                self.asked.clear()
            for digest, data, problem in answers:
                self._take(digest, data, problem)

    def _take(self, digest: bytes, data: bytes | None, problem: str | None) -> None:
        if digest not in self.asked:
            return  # an answer to a question asked on a connection since rebuilt
        self.asked.discard(digest)
        if problem is not None or data is None:
            raise ImageRefused(f"the coordinator cannot send {self.spec.shown}: {problem or 'no data'}")
        if chunk_digest(data) != digest:
            tries = self.tries[digest] = self.tries.get(digest, 0) + 1
            log.warning("chunk %s of %s arrived damaged (%d of %d tries); asking again", digest.hex()[:16],
                        self.spec.shown, tries, IMAGE_FETCH_TRIES)
            if tries >= IMAGE_FETCH_TRIES:
                raise ImageRefused(f"chunk {digest.hex()[:16]} of {self.spec.shown} arrived damaged "
                                   f"{tries} times")
            self.todo.append(digest)
            return
        for index in self.wanted[digest]:
            offset, length = chunk_span(index, self.spec.size)
            if len(data) != length:
                raise ImageRefused(f"chunk {index} of {self.spec.shown} has {len(data)} bytes, not {length}")
            view = memoryview(data)
            while view:
                view = view[os.pwrite(self.fd, view, offset + len(data) - len(view)):]


class ImageFetcher:
    """The fetcher thread: fetches the images asked for, one at a time, and says when each is ready or why not."""

    def __init__(self, cache: ImageCache, make_source: Callable[[], ChunkSource],
                 signal: Callable[[], Callable[[], Any]]) -> None:
        """*signal* makes the fetcher thread's end of the agent's wake-up (wake.Waker.signal)."""
        self.cache = cache
        self._make_source = make_source
        self._signal = signal
        self._queue: queue.Queue[ImageSpec | None] = queue.Queue()
        self._results: queue.Queue[tuple[str, str | None]] = queue.Queue()
        self._pending: set[str] = set()  # asked for and not yet reported (read and written on the agent's loop)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def want(self, spec: ImageSpec) -> None:
        if spec.sha256 in self._pending:
            return
        self._pending.add(spec.sha256)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="image-fetcher", daemon=True)
            self._thread.start()
        self._queue.put(spec)

    @property
    def pending(self) -> set[str]:
        return set(self._pending)

    def results(self) -> list[tuple[str, str | None]]:
        """(sha256, problem or None) of the fetches that ended since the last call."""
        done: list[tuple[str, str | None]] = []
        while True:
            try:
                sha, problem = self._results.get_nowait()
            except queue.Empty:
                return done
            self._pending.discard(sha)
            done.append((sha, problem))

    def _run(self) -> None:
        source: ChunkSource | None = None
        wake = self._signal()
        try:
            while (spec := self._queue.get()) is not None:
                started = time.monotonic()
                try:
                    if source is None:
                        source = self._make_source()
                    fetched = self.cache.fetch(spec, source, self._stop)
                    took = time.monotonic() - started
                    log.info("fetched %s: %d chunks in %.1f s", spec.shown, fetched, took)
                    problem = None
                except ImageRefused as exc:
                    problem = str(exc)
                    log.warning("%s", problem)
                except Exception as exc:  # a fetch must never take the agent down
                    problem = f"fetching {spec.shown} failed: {type(exc).__name__}: {exc}"
                    log.exception("image fetch failed")
                self._results.put((spec.sha256, problem))
                wake()
        finally:
            if source is not None:
                source.close()
            close = getattr(wake, "close", None)
            if close is not None:
                close()

    def close(self) -> None:
        self._stop.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=REPLY_TIMEOUT_S + 1)
