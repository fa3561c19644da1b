"""The host's view of the in-guest agent: commands and file transfers multiplexed over the host channel.

Runs on the machine thread: :meth:`GuestAgentClient.feed` is given the bytes the guest sends, and the
``send`` callable queues bytes for the guest (the host channel device). Every request gets a fresh id.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable, Protocol

from conode.vm import channel
from conode.vm.channel import ChannelError, Frame, FrameDecoder


class CommandHandler(Protocol):
    """Receives what one command in the guest produces."""

    def on_output(self, stream: str, data: bytes) -> None: ...

    def on_exit(self, status: int) -> None: ...

    def on_error(self, message: str) -> None: ...


FileDone = Callable[[str | None], None]  # error message or None
FetchDone = Callable[[bytes | None, str | None], None]  # data, or None and an error message


@dataclass
class _Fetch:
    done: FetchDone
    chunks: list[bytes] = field(default_factory=list)


class GuestAgentClient:
    """Speaks the host-channel protocol with coagent on behalf of the host."""

    def __init__(self, send: Callable[[bytes], None]) -> None:
        self._send = send
        self._decoder = FrameDecoder()
        self._next_id = 1
        self.guest: str | None = None  # the READY payload ("Linux 6.1.x i686") once the agent is up
        self.on_ready: Callable[[str], None] = lambda guest: None
        self._commands: dict[int, CommandHandler] = {}
        self._puts: dict[int, FileDone] = {}
        self._fetches: dict[int, _Fetch] = {}

    @property
    def ready(self) -> bool:
        return self.guest is not None

    def _new_id(self) -> int:
        ident = self._next_id
        self._next_id += 1
        return ident

    # --- requests ------------------------------------------------------------------------------------------
    def run(self, argv: list[str], handler: CommandHandler, cwd: str = "/", ident: int | None = None) -> int:
        """Start *argv* in the guest; return the command's id."""
        ident = self._new_id() if ident is None else ident
        self._next_id = max(self._next_id, ident + 1)
        self._commands[ident] = handler
        self._send(channel.exec_frame(ident, argv, cwd))
        return ident

    def attach(self, ident: int, handler: CommandHandler) -> None:
        """Re-attach a handler to a command started before a snapshot."""
        self._commands[ident] = handler

    def kill(self, ident: int, signal_number: int = 9) -> None:
        self._send(channel.frame(channel.KILL, ident, struct.pack("<I", signal_number)))

    def put_file(self, path: str, data: bytes, done: FileDone, mode: int = 0o644) -> None:
        ident = self._new_id()
        self._puts[ident] = done
        for part in channel.put_frames(ident, path, data, mode):
            self._send(part)

    def fetch_file(self, path: str, done: FetchDone) -> None:
        ident = self._new_id()
        self._fetches[ident] = _Fetch(done)
        self._send(channel.frame(channel.GET, ident, path.encode()))

    def power_off(self) -> None:
        self._send(channel.frame(channel.QUIT, 0))

    # --- what the guest says -----------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        for frame in self._decoder.feed(data):
            self._dispatch(frame)

    def _dispatch(self, frame: Frame) -> None:
        kind, ident = frame.kind, frame.ident
        if kind == channel.READY:
            self.guest = frame.payload.decode(errors="replace")
            self.on_ready(self.guest)
        elif kind in (channel.STDOUT, channel.STDERR):
            handler = self._commands.get(ident)
            if handler is not None:
                handler.on_output("stdout" if kind == channel.STDOUT else "stderr", frame.payload)
        elif kind == channel.EXIT:
            handler = self._commands.pop(ident, None)
            if handler is not None:
                handler.on_exit(channel.exit_status(frame.payload))
        elif kind == channel.ACK:
            done = self._puts.pop(ident, None)
            if done is not None:
                done(None)
        elif kind == channel.FILE:
            fetch = self._fetches.get(ident)
            if fetch is not None:
                if frame.payload:
                    fetch.chunks.append(frame.payload)
                else:
                    del self._fetches[ident]
                    fetch.done(b"".join(fetch.chunks), None)
        elif kind == channel.ERROR:
            self._dispatch_error(ident, frame.payload.decode(errors="replace"))
        else:
            raise ChannelError(f"in-guest agent sent an unknown frame type {kind!r}")

    def _dispatch_error(self, ident: int, message: str) -> None:
        if ident in self._puts:
            self._puts.pop(ident)(message)
        elif ident in self._fetches:
            self._fetches.pop(ident).done(None, message)
        elif ident in self._commands:
            self._commands.pop(ident).on_error(message)

    # --- snapshots -----------------------------------------------------------------------------------------
    def get_state(self) -> dict:
        """Protocol state; handlers are host objects and are re-attached by their owner after a restore."""
        return {"decoder": self._decoder.get_state(), "next_id": self._next_id, "guest": self.guest,
                "commands": sorted(self._commands)}

    def set_state(self, state: dict) -> None:
        self._decoder.set_state(state["decoder"])
        self._next_id = int(state["next_id"])
        self.guest = state["guest"]
