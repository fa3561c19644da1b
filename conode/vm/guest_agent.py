"""The host's view of the in-guest agent: commands and file transfers multiplexed over the host channel.

Runs on the machine thread: :meth:`GuestAgentClient.feed` is given the bytes the guest sends, and the
``send`` callable queues bytes for the guest (the host channel device). Every request gets a fresh id.

The guest is untrusted — a job runs as root and can write anything to the channel — so :meth:`feed` never
raises: a frame the host did not ask for (a second READY, an unknown type, a file larger than its limit, a
malformed exit status, an oversized frame) is a *violation*. The client then stops listening and reports it
once through ``on_violation``; its owner discards the guest. Frames about requests that already ended (late
output of a killed command, say) are ignored.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable, Protocol

from conode.vm import channel, state
from conode.vm.channel import ChannelError, Frame, FrameDecoder
from conode.vm.state import blob, bounded

MAX_GUEST_NAME = 200  # the READY payload kept ("Linux 6.1.x i686")


class CommandHandler(Protocol):
    """Receives what one command in the guest produces."""

    def on_output(self, stream: str, data: bytes) -> None: ...

    def on_exit(self, status: int) -> None: ...

    def on_error(self, message: str) -> None: ...


Done = Callable[[str | None], None]  # error message or None
FetchDone = Callable[[bytes | None, str | None], None]  # data, or None and an error message


@dataclass
class _Fetch:
    done: FetchDone
    max_bytes: int
    name: str
    received: int = 0
    chunks: list[bytes] = field(default_factory=list)


@dataclass(frozen=True)
class AgentState(state.Record):
    KIND = "host-channel protocol"
    VERSION = 1

    decoder: bytes = blob(max_len=channel.HEADER.size + channel.MAX_PAYLOAD)  # half a frame
    next_id: int = bounded(1, (1 << 32) - 1)
    guest: str | None = blob(max_len=MAX_GUEST_NAME)


class GuestAgentClient:
    """Speaks the host-channel protocol with coagent on behalf of the host."""

    def __init__(self, send: Callable[[bytes], None]) -> None:
        self._send = send
        self._decoder = FrameDecoder()
        self._next_id = 1
        self.guest: str | None = None  # the READY payload ("Linux 6.1.x i686") once the agent is up
        self.on_ready: Callable[[str], None] = lambda guest: None
        self.on_violation: Callable[[str], None] = lambda reason: None
        self.violation: str | None = None  # set once the guest broke the protocol; nothing is read after
        self._commands: dict[int, CommandHandler] = {}
        self._acks: dict[int, Done] = {}  # PUTs, RENEWs and IDENTITYs waiting for ACK
        self._fetches: dict[int, _Fetch] = {}

    @property
    def ready(self) -> bool:
        return self.guest is not None

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete frame the decoder holds: non-zero for long means a desynchronised stream."""
        return self._decoder.pending

    def _new_id(self) -> int:
        ident = self._next_id
        self._next_id += 1
        return ident

    # --- requests ------------------------------------------------------------------------------------------
    def run(self, argv: list[str], handler: CommandHandler, cwd: str = "/", ident: int | None = None) -> int:
        """Start *argv* in the guest; return the command's id. Raises ChannelError if it cannot be framed."""
        ident = self._new_id() if ident is None else ident
        self._next_id = max(self._next_id, ident + 1)
        self._send(channel.exec_frame(ident, argv, cwd))
        self._commands[ident] = handler
        return ident

    def attach(self, ident: int, handler: CommandHandler) -> None:
        """Re-attach a handler to a command started before a snapshot."""
        self._commands[ident] = handler

    def kill(self, ident: int, signal_number: int = 9) -> None:
        self._send(channel.frame(channel.KILL, ident, struct.pack("<I", signal_number)))

    def kill_all(self, signal_number: int = 9) -> None:
        """Signal every process in the guest except the agent: what a finished job left behind."""
        self.kill(channel.KILL_ALL, signal_number)

    def put_file(self, path: str, data: bytes, done: Done, mode: int = 0o644) -> None:
        ident = self._new_id()
        self._acks[ident] = done
        for part in channel.put_frames(ident, path, data, mode):
            self._send(part)

    def fetch_file(self, root: str, relative: str, max_bytes: int, done: FetchDone) -> None:
        """Fetch *relative* under *root*: a regular file of at most *max_bytes*, no link leading out."""
        ident = self._new_id()
        self._fetches[ident] = _Fetch(done, max_bytes, relative)
        self._send(channel.get_frame(ident, root, relative, max_bytes))

    def renew(self, wall_ns: int, entropy: bytes, done: Done) -> None:
        """Set the guest's clock and reseed its RNG (after a restore from a shared snapshot)."""
        ident = self._new_id()
        self._acks[ident] = done
        self._send(channel.renew_frame(ident, wall_ns, entropy))

    def set_identity(self, payload: bytes, done: Done) -> None:
        """Give the guest its conet identity (net_identity.py builds the payload); answered like a renew."""
        ident = self._new_id()
        self._acks[ident] = done
        self._send(channel.frame(channel.IDENTITY, ident, payload))

    def power_off(self) -> None:
        self._send(channel.frame(channel.QUIT, 0))

    # --- what the guest says -----------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Take bytes from the guest. Never raises: a broken protocol becomes one ``on_violation`` call."""
        if self.violation is not None:
            return
        try:
            for frame in self._decoder.feed(data):
                self._dispatch(frame)
        except ChannelError as exc:
            self._violate(str(exc))

    def _violate(self, reason: str) -> None:
        if self.violation is None:
            self.violation = reason
            self.on_violation(reason)

    def _dispatch(self, frame: Frame) -> None:
        kind, ident = frame.kind, frame.ident
        if kind == channel.READY:
            if self.guest is not None:
                raise ChannelError("the guest announced itself (READY) a second time")
            self.guest = frame.payload.decode(errors="replace")[:MAX_GUEST_NAME]
            self.on_ready(self.guest)
        elif kind in (channel.STDOUT, channel.STDERR):
            handler = self._commands.get(ident)
            if handler is not None:
                handler.on_output("stdout" if kind == channel.STDOUT else "stderr", frame.payload)
        elif kind == channel.EXIT:
            status = channel.exit_status(frame.payload)
            handler = self._commands.pop(ident, None)
            if handler is not None:
                handler.on_exit(status)
        elif kind == channel.ACK:
            done = self._acks.pop(ident, None)
            if done is not None:
                done(None)
        elif kind == channel.FILE:
            self._on_file_chunk(ident, frame.payload)
        elif kind == channel.ERROR:
            self._dispatch_error(ident, frame.payload.decode(errors="replace")[:1000])
        else:
            raise ChannelError(f"the guest sent a frame of unknown type {kind!r}")

    def _on_file_chunk(self, ident: int, payload: bytes) -> None:
        fetch = self._fetches.get(ident)
        if fetch is None:
            return
        if payload:
            fetch.received += len(payload)
            if fetch.received > fetch.max_bytes:
                raise ChannelError(f"the guest sent more than the {fetch.max_bytes}-byte limit of {fetch.name}")
            fetch.chunks.append(payload)
        else:
            del self._fetches[ident]
            fetch.done(b"".join(fetch.chunks), None)

    def _dispatch_error(self, ident: int, message: str) -> None:
        if ident in self._acks:
            self._acks.pop(ident)(message)
        elif ident in self._fetches:
            self._fetches.pop(ident).done(None, message)
        elif ident in self._commands:
            self._commands.pop(ident).on_error(message)

    # --- snapshots -----------------------------------------------------------------------------------------
    def get_state(self) -> dict:
        """Protocol state; handlers are host objects and are re-attached by their owner after a restore."""
        return state.dump(AgentState(self._decoder.get_state(), self._next_id, self.guest))

    def set_state(self, data: dict) -> None:
        """Restore :meth:`get_state` output; raise SnapshotError (and change nothing) if it is not valid."""
        saved = state.load(AgentState, data)
        self._decoder.set_state(saved.decoder)
        self._next_id = saved.next_id
        self.guest = saved.guest
