"""A guest worker's checkpoints of its running job: what lets the job go on elsewhere if this workstation dies.

Every ``interval_s`` the checkpointer saves the guest as a piece (conode/vm/checkpoint.py), in three steps, so
that the guest stops only for the last few pages:

1. *pre-copy*, while the guest runs: take the dirty-page log (conode/vm/cpu/dirty.py) and copy the pages it lists
   (every page for the first piece, after a restore, or when the coordinator lost the chain); again, up to
   PRE_COPY_ROUNDS times, while the guest changed more than FINAL_PAGES meanwhile; then take the disk overlay's
   log of written clusters (between two slices) and copy those clusters (all of them for a full piece);
2. *final copy*, the guest paused by the worker between two slices: take both logs again, copy the pages and
   disk clusters changed during step 1, the device state and the job's output offsets. This pause is the
   checkpoint's stall;
3. *write*, the guest running again: compress the pages into a piece file and tell the agent, which sends it on.

The final copy runs on the worker's machine thread (:meth:`Checkpointer.final`, called by the worker when
:attr:`final_due`); everything else on the checkpointer's own thread.

A gang's rank is checkpointed only when its gang takes a cut (coordinator/gang_cuts.py; ``interval_s`` 0):
:meth:`cut` starts a piece at once; after the pre-copy it says ``cut_ready`` and waits, the guest running, for
:meth:`final_now` (every rank's pre-copy is done, so that none stands still while another pre-copies all its
RAM); after the final copy the worker keeps the guest still (:meth:`held`) until every rank's piece is taken. A
cut's piece that fails at any step is said at once (``cut_failed``), so that the cut is discarded then.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from conode.errors import ConodeError
from conode.vm.checkpoint import FULL, STREAMS, encode_pages, page_runs, write_piece
from conode.vm.cpu.dirty import dirty_tracker
from conode.vm.disk.delta import Changes, merge_changes
from conode.vm.disk.overlay import pack_clusters
from conode.vm.guest import Guest, GuestSnapshot
from conode.vm.layout import PAGE_SIZE

log = logging.getLogger(__name__)
T = TypeVar("T")

PRE_COPY_ROUNDS = 4
FINAL_PAGES = 256  # pages changed during a pre-copy round few enough for the final copy (1 MiB: a few ms)


class _Stopped(Exception):
    """The job ended (or the worker stops) while a checkpoint was being taken."""


class Checkpointer:
    """Periodic incremental checkpoints of one job's guest."""

    def __init__(self, guest: Guest, job: int, interval_s: float, directory: Path, seq: int,
                 outputs: dict[str, int], send: Callable[[dict[str, Any]], None]) -> None:
        self.guest = guest
        self.job = job
        self.interval_s = interval_s
        self.directory = directory
        self.seq = seq  # the next piece's number
        self.outputs = {s: int(outputs.get(s, 0)) for s in STREAMS}  # bytes written so far; the worker counts
        self.final_due = False
        self._send = send
        self._wake = threading.Event()  # a cut asked for a piece now
        self._cut_asked: tuple[int, float] | None = None  # (cut, hold_s) for the next piece
        self._cut: tuple[int, float] | None = None  # ... for the piece being taken
        self._final_go = threading.Event()  # the cut's final copies may begin
        self._hold: tuple[int, int, float] | None = None  # (cut, seq, hold_s): the guest must stay still
        self._tracker = dirty_tracker(guest.machine.cpu)
        self._tracking = False
        self._full = True  # the next piece holds every page
        self._base = FULL
        self._pre: tuple[bytearray, dict[int, bytes]] | None = None
        self._whole = True  # the piece being taken is a full one
        self._disk_pre: Changes | None = None  # the disk clusters copied in the pre-copy
        # the final copy: pages, device state, disk (map, clusters listed, their contents), outputs, stall figures
        self._taken: tuple[bytearray, dict[int, bytes], GuestSnapshot, tuple[bytes, bytes, list[bytes]] | None,
                           dict[str, int], float, float] | None = None
        self._final_done = threading.Event()
        self._stop = threading.Event()
        self._stopped_at: tuple[float, float] | None = None  # monotonic and machine-thread CPU time
        self._thread = threading.Thread(target=self._loop, name=f"checkpoint-{job}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """The job ended: take no more pieces (one being written is dropped)."""
        self._stop.set()
        self._final_done.set()
        self._wake.set()
        self._final_go.set()

    def cut(self, cut: int, hold_s: float) -> None:
        """The gang takes cut *cut*: take a piece now, and keep the guest still after its final copy (for at most
        *hold_s*)."""
        self._cut_asked = (cut, hold_s)
        self._wake.set()

    def final_now(self, cut: int) -> None:
        """Every rank's piece of cut *cut* is pre-copied: the final copy may begin."""
        if self._cut is not None and self._cut[0] == cut:
            self._final_go.set()

    def held(self) -> tuple[int, int, float] | None:
        """After a final copy (on the machine thread): (cut, piece number, hold_s) if the piece was a cut's, and
        the guest must stay still until the cut resumes; once."""
        hold, self._hold = self._hold, None
        return hold

    def reset(self) -> None:
        """The coordinator lost the chain: the next piece holds every page."""
        self._full = True

    def carried_over(self) -> dict[str, Any]:
        """What the guest's checkpoints go on from once it is resumed from a vacate (in a new worker, whose first
        piece is a full one): the interval, the next piece's number and the output offsets. The number skips one:
        a piece being sent as the guest was saved may still be kept under the current one."""
        return {"interval_s": self.interval_s, "seq": self.seq + 1, **self.outputs}

    def guest_stopped(self) -> None:
        """The worker's machine thread saw the guest stop (the stall starts here when the final copy is due)."""
        self._stopped_at = (time.monotonic(), time.thread_time())

    # --- the checkpointer's thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval_s if self.interval_s > 0 else None)  # 0: only when a cut asks
            self._wake.clear()
            if self._stop.is_set():
                return
            self._final_go.clear()
            self._cut, self._cut_asked = self._cut_asked, None
            try:
                self._checkpoint()
            except _Stopped:
                return
            except (ConodeError, OSError) as exc:
                log.warning("job %d: checkpoint %d not taken: %s", self.job, self.seq, exc)
                self._full = True
                if self._cut is not None:  # its gang's cut can be no set: said now, not left to time out
                    self._send({"type": "cut_failed", "job": self.job, "cut": self._cut[0],
                                "reason": f"piece {self.seq} not taken: {exc}"[:200]})

    def _on_machine_thread(self, fn: Callable[[], T], always: bool = False) -> T:
        """*fn*'s result, computed between two of the guest's slices (or here, if the tracker allows and not
        *always*)."""
        if not self._tracker.needs_machine_thread and not always:
            return fn()
        done = threading.Event()
        outcome: list[tuple[bool, Any]] = []

        def call() -> None:
            try:
                outcome.append((True, fn()))
            except Exception as exc:  # noqa: BLE001  (any failure is handed back to the checkpointer's thread)
                outcome.append((False, exc))
            finally:
                done.set()

        self.guest.machine.call_soon(call)
        while not done.wait(0.5):
            if self._stop.is_set():
                raise _Stopped
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    def _read(self, bitmap: bytearray) -> dict[int, bytes]:
        pages: dict[int, bytes] = {}
        for first, count in page_runs(bitmap):
            data = self._tracker.read(first, count)
            for index in range(count):
                pages[first + index] = data[index * PAGE_SIZE:(index + 1) * PAGE_SIZE]
        return pages

    def _checkpoint(self) -> None:
        started = time.monotonic()
        if not self._tracking:
            self._on_machine_thread(self._tracker.start)
            self._tracking = True
        bitmap = self._on_machine_thread(self._tracker.take)
        self._whole, self._full = self._full, False  # a reset from here on is for the next piece
        if self._whole:
            pages = self._tracker.pages
            bitmap = bytearray(((1 << pages) - 1).to_bytes((pages + 7) // 8, "little"))
        copied = self._read(bitmap)
        for _ in range(PRE_COPY_ROUNDS - 1):
            more = self._on_machine_thread(self._tracker.take)
            copied.update(self._read(more))  # listed by a take: read now, or lost to the next round
            bitmap = bytearray(a | b for a, b in zip(bitmap, more))
            if int.from_bytes(more, "little").bit_count() <= FINAL_PAGES:
                break
        self._pre = (bitmap, copied)
        overlay = self.guest.machine.disk
        if overlay is not None:
            listed = self._on_machine_thread(lambda: overlay.take_changes(self._whole), always=True)
            # its map is a stand-in: the piece carries what the final copy's map keeps of these clusters
            self._disk_pre = Changes(overlay.base.sha256(), overlay.size, listed, listed,
                                     pack_clusters(overlay.read_clusters(listed)))
        if self._cut is not None:  # a gang's cut: the final copies begin together
            self._send({"type": "cut_ready", "job": self.job, "cut": self._cut[0]})
            if not self._final_go.wait(self._cut[1]) or self._stop.is_set():
                if self._stop.is_set():
                    raise _Stopped
                raise ConodeError(f"no word on cut {self._cut[0]} within {self._cut[1]:g} s after the pre-copy")
        self._final_done.clear()
        self.final_due = True
        self.guest.machine.pause()
        while not self._final_done.wait(1.0):  # a pause asked while the guest was not running is lost: ask again
            self.guest.machine.pause()
        if self._stop.is_set():
            raise _Stopped
        if self._taken is None:
            raise ConodeError("the final copy failed")
        final_bitmap, final_pages, envelope, disk_final, outputs, stall_s, stall_cpu_s = self._taken
        self._taken = None
        disk = None
        if self._disk_pre is not None and disk_final is not None:
            cluster_map, listed, contents = disk_final
            pre, self._disk_pre = self._disk_pre, None
            disk = merge_changes([pre, Changes(pre.base_sha256, pre.base_size, cluster_map, listed,
                                               pack_clusters(iter(contents)))])
        pre_bitmap, pre_pages = self._pre
        self._pre = None
        union = bytearray(a | b for a, b in zip(pre_bitmap, final_bitmap))
        order = [page for first, count in page_runs(union) for page in range(first, first + count)]
        ram = encode_pages((final_pages.get(page) or pre_pages[page] for page in order), bytes(union),
                           self.guest.machine.ram.size)
        path = self.directory / f"job-{self.job}-{self.seq}.ckpt"
        base = FULL if self._whole else self._base  # a full piece starts a new chain, whatever came before
        size = write_piece(path, self.job, self.seq, base, outputs, ram, envelope, disk)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if self._stop.is_set():
            path.unlink(missing_ok=True)
            raise _Stopped
        self._send({"type": "checkpoint", "job": self.job, "seq": self.seq, "base": base, "path": str(path),
                    "size": size, "sha256": digest, "pages": len(order), "final_pages": len(final_pages),
                    "stall_s": stall_s, "stall_cpu_s": stall_cpu_s, "took_s": time.monotonic() - started})
        self._base = self.seq
        self.seq += 1

    # --- the machine thread ----------------------------------------------------------------------------------
    def final(self) -> None:
        """The final copy (the guest is stopped between slices): the pages changed since the pre-copy, the disk
        clusters written since the piece before, the device state and the output offsets; the guest runs again
        as soon as this returns."""
        self.final_due = False
        try:
            bitmap = self._tracker.take()
            pages = self._read(bitmap)
            envelope = self.guest.snapshot(with_ram=False, with_disk=False)
            disk = self._disk_final()
            wall, cpu = self._stopped_at if self._stopped_at is not None else (time.monotonic(), time.thread_time())
            self._taken = (bitmap, pages, envelope, disk, dict(self.outputs), time.monotonic() - wall,
                           time.thread_time() - cpu)
            if self._cut is not None:
                self._hold = (self._cut[0], self.seq, self._cut[1])
        except ConodeError as exc:
            log.warning("job %d: the final copy of checkpoint %d failed: %s", self.job, self.seq, exc)
            self._taken = None
            self._full = True
        finally:
            self._final_done.set()

    def _disk_final(self) -> tuple[bytes, bytes, list[bytes]] | None:
        """The disk's map, and the clusters written since the pre-copy took its list and their contents (to be
        compressed after the stall)."""
        disk = self.guest.machine.disk
        if disk is None:
            return None
        listed = disk.take_changes(False)
        return bytes(disk.map), listed, list(disk.read_clusters(listed))

    def close(self) -> None:
        """Stop and release the dirty tracking (on the machine thread, the guest stopped)."""
        self.stop()
        if self._tracking:
            self._tracker.stop()
            self._tracking = False
