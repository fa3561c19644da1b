"""The agent's link to the coordinator: Paranoid Pirate liveness, a bounded buffer, and the outbox.

The agent says hello and beats every interval. The coordinator sends nothing back on a timer: once welcomed, the
agent knows it alive from its TCP connection, which a coordinator that dies resets at once and which drops when a
heartbeat stays unacknowledged for protocol.LINK_TIMEOUT_MS (the coordinator's host gone or cut off). A
coordinator process that hangs with its host up is not noticed: a new connection would not help it. When the connection drops, or a hello has no answer for HEARTBEAT_LIVENESS beats,
the agent rebuilds its socket and says hello again, backing off up to a cap. Its guests and their jobs keep running
meanwhile: live messages (output) are buffered up to a bound, and results wait in the outbox until acknowledged,
sent again on every new connection. The agent never builds a message the protocol refuses: a result that would
not encode is reported as the job's failure, with the reason.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Any, Callable, Protocol

import zmq

from conode.agent.outbox import Outbox
from conode.cluster import protocol
from conode.cluster.heartbeat import PeerLiveness
from conode.cluster.keys import KeyPair
from conode.cluster.protocol import ProtocolError
from conode.cluster.transport import ClientSocket

log = logging.getLogger("conode.agent")

MAX_BUFFERED_BYTES = 64 << 20  # live output kept while the coordinator is unreachable
HEARTBEAT_BOUNDS_S = (0.05, 60.0)  # a beat interval the coordinator may ask for
REASON_CHARS = 4000  # a failure's reason is a sentence, not a log


class Transport(Protocol):
    """A connection to the coordinator that can be rebuilt; ZmqTransport, or testing.link's in-memory one."""

    @property
    def pollable(self) -> zmq.Socket | None:
        """A socket the agent's loop can wait on, if there is one."""

    def send(self, payload: bytes) -> bool: ...

    @property
    def up(self) -> bool:
        """Whether the connection is established and kept (as of the last check_refused)."""

    def receive(self) -> bytes | None:
        """A waiting frame, or None (never blocks)."""

    def reconnect(self) -> None: ...

    def check_refused(self) -> None:
        """Raise AuthRefused if the coordinator refused this agent's key."""

    @property
    def problem(self) -> str | None:
        """Why the connection cannot be made, while it cannot (a wrong coordinator key)."""

    def close(self) -> None: ...


class ZmqTransport:
    """The CURVE DEALER of cluster/transport.py, as the link uses it."""

    def __init__(self, context: zmq.Context, endpoint: str, server_key: str, keys: KeyPair) -> None:
        self._client = ClientSocket(context, endpoint, server_key, keys, tcp_timeout_ms=protocol.LINK_TIMEOUT_MS,
                                    log_problems=True)

    @property
    def pollable(self) -> zmq.Socket | None:
        return self._client.socket

    def send(self, payload: bytes) -> bool:
        return self._client.send(payload)

    @property
    def up(self) -> bool:
        return self._client.up

    def receive(self) -> bytes | None:
        try:
            return self._client.socket.recv(flags=zmq.NOBLOCK)
        except zmq.Again:
            return None

    def reconnect(self) -> None:
        self._client.reconnect()

    def check_refused(self) -> None:
        self._client.check_refused()

    @property
    def problem(self) -> str | None:
        return self._client.problem

    def close(self) -> None:
        self._client.close()


FOR_AGENT = ("run_job", "cancel_job", "conet_peers", "checkpoint_reply", "checkpoint_data", "checkpoint_start", "move_in",
             "move_out", "move_go", "move_abort", "load_vacated", "checkpoint_cut", "cut_final",
             "cut_resume")


class CoordinatorLink:
    def __init__(self, transport: Transport, outbox: Outbox, clock: Callable[[], float],
                 hello: Callable[[], bytes], heartbeat: Callable[[], bytes]) -> None:
        self.transport = transport
        self.outbox = outbox
        self._clock = clock
        self._hello = hello
        self._heartbeat = heartbeat
        self.liveness = PeerLiveness(clock)
        self.welcomed = False
        self._hello_sent = False
        self._reconnect_at: float | None = None
        self._linked = False  # the connection was up at the last look
        self._buffer: deque[bytes] = deque()
        self._buffered_bytes = 0
        self._dropping = False
        self._unsent: set[int] = set()  # results not yet sent on this connection

    # --- receiving --------------------------------------------------------------------------------------------
    def receive(self) -> list[dict[str, Any]]:
        """Handle the link's own messages; return the ones for the agent (FOR_AGENT)."""
        for_agent = []
        while (frame := self.transport.receive()) is not None:
            try:
                message = protocol.decode(frame)
            except ProtocolError as exc:
                log.warning("malformed message from the coordinator: %s", exc)
                continue
            self.liveness.heard()
            kind = message["type"]
            if kind == "welcome":
                self._on_welcome(message)
            elif kind == "reconnect":
                log.info("the coordinator asks for a new hello: %s", message["reason"])
                self.welcomed = False
                self._hello_sent = False
            elif kind == "ack":
                self.outbox.remove(message["job"])
                self._unsent.discard(message["job"])
            elif kind == "error":
                log.warning("coordinator says: %s (%s)", message["message"], message["code"])
            elif kind in FOR_AGENT:
                for_agent.append(message)
        return for_agent

    def _on_welcome(self, message: dict[str, Any]) -> None:
        interval = message["heartbeat_s"]
        low, high = HEARTBEAT_BOUNDS_S
        if math.isfinite(interval) and low <= interval <= high:
            self.liveness.interval = interval
        self.welcomed = True
        self._unsent = set(self.outbox.jobs())  # a new connection: every unacknowledged result goes again
        log.info("joined the pool")
        self._pump()

    # --- keeping the connection --------------------------------------------------------------------------
    def keep(self) -> None:
        """Say hello, beat, notice silence and reconnect with back-off; send what waits. Raises AuthRefused."""
        now = self._clock()
        self.transport.check_refused()
        if self._reconnect_at is not None:
            if now < self._reconnect_at:
                return
            self._reconnect_at = None
            self.transport.reconnect()
            self.liveness.reset()
            self._hello_sent = False
            self._linked = False
        if not self._hello_sent:
            self._hello_sent = self.transport.send(self._hello())
            if self._hello_sent:
                self.liveness.reset()
            return
        if self.welcomed:
            # Until welcomed only an answer counts (a hello may have gone to a coordinator that then died).
            if self.transport.up:
                self.liveness.heard()  # the connection holds: the coordinator's end acknowledges our heartbeats
            elif self._linked:
                self.liveness.silent()  # dropped: our heartbeats went unacknowledged, or its end closed it
            self._linked = self.transport.up
        if self.liveness.expired():
            delay = self.liveness.next_backoff()
            log.warning("no word from the coordinator for %.0f s; reconnecting in %.1f s",
                        now - self.liveness.last_heard, delay)
            self.welcomed = False
            self._reconnect_at = now + delay
            return
        if self.welcomed:
            self._pump()
            if self.liveness.beat_due():
                self.transport.send(self._heartbeat())  # a beat that cannot go now is stale by the next one

    def beat_soon(self) -> None:
        """Send the next heartbeat at once (something the coordinator should know changed)."""
        self.liveness.next_beat = -math.inf

    # --- sending ---------------------------------------------------------------------------------------------
    def report(self, kind: str, **fields: Any) -> None:
        """A live message: sent now, or buffered (bounded) until the coordinator is back."""
        try:
            payload = protocol.encode(kind, **fields)
        except ProtocolError as exc:
            log.error("not sending a %s the protocol refuses: %s", kind, exc)
            return
        if self.welcomed and not self._buffer and self.transport.send(payload):
            return
        if self._buffered_bytes + len(payload) > MAX_BUFFERED_BYTES:
            if not self._dropping:
                log.warning("coordinator unreachable and %d bytes buffered: dropping live output until it is back",
                            self._buffered_bytes)
                self._dropping = True
            return
        self._buffer.append(payload)
        self._buffered_bytes += len(payload)

    def send_now(self, kind: str, **fields: Any) -> bool:
        """A bulk message that may be lost (a checkpoint's): sent only if nothing waits before it, never buffered;
        whether it went."""
        if not self.welcomed or self._buffer:
            return False
        try:
            return self.transport.send(protocol.encode(kind, **fields))
        except ProtocolError as exc:
            log.error("not sending a %s the protocol refuses: %s", kind, exc)
            return False

    def result(self, job: int, kind: str, **fields: Any) -> None:
        """A job's final word, kept in the outbox until acknowledged; one the protocol refuses becomes a failure."""
        if "reason" in fields:
            fields["reason"] = fields["reason"][:REASON_CHARS]
        try:
            payload = protocol.encode(kind, job=job, **fields)
        except ProtocolError as exc:
            reason = f"its result could not be reported: {exc}"
            log.error("job %d: %s", job, reason)
            payload = protocol.encode("job_failed", job=job, reason=reason[:REASON_CHARS], retry=False)
        self.outbox.put(job, payload)
        self._unsent.add(job)
        self._pump()

    def _pump(self) -> None:
        """Send what waits, in order: buffered live messages first, then results."""
        if not self.welcomed:
            return
        while self._buffer:
            if not self.transport.send(self._buffer[0]):
                return
            self._buffered_bytes -= len(self._buffer.popleft())
        self._dropping = False
        for job in sorted(self._unsent):
            payload = self.outbox.payload(job)
            if payload is not None and not self.transport.send(payload):
                return
            self._unsent.discard(job)

    def close(self, bye: bytes | None = None) -> None:
        if self.welcomed and bye is not None:
            self.transport.send(bye)
        self.transport.close()
