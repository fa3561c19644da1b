"""The migration stream between two agents: a ZeroMQ PAIR socket, CURVE-encrypted and authenticated.

The destination agent listens (:func:`listen`) for exactly one peer key — the source agent's, as the
coordinator names it when it orchestrates the move; the source connects (:func:`connect`) knowing the
destination's public key. Each frame of the stream travels as one ZeroMQ message (bounded by ``MAXMSGSIZE``);
:class:`CurveStream` turns them back into a byte stream. A PAIR socket does not report a vanished peer, so every
wait is bounded by the stream's timeout.
"""

from __future__ import annotations

import logging

import zmq
from zmq.auth.thread import ThreadAuthenticator

from conode.cluster.keys import KeyPair
from conode.cluster.transport import bind_curve_server
from conode.migration.stream import HEADER, MAX_PAYLOAD, TRAILER

log = logging.getLogger(__name__)

SEND_QUEUE = 16  # frames (of at most 1 MiB) queued for the destination
MAX_MESSAGE = max(MAX_PAYLOAD.values()) + HEADER.size + TRAILER.size + 4096  # one frame, whole


class CurveStream:
    """A ByteStream over a connected PAIR socket; each wait bounded by *timeout_s*."""

    def __init__(self, sock: zmq.Socket, timeout_s: float, authenticator: ThreadAuthenticator | None = None) -> None:
        self.socket = sock
        self._authenticator = authenticator
        sock.sndtimeo = sock.rcvtimeo = int(timeout_s * 1000)
        self._pending = memoryview(b"")

    def send(self, data: bytes) -> None:
        try:
            self.socket.send(data, 0, len(data) < 65536)  # large frames go without a copy
        except zmq.ZMQError as exc:
            raise OSError(exc.errno, f"ZeroMQ: {exc.strerror}") from None

    def recv(self, size: int) -> bytes:
        if not self._pending:
            try:
                self._pending = memoryview(self.socket.recv(copy=False).buffer)
            except zmq.Again:
                raise TimeoutError("timed out") from None
            except zmq.ZMQError as exc:
                raise OSError(exc.errno, f"ZeroMQ: {exc.strerror}") from None
        part, self._pending = self._pending[:size], self._pending[size:]
        return bytes(part)

    def close(self) -> None:
        self.socket.close(linger=0)
        if self._authenticator is not None:
            self._authenticator.stop()


def listen(context: zmq.Context, bind: str, keys: KeyPair, peer_public: str,
           timeout_s: float = 30.0) -> tuple[CurveStream, str]:
    """A stream that only *peer_public*'s holder can connect to, bound at *bind*; and the endpoint it got."""
    sock, authenticator = bind_curve_server(context, zmq.PAIR, bind, keys, _OnlyKey(peer_public), MAX_MESSAGE,
                                            "for a migration ")
    return CurveStream(sock, timeout_s, authenticator), sock.getsockopt_string(zmq.LAST_ENDPOINT)


def connect(context: zmq.Context, endpoint: str, server_public: str, keys: KeyPair,
            timeout_s: float = 30.0) -> CurveStream:
    """A stream to the destination agent listening at *endpoint* with the public key *server_public*."""
    sock = context.socket(zmq.PAIR)
    sock.curve_serverkey = server_public.encode()
    sock.curve_publickey = keys.public.encode()
    sock.curve_secretkey = keys.secret.encode()
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
    sock.sndhwm = SEND_QUEUE  # a vanished destination blocks the sender soon, not after a guest's RAM in memory
    sock.linger = 0
    sock.connect(endpoint)
    return CurveStream(sock, timeout_s)


class _OnlyKey:
    """ZAP credentials provider admitting one public key."""

    def __init__(self, public: str) -> None:
        self._public = public

    def callback(self, domain: str, key: bytes) -> bool:
        allowed = key.decode("ascii", "replace") == self._public
        if not allowed:
            log.warning("refused a migration connection from key %s", key.decode("ascii", "replace"))
        return allowed
