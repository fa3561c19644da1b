"""The receiving side of a pre-copy migration.

Pages go straight into a RAM image (an unlinked memory file) that the guest then maps copy-on-write, so the
last step — building the machine — copies nothing. Everything is checked before the guest exists: each frame's
bounds and checksum, the rounds' order, the state envelope (by its records, as a snapshot file's), and the
final RAM against the source's digest (all of it, or the pages the last round sent, as the source's policy
says); while the source hashes its RAM, the guest is built. Then READY goes back; the guest is the destination's
once the source answers GO. Until then a failure discards it unstarted. If the digest covered only the last
round's pages, :meth:`Arrival.verify` checks all RAM after the start.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from conode.errors import ConodeError
from conode.migration.stream import (CLOCK, DIGEST, FIRST_PAGE, GO, HELLO, MAX_ROUNDS, PAGES, READY, RESUMED,
                                     ROUND, ROUND_NUMBER, RUN_PAGES, STATE, VERIFIED, ZERO_RUN, ZEROS,
                                     ByteStream, FrameStream, MigrationError, compare_digest, unpack_digest,
                                     unpack_hello, unpack_map)
from conode.vm.cpu.unicorn_cpu import RamImage
from conode.vm.guest import Guest, GuestSnapshot, JobSink
from conode.vm.layout import PAGE_SIZE
from conode.vm.machine import CoMachine


@dataclass
class Arrival:
    """A guest that has moved here, built and not yet started: start it, then call :meth:`started` and
    :meth:`verify`."""

    guest: Guest
    frames: FrameStream
    rounds: int
    bytes_received: int
    _received: _Receiver | None  # the RAM as received, until it is checked whole

    def started(self, first_instruction_ns: int) -> None:
        """Tell the source the host clock (CLOCK_MONOTONIC) at the guest's first instruction here: the end of its
        downtime (RunningGuest.started_ns)."""
        try:
            self.frames.send(RESUMED, CLOCK.pack(first_instruction_ns))
        except MigrationError:
            pass  # the guest is ours already; the figure is only for the source's report

    def verify(self) -> None:
        """After the start, unless it was done before: check all the RAM received (the image the guest maps
        copy-on-write, which its writes leave alone) against the source's complete digest, sent after GO; raise
        MigrationError on a mismatch (the guest then holds wrong memory: fail its job)."""
        received, self._received = self._received, None
        if received is None:
            return
        try:
            entries = unpack_digest(self.frames.receive(DIGEST)[1], len(received.view))
            if sum(count for _, count, _ in entries) != received.pages:
                raise MigrationError("the source's digest after the hand-over does not cover all RAM")
            compare_digest(received.view, entries)
        except MigrationError as exc:
            self.frames.send_abort(str(exc))
            raise
        finally:
            received.close()
        self.frames.send(VERIFIED)


class _Receiver:
    def __init__(self, frames: FrameStream, ram_bytes: int) -> None:
        self.frames = frames
        self.pages = ram_bytes // PAGE_SIZE
        self.image = RamImage(ram_bytes)
        self.memory = self.image.writable()
        self.view = memoryview(self.memory)
        self.written: set[int] = set()  # MiBs that ever received a non-zero page (the others are all zero)
        self.rounds = 0

    def _span(self, first: int, count: int, zeros: bool) -> tuple[int, int] | None:
        """The RAM bytes pages [first, first+count) occupy, or None for zero pages where RAM is zero anyway."""
        if count <= 0 or first + count > self.pages:
            raise MigrationError(f"the source sent pages {first}..{first + count - 1} of a guest with {self.pages} "
                                 f"pages; the stream is corrupt")
        mibs = set(range(first // RUN_PAGES, (first + count - 1) // RUN_PAGES + 1))
        if not zeros:
            self.written |= mibs
        elif not mibs & self.written:
            return None  # the first round's zero pages: nothing to write
        return first * PAGE_SIZE, (first + count) * PAGE_SIZE

    def receive_ram(self) -> bytes:
        """Rounds of pages, until the STATE frame (returned)."""
        frames = self.frames
        while True:
            kind, payload = frames.receive(PAGES, ZEROS, ROUND, STATE)
            if kind == PAGES:
                data = memoryview(payload)[FIRST_PAGE.size:]
                if len(payload) < FIRST_PAGE.size or not data or len(data) % PAGE_SIZE:
                    raise MigrationError("a PAGES frame does not hold whole pages; the stream is corrupt")
                (first,) = FIRST_PAGE.unpack_from(payload)
                start, end = self._span(first, len(data) // PAGE_SIZE, zeros=False)  # type: ignore[misc]
                self.view[start:end] = data
            elif kind == ZEROS:
                first, count = ZERO_RUN.unpack(payload) if len(payload) == ZERO_RUN.size else (0, 0)
                if count > RUN_PAGES:
                    raise MigrationError(f"a ZEROS frame of {count} pages (at most {RUN_PAGES}); the stream is corrupt")
                span = self._span(first, count, zeros=True)
                if span is not None:
                    self.view[span[0]:span[1]] = bytes(span[1] - span[0])
            elif kind == ROUND:
                number = ROUND_NUMBER.unpack(payload)[0] if len(payload) == ROUND_NUMBER.size else -1
                if number != self.rounds + 1 or number > MAX_ROUNDS:
                    raise MigrationError(f"the source sent round {number} after round {self.rounds} (at most "
                                         f"{MAX_ROUNDS}); the stream is corrupt")
                self.rounds = number
            else:
                return payload

    def check_digest(self, payload: bytes) -> bool:
        """Check the pages the digest lists; whether it listed all RAM."""
        entries = unpack_digest(payload, len(self.view))
        compare_digest(self.view, entries)
        return sum(count for _, count, _ in entries) == self.pages

    def close(self) -> None:
        self.view.release()
        self.memory.close()
        self.image.close()


def migrate_in(stream: ByteStream, sink: JobSink | None = None, disk_base: Path | None = None,
               peer: str = "the source", disk_overlay: Path | None = None) -> Arrival:
    """Receive a guest over *stream*; return it built and checked, not started. Raise MigrationError (nothing
    was started, nothing is left behind) if the stream is corrupt, truncated or refused by its records. *disk_base*
    and *disk_overlay*: where the guest's disk base image is here, and a new file for its overlay."""
    frames = FrameStream(stream, peer)
    receiver: _Receiver | None = None
    guest: Guest | None = None
    try:
        frames.receive_preamble()
        hello = unpack_hello(frames.receive(HELLO)[1])
        receiver = _Receiver(frames, hello.ram_bytes)
        envelope = receiver.receive_ram()
        snapshot = GuestSnapshot.from_data(unpack_map(envelope, "STATE frame"), f"the guest from {peer}")
        if snapshot.guest_id != hello.guest_id:
            raise MigrationError(f"the source announced guest {hello.guest_id} and sent the state of another")
        if CoMachine.config_from_state(snapshot.machine).mem_mib << 20 != hello.ram_bytes:
            raise MigrationError("the guest's state describes another RAM size than the source announced")
        guest = Guest.restore(snapshot, sink, ram_image=receiver.image, disk_base=disk_base,  # as the source hashes
                              disk_overlay=disk_overlay)
        complete = receiver.check_digest(frames.receive(DIGEST)[1])
        frames.send(READY)
        frames.receive(GO)
        arrival = Arrival(guest, frames, receiver.rounds, frames.received, None if complete else receiver)
        if not complete:
            receiver = None  # the arrival checks it whole, then closes it
        return arrival
    except ConodeError as exc:
        if guest is not None:
            guest.machine.close()
        error = exc if isinstance(exc, MigrationError) else MigrationError(f"the guest from {peer} is refused: {exc}")
        frames.send_abort(str(error))
        raise error from None
    finally:
        if receiver is not None:
            receiver.close()  # a built guest maps the image by itself
