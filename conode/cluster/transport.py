"""ZeroMQ sockets of the control plane, CURVE-encrypted and authenticated.

The coordinator binds a ROUTER (:class:`ServerSocket`); agents and the admin CLI connect a DEALER
(:class:`ClientSocket`). The server admits only enrolled public keys (checked by a ZAP handler) and learns
each message's sender key from ZeroMQ's ``User-Id`` frame property, so roles are decided per message from the
key, never from what the message claims.
"""

from __future__ import annotations

import logging
from typing import Callable

import zmq
from zmq.auth.thread import ThreadAuthenticator

from conode.cluster.keys import KeyPair
from conode.cluster.protocol import MAX_FRAME_BYTES
from conode.errors import ConodeError

log = logging.getLogger(__name__)

# Frames up to twice our message limit get through to the decoder, which answers them with an error; a
# larger one makes ZeroMQ drop the connection, a last defence against memory exhaustion.
SOCKET_MAX_MESSAGE = 2 * MAX_FRAME_BYTES + 4096
_NOBLOCK = int(zmq.NOBLOCK)  # plain ints: the flags as enums cost a conversion on every call
_NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)


class _KeyCheck:
    """ZAP credentials provider: asks *is_allowed* about every connecting public key.

    Counts refusals and logs each refused key once: a refused client retries its handshake on its own.
    """

    def __init__(self, is_allowed: Callable[[str], bool]) -> None:
        self._is_allowed = is_allowed
        self.refused = 0
        self._logged: set[str] = set()

    def callback(self, domain: str, key: bytes) -> bool:
        try:
            allowed = self._is_allowed(key.decode("ascii"))
        except Exception:  # a broken check must refuse, never crash the authenticator thread
            log.exception("key check failed")
            return False
        if not allowed:
            self.refused += 1
            text = key.decode("ascii", "replace")
            if text not in self._logged and len(self._logged) < 1024:
                self._logged.add(text)
                log.warning("refused connection from unenrolled key %s (logged once per key)", text)
        return allowed


def bind_curve_server(context: zmq.Context, kind: int, bind: str, keys: KeyPair, credentials: object,
                      max_message: int, purpose: str,
                      options: tuple[tuple[int, int], ...] = ()) -> tuple[zmq.Socket, ThreadAuthenticator]:
    """A CURVE server socket of *kind* bound at *bind* with a ZAP handler of its own that admits the keys
    *credentials* accepts (a pyzmq credentials provider); ConodeError naming *purpose* (e.g. "for a migration ")
    when it cannot bind, with nothing left running."""
    auth = ThreadAuthenticator(context, log=logging.getLogger("conode.zap"))
    auth.start()
    auth.configure_curve_callback("*", credentials_provider=credentials)
    sock = context.socket(kind)
    sock.curve_server = True
    sock.curve_publickey = keys.public.encode()
    sock.curve_secretkey = keys.secret.encode()
    sock.setsockopt(zmq.MAXMSGSIZE, max_message)
    for option, value in options:
        sock.setsockopt(option, value)
    sock.linger = 0
    try:
        sock.bind(bind)
    except zmq.ZMQError as exc:
        sock.close()
        auth.stop()
        raise ConodeError(f"cannot listen {purpose}on {bind}: {exc}") from None
    return sock, auth


class ServerSocket:
    """A ROUTER that admits only the keys *is_allowed* accepts: the coordinator's, and each conet switch's."""

    def __init__(self, context: zmq.Context, bind: str, keys: KeyPair, is_allowed: Callable[[str], bool],
                 max_message: int = SOCKET_MAX_MESSAGE, send_hwm: int = 10_000) -> None:
        self._check = _KeyCheck(is_allowed)
        sock, self._auth = bind_curve_server(
            context, zmq.ROUTER, bind, keys, self._check, max_message, "",
            # sending to a vanished peer raises instead of vanishing
            options=((zmq.ROUTER_MANDATORY, 1), (zmq.SNDHWM, send_hwm)))
        self.socket = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)

    @property
    def refused(self) -> int:
        """How many handshakes the key check has refused."""
        return self._check.refused

    def receive_nowait(self) -> tuple[bytes, str, bytes] | None:
        """(peer identity, sender public key, payload) of a waiting message, or None if it was not 2 frames.

        Raises zmq.Again when nothing is waiting. Frame by frame rather than recv_multipart, which asks the socket
        for each frame's "more" flag through getsockopt: this is the coordinator's path for every heartbeat. The
        identity comes as plain bytes (a ROUTER always follows it with the peer's frames); only the payload is
        taken as a frame, which carries the sender's key.
        """
        sock = self.socket
        identity = sock.recv(_NOBLOCK)
        payload = sock.recv(_NOBLOCK, copy=False)
        if payload.more:  # more than 2 frames: not a message of ours; take the rest of it off the socket
            while sock.recv(_NOBLOCK, copy=False).more:
                pass
            return None
        key = payload.get("User-Id") or ""
        return identity, key, payload.bytes

    def send(self, identity: bytes, payload: bytes) -> bool:
        """Send to a peer; False if it is gone (ROUTER_MANDATORY) or not keeping up (both are decided on the
        identity frame, so the payload frame always follows it)."""
        try:
            self.socket.send(identity, _NOBLOCK_MORE)
            self.socket.send(payload, _NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            if exc.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                return False
            raise

    def close(self) -> None:
        self.socket.close(linger=0)
        self._auth.stop()


# A handshake that fails without the server refusing our key: the server could not read our HELLO, which CURVE
# sealed to the server key we were given. A wrong coordinator key, or not a coordinator at that address.
HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL


def handshake_problem(endpoint: str) -> str:
    return (f"the encrypted handshake with {endpoint} fails: the coordinator key given is most likely wrong "
            f"(use the one `coordinator init` printed), or what listens there is not this pool's coordinator")


class AuthRefused(Exception):
    """The server refused our key during the CURVE handshake."""


class ClientSocket:
    """A DEALER connected to the coordinator; rebuilt from scratch on reconnect (Paranoid Pirate)."""

    def __init__(self, context: zmq.Context, endpoint: str, server_public: str, keys: KeyPair,
                 max_message: int = SOCKET_MAX_MESSAGE, send_hwm: int = 1000, heartbeat_ms: int = 0,
                 tcp_timeout_ms: int = 0, log_problems: bool = False) -> None:
        """*heartbeat_ms* (0: none): ZMTP pings at this interval, and a connection silent for three of them is
        dropped, so a path that goes quiet shows as down (``up``) instead of holding frames forever.
        *tcp_timeout_ms* (0: the system's): a connection whose sent data stays unacknowledged this long is dropped
        (TCP_USER_TIMEOUT): the same for a path that goes quiet while we send, at no cost to the peer.
        *log_problems*: log :attr:`problem` when it appears (a daemon's log; a CLI reports it as its error)."""
        self._context = context
        self._log_problems = log_problems
        self._max_message, self._send_hwm, self._heartbeat_ms = max_message, send_hwm, heartbeat_ms
        self._tcp_timeout_ms = tcp_timeout_ms
        self.endpoint = endpoint
        self._server_public = server_public
        self._keys = keys
        self.socket: zmq.Socket = None  # type: ignore[assignment]
        self._monitor: zmq.Socket = None  # type: ignore[assignment]
        self.up = False  # whether the connection is established (as of the last check_refused)
        self.problem: str | None = None  # why the handshake fails, while it does
        self.connect()

    def connect(self) -> None:
        sock = self._context.socket(zmq.DEALER)
        sock.curve_serverkey = self._server_public.encode()
        sock.curve_publickey = self._keys.public.encode()
        sock.curve_secretkey = self._keys.secret.encode()
        sock.setsockopt(zmq.MAXMSGSIZE, self._max_message)
        sock.setsockopt(zmq.SNDHWM, self._send_hwm)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing for a connection that is not up
        if self._heartbeat_ms:
            sock.setsockopt(zmq.HEARTBEAT_IVL, self._heartbeat_ms)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * self._heartbeat_ms)
        if self._tcp_timeout_ms:
            sock.setsockopt(zmq.TCP_MAXRT, self._tcp_timeout_ms)
        sock.linger = 0
        self._monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED
                                                | zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILED)
        sock.connect(self.endpoint)
        self.socket = sock
        self.up = False

    def reconnect(self) -> None:
        self.close()
        self.connect()

    def check_refused(self) -> None:
        """Raise AuthRefused if the server rejected our key since the last check; bring ``up`` up to date and
        keep :attr:`problem` current (logged once each time it appears), as ZeroMQ retries a failing handshake on
        its own and silently."""
        from zmq.utils.monitor import recv_monitor_message

        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.up = False
                raise AuthRefused(self.endpoint)
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.up = True
                self.problem = None
            elif event == zmq.EVENT_DISCONNECTED:
                self.up = False
            elif event & HANDSHAKE_FAILED and self.problem is None:
                self.problem = handshake_problem(self.endpoint)
                if self._log_problems:
                    log.error("%s", self.problem)

    def send(self, payload: bytes) -> bool:
        try:
            self.socket.send(payload, flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def close(self) -> None:
        if self.socket is not None:
            self.socket.disable_monitor()
            self._monitor.close(linger=0)
            self.socket.close(linger=0)
            self.socket = None  # type: ignore[assignment]
