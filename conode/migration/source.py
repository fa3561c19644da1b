"""The sending side of a pre-copy migration.

RAM goes over while the guest keeps running, in rounds: the first round sends every page, each later one the pages
the guest changed meanwhile (:mod:`conode.vm.cpu.dirty`). After each round the source estimates the downtime the
final copy would cost — the pages left over the link rate measured so far — and stops when it is within the
policy's limit, or when the rounds run out. A guest that dirties memory faster than the link carries it is slowed
down (its CPU share halves each round that makes no progress), as QEMU's auto-converge does. Then the guest is
paused, the last pages, the device state (the Guest snapshot envelope without RAM) and a digest of the final RAM
(:class:`Policy`) go over, and the guest changes hands only when the destination has built it and checked
everything: until the source sends GO, any failure leaves the guest running here as if nothing happened.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from conode.errors import ConodeError
from conode.migration.running import RunningGuest
from conode.migration.stream import (CLOCK, DIGEST, FIRST_PAGE, GO, HELLO, MAX_ROUNDS, PAGES, READY, RESUMED, ROUND,
                                     ROUND_NUMBER, RUN_PAGES, STATE, VERIFIED, ZERO_RUN, ZEROS, ByteStream,
                                     FrameStream, Hello, MigrationError, MigrationRefused, Throttled,
                                     pack_digest, pack_hello, pack_map, ram_digest)
from conode.vm.cpu.dirty import DirtyTracker, dirty_tracker, pages_of
from conode.vm.layout import PAGE_SIZE

log = logging.getLogger(__name__)

ZERO_PAGE = bytes(PAGE_SIZE)
ZERO_RUN_BYTES = bytes(RUN_PAGES * PAGE_SIZE)
MIN_CPU_CAP = 0.05  # auto-converge never slows the guest below this share of a core


@dataclass(frozen=True)
class Policy:
    """When to stop copying while the guest runs."""

    max_downtime_s: float = 0.1  # stop once the final copy is estimated to take at most this long
    max_rounds: int = 30  # ... or after this many rounds, whatever is left
    auto_converge: bool = True  # slow down a guest whose rounds do not shrink
    progress: float = 0.8  # a round that leaves more than this share of the previous one's pages made no progress
    # The final RAM's digest while the guest is down: all RAM (one pass: tens of ms per 128 MiB), or only the
    # pages the last round sent, with all RAM checked after the hand-over (the guest's job then fails on a
    # mismatch rather than go on with wrong memory). Either way the dirty tracking is checked end to end.
    full_digest: bool = False
    max_bytes_per_s: float = 0.0  # what the stream may carry (0: as fast as it goes), as QEMU's max-bandwidth


@dataclass
class Report:
    """What a migration cost."""

    tracker: str
    rounds: int = 0  # rounds while the guest ran (the final copy not counted)
    pages_sent: int = 0  # non-zero pages sent, all rounds
    zero_pages: int = 0  # pages sent as "zero", all rounds
    final_pages: int = 0  # pages sent while the guest was paused
    bytes_sent: int = 0  # on the stream, all frames
    state_bytes: int = 0  # the device state
    link_bytes_per_s: float = 0.0  # as measured during the rounds
    cpu_cap: float = 1.0  # the guest's CPU share when it was paused (below 1: auto-converge slowed it)
    total_s: float = 0.0  # from the start to GO
    paused_s: float = 0.0  # from the guest's last instruction here to GO
    # The stop-and-copy phase, each from the guest's last instruction here: the last pages, the device state and
    # their digest sent; the destination's READY (it holds the guest, built and checked); the hand-over done
    # (before_go returned).
    sent_s: float = 0.0
    ready_s: float = 0.0
    handed_s: float = 0.0
    downtime_s: float | None = None  # from its last instruction here to its first there (None: not heard)
    verified: bool | None = None  # all RAM checked on the other side (None: not heard)


def runs(bitmap: bytearray, limit: int) -> Iterator[tuple[int, int]]:
    """(first page, count) of each run of consecutive set bits, cut at *limit* pages."""
    first = last = -1
    for page in pages_of(bitmap):
        if first >= 0 and page == last + 1 and page - first < limit:
            last = page
            continue
        if first >= 0:
            yield first, last - first + 1
        first = last = page
    if first >= 0:
        yield first, last - first + 1


def send_pages(frames: FrameStream, tracker: DirtyTracker, bitmap: bytearray, report: Report) -> int:
    """Send the pages set in *bitmap*: non-zero ones as PAGES, zero ones as ZEROS. Returns the pages sent."""
    count = 0
    for first, length in runs(bitmap, RUN_PAGES):
        data = tracker.read(first, length)
        count += length
        if data == (ZERO_RUN_BYTES if len(data) == len(ZERO_RUN_BYTES) else bytes(len(data))):
            frames.send(ZEROS, ZERO_RUN.pack(first, length))
            report.zero_pages += length
            continue
        start, zero = 0, data[:PAGE_SIZE] == ZERO_PAGE  # split into runs of zero and non-zero pages
        for index in range(1, length + 1):
            is_zero = index < length and data[index * PAGE_SIZE:(index + 1) * PAGE_SIZE] == ZERO_PAGE
            if index < length and is_zero == zero:
                continue
            if zero:
                frames.send(ZEROS, ZERO_RUN.pack(first + start, index - start))
                report.zero_pages += index - start
            else:
                frames.send(PAGES, FIRST_PAGE.pack(first + start) + data[start * PAGE_SIZE:index * PAGE_SIZE])
                report.pages_sent += index - start
            start, zero = index, is_zero
    return count


def _union(a: bytearray, b: bytearray) -> bytearray:
    return bytearray((int.from_bytes(a, "little") | int.from_bytes(b, "little")).to_bytes(len(a), "little"))


def _popcount(bitmap: bytearray) -> int:
    return int.from_bytes(bitmap, "little").bit_count()


def migrate_out(running: RunningGuest, stream: ByteStream, policy: Policy = Policy(),
                peer: str = "the destination", before_go: Callable[[], None] | None = None,
                urgent: Callable[[], AbstractContextManager[object]] = nullcontext) -> Report:
    """Move the guest of *running* over *stream*; return the figures once the destination has it. Raise
    MigrationError, with the guest as before (running, or paused if it was), if the move fails before it changes
    hands. A paused guest moves in one copy (stop and copy: it is down anyway). *before_go* is called once the
    destination is ready, the guest paused: it may refuse the hand-over by raising MigrationError (someone else
    decides who owns the guest); once it returns, the guest is the destination's, whatever happens next. After
    a successful move the guest here is paused and must never run again. The stop-and-copy phase (the guest
    paused until GO is sent) runs inside *urgent* (conode.agent.platform.urgent raises the thread's priority)."""
    guest = running.guest
    machine = guest.machine
    live = running.running
    if policy.max_bytes_per_s > 0:
        stream = Throttled(stream, policy.max_bytes_per_s)
    frames = FrameStream(stream, peer)
    tracker = dirty_tracker(machine.cpu)
    report = Report(tracker.name)

    def set_cap(cap: float) -> None:
        machine.cpu_cap = cap

    def take() -> bytearray:
        return running.on_machine_thread(tracker.take) if tracker.needs_machine_thread else tracker.take()

    original_cap = machine.cpu_cap
    max_rounds = min(policy.max_rounds, MAX_ROUNDS - 1)  # what a destination accepts, the final round included
    started = time.monotonic()
    paused = committed = whole = False
    running.on_machine_thread(tracker.start)
    try:
        frames.send_preamble()
        frames.send(HELLO, pack_hello(Hello(guest.guest_id, machine.ram.size)))
        pending = take()
        previous: int | None = None
        send_time = 0.0
        while live:
            count = _popcount(pending)
            rate = report.link_bytes_per_s
            estimate = count * PAGE_SIZE / rate if rate else math.inf
            if report.rounds and (estimate <= policy.max_downtime_s or report.rounds >= max_rounds):
                break
            if not running.running:
                raise MigrationError("the guest stopped (its job ended) before it could move")
            before, at = frames.sent, time.monotonic()
            send_pages(frames, tracker, pending, report)
            report.rounds += 1
            frames.send(ROUND, ROUND_NUMBER.pack(report.rounds))
            send_time += time.monotonic() - at
            report.link_bytes_per_s = frames.sent / send_time if send_time > 0 else 0.0
            if policy.auto_converge and previous is not None and count > policy.progress * previous:
                cap = max(MIN_CPU_CAP, machine.cpu_cap / 2)
                running.on_machine_thread(functools.partial(set_cap, cap))
            previous = count
            log.debug("round %d: %d pages (%d bytes) at %.0f MB/s", report.rounds, count, frames.sent - before,
                      report.link_bytes_per_s / 1e6)
            pending = take()

        # Stop and copy: from here on every millisecond is the guest's downtime.
        with urgent():  # at normal CPU priority where allowed: a starved copy is a long downtime
            stopped_ns = running.pause() if live else time.monotonic_ns()
            paused = live
            if guest.finished:
                raise MigrationError("the guest's job ended before it could move")
            report.cpu_cap = machine.cpu_cap
            with ThreadPoolExecutor(1) as pool:
                final = _union(pending, tracker.take())
                whole = policy.full_digest or _popcount(final) == machine.ram.size // PAGE_SIZE  # all RAM goes now
                spans = None if whole else list(runs(final, RUN_PAGES))
                digest = pool.submit(ram_digest, machine.ram.view, spans)  # the RAM is frozen now: hashed as we send
                report.final_pages = send_pages(frames, tracker, final, report)
                frames.send(ROUND, ROUND_NUMBER.pack(report.rounds + 1))
                envelope = pack_map(guest.snapshot(with_ram=False).to_data())
                report.state_bytes = len(envelope)
                frames.send(STATE, envelope)
                frames.send(DIGEST, pack_digest(digest.result()))
            report.sent_s = (time.monotonic_ns() - stopped_ns) / 1e9
            frames.receive(READY)
            report.ready_s = (time.monotonic_ns() - stopped_ns) / 1e9
            if before_go is not None:
                before_go()
            report.handed_s = (time.monotonic_ns() - stopped_ns) / 1e9
            committed = True
            frames.send(GO)
            report.paused_s = (time.monotonic_ns() - stopped_ns) / 1e9
        report.total_s = time.monotonic() - started
        if not whole:
            frames.send(DIGEST, pack_digest(ram_digest(machine.ram.view)))  # the guest is paused here for good
        report.bytes_sent = frames.sent
        report.downtime_s = _downtime(frames, stopped_ns)
        report.verified = True if whole else _verified(frames)
        return report
    except BaseException as exc:
        if not committed:
            _go_on(running, tracker, original_cap, paused)
        if not isinstance(exc, ConodeError):
            raise
        error = exc if isinstance(exc, MigrationError) else MigrationError(str(exc))
        if not committed:
            frames.send_abort(str(error))  # once the guest runs again: the link may be slow to refuse it
        raise error from None
    finally:
        if committed:
            tracker.stop()  # the guest is paused for good


def _go_on(running: RunningGuest, tracker: DirtyTracker, cpu_cap: float, paused: bool) -> None:
    """The move failed before the hand-over: the guest goes on here as if nothing happened."""
    running.on_machine_thread(tracker.stop)
    running.on_machine_thread(functools.partial(setattr, running.guest.machine, "cpu_cap", cpu_cap))
    if paused and not running.guest.finished:
        running.start()


def _verified(frames: FrameStream) -> bool | None:
    """Whether the destination found all RAM as sent (None: it did not say)."""
    try:
        frames.receive(VERIFIED)
    except MigrationRefused as exc:
        log.error("the moved guest's RAM is not what was sent: %s", exc)
        return False
    except MigrationError as exc:
        log.warning("the moved guest's RAM was not confirmed: %s", exc)
        return None
    return True


def _downtime(frames: FrameStream, stopped_ns: int) -> float | None:
    """The destination reports the host clock at the guest's first instruction there (same host clock: a
    figure for one host; across hosts the clocks' offset adds in)."""
    try:
        _, payload = frames.receive(RESUMED)
    except MigrationError as exc:
        log.warning("the destination did not report the guest's start: %s", exc)
        return None
    (first_ns,) = CLOCK.unpack(payload)
    return (first_ns - stopped_ns) / 1e9
