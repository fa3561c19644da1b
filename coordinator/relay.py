"""The coordinator's conet relay: frames between two agents' switches that cannot reach each other.

Switches talk straight to each other; only a switch whose link to a peer stays down (a firewall, a NAT between
two office floors) sends that peer's frames here (conode/conet/switchd.py says when). The relay runs in a thread
of its own with its own ZeroMQ context and socket (a ROUTER, CURVE server with the coordinator's key pair, whose
ZAP handler admits only enrolled agent keys), so relayed traffic never queues behind, or in front of, the control
plane's messages; the thread does only bounded work per turn and waits in ZeroMQ (without the GIL) otherwise.

Wire: a switch sends [destination key, network, frame, ...] (keys as Z85 text) and, to say where it is, a lone
empty part; the relay sends [sender key, network, frame, ...], the sender's key taken from CURVE (User-Id), never
from the message. It forwards only between agents the coordinator has made peers (they share a network: see
:meth:`Relay.set_peers`), each sender within a token bucket (CONET_RELAY_*), each destination's queue bounded;
everything else is dropped and counted by reason (``stats``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from conode.cluster.keys import KeyPair
from conode.cluster.transport import ServerSocket
from conode.conet.switch import Bucket
from conode.conet.switchd import MAX_PEER_MESSAGE
from conode.limits import (
    CONET_BURST_S,
    CONET_RELAY_BYTES_PER_S,
    CONET_RELAY_FRAMES_PER_S,
    CONET_RELAY_QUEUE_MESSAGES,
)

log = logging.getLogger("coordinator.relay")

MESSAGES_PER_TURN = 64  # then the stop flag is looked at again
POLL_MS = 200
FORGET_AFTER_S = 30.0  # a switch not heard from this long (it says hello every second) is no longer reachable

# Drop reasons.
MALFORMED = "malformed"
NOT_PEERS = "not-peers"
UNREACHABLE = "destination-not-connected"
FULL = "destination-full"
RATE_LIMITED = "rate-limited"


class Relay:
    """The relay's socket, its routing table (agent key -> the ROUTER identity it last wrote from) and counters.

    ``set_peers`` and ``stats`` are called from the coordinator's thread; they replace or copy whole values, so
    no lock is needed (each is one atomic step under the GIL).
    """

    def __init__(self, bind: str, keys: KeyPair, is_agent: Callable[[str], bool],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._context = zmq.Context()
        try:
            self._server = ServerSocket(self._context, bind, keys, is_agent, max_message=MAX_PEER_MESSAGE,
                                        send_hwm=CONET_RELAY_QUEUE_MESSAGES)
        except BaseException:
            self._context.term()
            raise
        self._server.socket.setsockopt(zmq.RCVHWM, CONET_RELAY_QUEUE_MESSAGES)
        self.endpoint = self._server.endpoint
        self._clock = clock
        self._peers: dict[str, frozenset[str]] = {}  # agent key -> the keys it may send to
        self._names: dict[str, str] = {}  # agent key -> node name, for the counters
        self._routes: dict[str, tuple[bytes, float]] = {}  # agent key -> (ROUTER identity, when last heard)
        self._buckets: dict[str, Bucket] = {}
        self._frames: dict[str, int] = {}  # frames forwarded, by sending node
        self._bytes: dict[str, int] = {}
        self._dropped: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="conet-relay", daemon=True)

    def start(self) -> Relay:
        self._thread.start()
        log.info("conet relay listening on %s", self.endpoint)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._server.close()
        self._context.term()

    # --- from the coordinator's thread ---------------------------------------------------------------------
    def set_peers(self, key: str, name: str, peers: list[str] | None) -> None:
        """Agent *key* (node *name*) may send to the agents with keys *peers* (None: it left the pool)."""
        if peers is None:
            self._peers.pop(key, None)  # its route, now unused, is forgotten when it falls silent
        else:
            self._peers[key] = frozenset(peers)
            self._names[key] = name

    def stats(self) -> dict[str, Any]:
        """Frames and bytes forwarded by sending node, and drops by reason."""
        return {"endpoint": self.endpoint, "frames": dict(self._frames), "bytes": dict(self._bytes),
                "dropped": dict(self._dropped), "agents": len(self._routes)}

    # --- the relay's thread -------------------------------------------------------------------------------------
    def _run(self) -> None:
        sock = self._server.socket
        next_forget = self._clock() + FORGET_AFTER_S
        while not self._stop.is_set():
            if self._clock() >= next_forget:
                self._forget_silent()
                next_forget = self._clock() + FORGET_AFTER_S / 4
            if not sock.poll(POLL_MS, zmq.POLLIN):
                continue
            for _ in range(MESSAGES_PER_TURN):
                try:
                    parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                try:
                    self._forward(parts)
                except Exception:  # one bad message must not end the relay
                    log.exception("conet relay: error forwarding a message")
                    self._drop(MALFORMED)

    def _forward(self, parts: list[zmq.Frame]) -> None:
        now = self._clock()
        sender = str(parts[-1].get("User-Id") or "") if len(parts) >= 2 else ""
        if not sender:
            self._drop(MALFORMED)
            return
        self._routes[sender] = (parts[0].bytes, now)
        if len(parts) == 2 and not parts[1].bytes:
            return  # "here I am"
        if len(parts) < 4:
            self._drop(MALFORMED)
            return
        try:
            target = parts[1].bytes.decode("ascii")
        except UnicodeDecodeError:
            self._drop(MALFORMED)
            return
        frames = parts[3:]
        count = len(frames)
        if target not in self._peers.get(sender, ()):
            self._drop(NOT_PEERS, count)
            return
        route = self._routes.get(target)
        if route is None:
            self._drop(UNREACHABLE, count)
            return
        size = sum(len(frame.buffer) for frame in frames)
        bucket = self._buckets.get(sender)
        if bucket is None:
            bucket = self._buckets[sender] = Bucket(CONET_RELAY_BYTES_PER_S, CONET_RELAY_FRAMES_PER_S,
                                                    CONET_BURST_S, now)
        if not bucket.take(size, now, count):
            self._drop(RATE_LIMITED, count)
            return
        try:
            self._server.socket.send_multipart([route[0], sender.encode(), parts[2], *frames], zmq.NOBLOCK,
                                               copy=False)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:  # it went away since it last wrote
                self._routes.pop(target, None)
                self._drop(UNREACHABLE, count)
            elif exc.errno == zmq.EAGAIN:
                self._drop(FULL, count)
            else:
                raise
            return
        name = self._names.get(sender, sender[:8])
        self._frames[name] = self._frames.get(name, 0) + count
        self._bytes[name] = self._bytes.get(name, 0) + size

    def _forget_silent(self) -> None:
        horizon = self._clock() - FORGET_AFTER_S
        for key in [key for key, (_, heard) in self._routes.items() if heard < horizon]:
            del self._routes[key]
            self._buckets.pop(key, None)

    def _drop(self, reason: str, count: int = 1) -> None:
        if reason not in self._dropped:
            log.warning("conet relay: dropping frames: %s (counted; logged once)", reason)
        self._dropped[reason] = self._dropped.get(reason, 0) + count
