"""The per-agent conet switch process: ``python -m conode.conet.switchd --ports PATH --listen URL --keys DIR``.

It moves frames; switch.py decides where. Three kinds of party, one poll loop (zmq.Poller waits on plain file
descriptors too, on POSIX):

- **The agent**, on stdin/stdout with conode.agent.pipe framing: ``port`` {token, mac, ip, network, guest},
  ``unport`` {token}, ``peers`` {peers: [{agent, endpoint, key, networks (optional: the networks it shares
  with us; absent: all)}], relay: {endpoint, key} (optional)},
  ``stats`` {}, ``quit`` {}; the switch answers ``ready`` {endpoint} once listening and ``stats`` when asked:
  {ports: {guest: counts}, peers: {agent: counts}, dropped: {reason: count}, relay: {endpoint, connected}},
  where counts are rx/tx frames and bytes (rx: from it), its drops by reason, for a port whether its worker is
  connected and how many frames wait for it, and for a peer whether its frames go by the relay and how many
  did. A malformed request is logged and ignored. The switch exits when its stdin closes: its agent is gone.
- **Ports**, the agent's guest workers, on a Unix SOCK_SEQPACKET socket at PATH: a worker connects and sends
  ``msgpack {"token": <16 bytes>}``, then each datagram either way is one conet frame. An unknown token closes
  the connection. A port whose rate bucket runs dry is not read until it refills, so its own socket fills and
  its worker drops: a flooding guest costs this process no more than its rate.
- **Peers**, the other agents' switches: a ROUTER bound on URL as a CURVE server with this agent's key pair
  admits only the current peers' keys; one DEALER per peer carries our frames to it, [network, frame, ...]
  (the frames one port sent in one turn, up to PEER_BATCH_*), with a bounded queue and nothing queued while it
  is unreachable. A DEALER whose connection has not been up for CONET_RELAY_AFTER_S (it never came up, or
  its ZMTP heartbeats went unanswered) sends by **the coordinator's relay** instead (coordinator/relay.py), one
  DEALER with the coordinator's key as server key: to it [peer key, network, frame, ...], from it [sender key,
  network, frame, ...], where keys are Z85 text; a lone empty part says "here I am" (sent every
  HOUSEKEEPING_S, so the relay knows where to reach this switch). Frames from the relay pass the same policy as
  a peer's own; the direct link keeps trying and takes over again as soon as it is up.

Frames are conet frames as frames.py reads them: plain ones up to the MTU, GSO ones up to 64 KiB, which pass
whole, to peers as well; the receiving NIC cuts them to what its guest takes.

Nothing here waits for one party: every socket is non-blocking, a destination that cannot take a frame gets it
queued (bounded) or dropped and counted, and each source is read in bounded batches in turn.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import msgpack
import zmq

from conode.agent.pipe import PipeError, Unpacker, pack
from conode.agent.settings import AGENT_KEY_NAME
from conode.cluster.keys import KeyPair, is_valid_public_key, load_key_pair
from conode.cluster.transport import AuthRefused, ClientSocket, ServerSocket
from conode.conet.frames import OVERSIZED
from conode.conet.port import TOKEN_BYTES, hung_up
from conode.conet.switch import QUEUE_FULL, Limits, Peer, Port, Switch, SwitchError
from conode.errors import ConodeError
from conode.limits import (
    CONET_MAX_FRAME,
    CONET_PEER_QUEUE_BYTES,
    CONET_PORT_BYTES_PER_S,
    CONET_PORT_FRAMES_PER_S,
    CONET_PORT_QUEUE_BYTES,
    CONET_MAX_PORTS,
    CONET_RELAY_AFTER_S,
    MAX_SMALL_FIELD,
)

log = logging.getLogger("conode.conet")

BATCH = 64  # datagrams read from one port before the others get their turn
PEER_MESSAGES_PER_TURN = 16  # messages (each up to PEER_BATCH_FRAMES frames) read from the ROUTER per turn
MAX_PENDING = 64  # connections that have not sent their token yet
TOKEN_TIMEOUT_S = 5.0
HOUSEKEEPING_S = 1.0
MIN_PAUSE_S = 0.002  # a rate-limited port waits at least this long: fewer, larger bites
MAX_PEER_MESSAGE = CONET_MAX_FRAME + 256  # one part: a network name (at most 255 bytes) or a frame
# Frames for one peer read in one turn leave in one message of at most about this much (more start another):
# ZeroMQ's cost is mostly per message, so a busy link costs several times less CPU per frame.
PEER_BATCH_FRAMES = 64
PEER_BATCH_BYTES = 128 << 10
PEER_HEARTBEAT_MS = 1000  # ZMTP pings on peer links: three unanswered and the link counts as down
MAX_NETWORK_NAME = 255
RELAY_HELLO = b""  # a relay message of this one part: "here I am"

_ENDPOINT = re.compile(r"tcp://(?:\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})")

# Drop reasons of I/O.
PORT_GONE = "port-not-connected"
PEER_BUSY = "peer-unreachable-or-full"
BAD_PEER_MESSAGE = "bad-peer-message"
BAD_TOKEN = "unknown-token"
REFUSED = "refused-handshake"


class ControlError(ConodeError):
    """A control request from the agent is malformed."""


class SwitchDaemon:
    """One agent's switch: its guests' ports, its peer links, and the loop that moves frames between them."""

    def __init__(self, ports_path: Path, listen: str, keys: KeyPair, out_fd: int, in_fd: int,
                 limits: Limits | None = None) -> None:
        self.switch = Switch(limits)
        self._keys = keys
        self._out_fd, self._in_fd = out_fd, in_fd
        self._unpacker = Unpacker()
        self._context = zmq.Context()
        self._poller = zmq.Poller()
        self._handlers: dict[Any, Callable[[int], None]] = {}
        self._flags: dict[Any, int] = {}
        self._buffer = bytearray(CONET_MAX_FRAME + 1)  # one byte more: a longer datagram shows as oversized
        self._view = memoryview(self._buffer)
        self._pending: dict[int, tuple[socket.socket, float]] = {}  # fd -> connection awaiting its token
        # Connections whose token the agent has not registered yet: the agent tells the switch and the worker at
        # once, on two pipes, so a worker may come first; it waits (as pending) for its port, up to the timeout.
        self._early: dict[bytes, int] = {}  # token -> fd of its pending connection
        self._paused: dict[Port, float] = {}  # rate-limited ports -> when they may be read again
        self._refusing: set[str] = set()  # peers that refused our key (logged once)
        self.relay: ClientSocket | None = None  # the coordinator's relay, when the agent named one
        self._relay_key = ""
        self._running = True
        self._ports_path = ports_path
        self._listener = self._listen_ports(ports_path)
        try:
            self.server = ServerSocket(self._context, listen, keys, self.switch.peers.__contains__,
                                       max_message=MAX_PEER_MESSAGE)
        except ConodeError:
            self._listener.close()
            ports_path.unlink(missing_ok=True)
            self._context.term()
            raise
        self._watch(self._in_fd, zmq.POLLIN, self._on_control)
        self._watch(self._listener.fileno(), zmq.POLLIN, self._on_connection)
        self._watch(self.server.socket, zmq.POLLIN, self._on_peers)

    @staticmethod
    def _listen_ports(path: Path) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            if path.is_socket():
                path.unlink()  # left by a switch that died
            old_umask = os.umask(0o077)  # only this user's workers may connect
            try:
                sock.bind(str(path))
            finally:
                os.umask(old_umask)
            sock.listen(MAX_PENDING)
        except OSError as exc:
            sock.close()
            raise ConodeError(f"cannot listen for guest ports at {path}: {exc.strerror}; "
                              "check that its directory exists and is writable") from None
        sock.setblocking(False)
        return sock

    # --- the poll loop ------------------------------------------------------------------------------------
    def _watch(self, target: Any, flags: int, handler: Callable[[int], None] | None = None) -> None:
        """Poll *target* for *flags* (0: not at all) and call *handler* with the events that come."""
        if handler is not None:
            self._handlers[target] = handler
        if self._flags.get(target, 0) == flags:
            return
        if flags:
            self._poller.register(target, flags)
            self._flags[target] = flags
        else:
            self._poller.unregister(target)
            del self._flags[target]

    def _forget(self, target: Any) -> None:
        self._watch(target, 0)
        self._handlers.pop(target, None)

    def run(self) -> int:
        self._send({"type": "ready", "endpoint": self.server.endpoint})
        next_chores = time.monotonic() + HOUSEKEEPING_S
        try:
            while self._running:
                now = time.monotonic()
                wake = min([next_chores, *self._paused.values()])
                events = self._poller.poll(max(0, int((wake - now) * 1000) + 1))
                for target, flags in sorted(events, key=lambda event: event[0] != self._in_fd):
                    handler = self._handlers.get(target)
                    if handler is not None:
                        handler(flags)
                    if not self._running:
                        break
                now = time.monotonic()
                if self._paused:
                    self._resume_ports(now)
                if now >= next_chores:
                    self._chores(now)
                    next_chores = now + HOUSEKEEPING_S
        finally:
            self.close()
        return 0

    def _chores(self, now: float) -> None:
        self.switch.age()
        for fd, (sock, deadline) in list(self._pending.items()):
            if now >= deadline:
                self._drop_pending(fd, sock)
        for peer in self.switch.peers.values():
            try:
                peer.link.check_refused()
            except AuthRefused:  # ZeroMQ gives up on a refused handshake; the peer may not know us yet
                if peer.key not in self._refusing:
                    self._refusing.add(peer.key)
                    log.warning("conet: peer %s at %s refused our key; retrying every %.0f s (logged once)",
                                peer.name, peer.endpoint, HOUSEKEEPING_S)
                peer.link.reconnect()
            self._choose_route(peer, now)
        if self.relay is not None:
            try:
                self.relay.check_refused()
            except AuthRefused:
                log.warning("conet: the relay at %s refused our key; retrying", self.relay.endpoint)
                self._forget(self.relay.socket)
                self.relay.reconnect()
                self._watch_relay()
            self._hello_relay()

    def _choose_route(self, peer: Peer, now: float) -> None:
        """Straight to *peer* while its link is up; by the relay once it has been down CONET_RELAY_AFTER_S."""
        if peer.link.up:
            peer.down_since = None
            if peer.relayed:
                peer.relayed = False
                log.info("conet: peer %s is reachable again; its frames go straight to it", peer.name)
            return
        if peer.down_since is None:
            peer.down_since = now
        relay = self.relay is not None
        if relay and not peer.relayed and now - peer.down_since >= CONET_RELAY_AFTER_S:
            peer.relayed = True
            log.warning("conet: peer %s at %s unreachable for %.0f s; its frames go by the coordinator's relay",
                        peer.name, peer.endpoint, now - peer.down_since)
        elif peer.relayed and not relay:
            peer.relayed = False

    def close(self) -> None:
        for port in self.switch.ports.values():
            if port.link is not None:
                port.link.close()
        for sock, _ in self._pending.values():
            sock.close()
        for peer in self.switch.peers.values():
            peer.link.close()
        if self.relay is not None:
            self.relay.close()
        self._listener.close()
        self._ports_path.unlink(missing_ok=True)
        self.server.close()
        self._context.term()

    # --- the agent ------------------------------------------------------------------------------------------
    def _send(self, message: dict[str, Any]) -> None:
        data = pack(message)
        while data:
            data = data[os.write(self._out_fd, data):]

    def _on_control(self, _flags: int) -> None:
        data = os.read(self._in_fd, 1 << 16)
        if not data:
            log.info("conet: the agent closed the control pipe; stopping")
            self._running = False
            return
        try:
            messages = self._unpacker.feed(data)
        except PipeError as exc:
            log.error("conet: %s; stopping", exc)  # the stream cannot be resynchronised
            self._running = False
            return
        for message in messages:
            try:
                self._control(message)
            except (ControlError, SwitchError) as exc:
                log.error("conet: ignored %s request: %s", str(message.get("type"))[:40], exc)

    def _control(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "port":
            token = _field(message, "token", bytes)
            mac = _field(message, "mac", bytes)
            ip, network, guest = (_field(message, name, str) for name in ("ip", "network", "guest"))
            port = self.switch.add_port(token, network, mac, ip, guest)
            log.info("conet: port for guest %s in network %s (%s, %s)", guest, network, mac.hex(":"), ip)
            early = self._early.pop(token, None)
            if early is not None and early in self._pending:
                self._plug(port, early, self._pending[early][0])
            elif port.link is not None:
                self._watch_port(port)
        elif kind == "unport":
            token = _field(message, "token", bytes)
            leaving = self.switch.ports.get(token)
            if leaving is not None and leaving.link is not None:
                # What the guest sent before its job ended is delivered first (its last segments, a FIN): the
                # agent's word to unplug it may overtake frames still queued on the port's socket.
                self._read_port(leaving, 0)
            removed = self.switch.remove_port(token)
            if removed is not None:
                self._disconnect(removed)
        elif kind == "peers":
            self._set_relay(message.get("relay"))
            self._set_peers(message.get("peers"))
        elif kind == "stats":
            stats = self.switch.stats()
            refused = self.server.refused
            if refused:
                stats["dropped"][REFUSED] = refused
            relay = self.relay
            stats["relay"] = {"endpoint": relay.endpoint if relay else None, "connected": bool(relay and relay.up)}
            self._send({"type": "stats", **stats})
        elif kind == "quit":
            self._running = False
        else:
            raise ControlError(f"unknown request type {str(kind)[:40]!r}")

    def _set_peers(self, entries: Any) -> None:
        if not isinstance(entries, list):
            raise ControlError("peers must be a list")
        peers, networks = [], {}
        for entry in entries:
            if not isinstance(entry, dict):
                raise ControlError("each peer must be a map")
            agent, endpoint, key = (_field(entry, name, str) for name in ("agent", "endpoint", "key"))
            if "networks" in entry:
                named = entry["networks"]
                if not (isinstance(named, list) and len(named) <= CONET_MAX_PORTS
                        and all(isinstance(n, str) and len(n) <= MAX_NETWORK_NAME for n in named)):
                    raise ControlError(f"peer {agent}'s networks must be a list of network names")
                networks[key] = named
            if not is_valid_public_key(key):
                raise ControlError(f"peer {agent}'s key is not a Z85 public key")
            match = _ENDPOINT.fullmatch(endpoint)
            if match is None or not 0 < int(match[1]) < 65536:
                raise ControlError(f"peer {agent}'s endpoint {endpoint!r} is not tcp://HOST:PORT")
            if key != self._keys.public:  # a directory may list this agent too
                peers.append((agent, endpoint, key))
        added, removed = self.switch.set_peers(peers, networks)
        for peer in removed:
            peer.link.close()
            self._refusing.discard(peer.key)
        unusable = []
        for peer in added:
            try:
                peer.link = self._dealer(peer.endpoint, peer.key)
            except zmq.ZMQError as exc:
                log.error("conet: ignored peer %s: cannot connect to %s: %s", peer.name, peer.endpoint, exc)
                unusable.append(peer.key)
        if unusable:
            self.switch.set_peers([entry for entry in peers if entry[2] not in unusable], networks)
        if added or removed:
            log.info("conet: %d peers (%d new, %d gone)", len(self.switch.peers), len(added), len(removed))

    def _dealer(self, endpoint: str, server_key: str) -> ClientSocket:
        return ClientSocket(self._context, endpoint, server_key, self._keys, max_message=MAX_PEER_MESSAGE,
                            send_hwm=CONET_PEER_QUEUE_BYTES // PEER_BATCH_BYTES, heartbeat_ms=PEER_HEARTBEAT_MS)

    def _set_relay(self, entry: Any) -> None:
        """Connect to the relay the agent names (None: there is none), unless already connected to it."""
        if entry is not None:
            if not isinstance(entry, dict):
                raise ControlError("relay must be a map")
            endpoint, key = _field(entry, "endpoint", str), _field(entry, "key", str)
            if not is_valid_public_key(key):
                raise ControlError("the relay's key is not a Z85 public key")
            if _ENDPOINT.fullmatch(endpoint) is None:
                raise ControlError(f"the relay's endpoint {endpoint!r} is not tcp://HOST:PORT")
            if self.relay is not None and (self.relay.endpoint, self._relay_key) == (endpoint, key):
                return
        if self.relay is not None:
            self._forget(self.relay.socket)
            self.relay.close()
            self.relay = None
        if entry is None:
            return
        try:
            self.relay = self._dealer(endpoint, key)
        except zmq.ZMQError as exc:
            raise ControlError(f"cannot connect to the relay at {endpoint}: {exc}") from None
        self._relay_key = key
        self._watch_relay()
        self._hello_relay()
        log.info("conet: the coordinator's relay is at %s", endpoint)

    def _watch_relay(self) -> None:
        self._watch(self.relay.socket, zmq.POLLIN, self._on_relay)  # type: ignore[union-attr]

    def _hello_relay(self) -> None:
        try:
            self.relay.socket.send(RELAY_HELLO, zmq.NOBLOCK)  # type: ignore[union-attr]
        except zmq.Again:
            pass  # not connected yet, or full: the next chores say it again

    # --- ports ----------------------------------------------------------------------------------------------
    def _on_connection(self, _flags: int) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("conet: accepting a port connection failed: %s", exc)
                return
            if len(self._pending) >= MAX_PENDING:
                sock.close()
                continue
            sock.setblocking(False)
            fd = sock.fileno()
            self._pending[fd] = (sock, time.monotonic() + TOKEN_TIMEOUT_S)
            self._watch(fd, zmq.POLLIN, partial(self._on_token, fd))

    def _on_token(self, fd: int, _flags: int) -> None:
        sock, _ = self._pending[fd]
        try:
            data = sock.recv(256)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        port, token = None, None
        try:
            hello = msgpack.unpackb(data, raw=False)
            if isinstance(hello, dict) and isinstance(hello.get("token"), bytes):
                token = hello["token"]
                port = self.switch.ports.get(token)
        except (ValueError, TypeError, msgpack.UnpackException):  # an undecodable greeting is as good as a wrong token
            port = None
        if port is None and token is not None and len(token) == TOKEN_BYTES and token not in self._early:
            self._early[token] = fd  # its port may be on its way from the agent
            self._forget(fd)
            return
        if port is None:
            self._count_bad_token()
            self._drop_pending(fd, sock)
            return
        self._plug(port, fd, sock)

    def _plug(self, port: Port, fd: int, sock: socket.socket) -> None:
        """Make the pending connection *fd* the port's link."""
        self._forget(fd)
        del self._pending[fd]
        if port.link is not None:
            self._disconnect(port)  # a restarted worker replaces its old connection
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CONET_PORT_QUEUE_BYTES)
        port.link = sock
        self._watch_port(port)
        log.info("conet: guest %s connected", port.name)

    def _drop_pending(self, fd: int, sock: socket.socket) -> None:
        self._forget(fd)
        del self._pending[fd]
        waited = {token for token, early in self._early.items() if early == fd}
        if waited:  # its port never came: a wrong token after all
            self._early = {token: early for token, early in self._early.items() if early != fd}
            self._count_bad_token()
        sock.close()

    def _count_bad_token(self) -> None:
        self.switch.dropped[BAD_TOKEN] = self.switch.dropped.get(BAD_TOKEN, 0) + 1
        if self.switch.dropped[BAD_TOKEN] == 1:
            log.warning("conet: closed a port connection with an unknown token (counted; logged once)")

    def _watch_port(self, port: Port) -> None:
        flags = (0 if port in self._paused else zmq.POLLIN) | (zmq.POLLOUT if port.queue else 0)
        self._watch(port.link.fileno(), flags, partial(self._on_port, port))

    def _disconnect(self, port: Port) -> None:
        """Close a port's connection (its worker went away, or the agent removed it)."""
        if port.link is None:
            return
        self._forget(port.link.fileno())
        port.link.close()
        port.link = None
        port.queue.clear()
        port.queued_bytes = 0
        self._paused.pop(port, None)

    def _resume_ports(self, now: float) -> None:
        for port, at in list(self._paused.items()):
            if now >= at:
                del self._paused[port]
                if port.link is not None:
                    self._watch_port(port)

    def _on_port(self, port: Port, events: int) -> None:
        if events & zmq.POLLOUT:
            self._flush(port)
        if events & zmq.POLLIN:
            self._read_port(port, events)

    def _read_port(self, port: Port, events: int) -> None:
        """Switch up to BATCH datagrams from *port* (the hot path); what goes to peers leaves in batches."""
        batches: dict[Peer, list[bytes]] = {}
        self._switch_port(port, events, batches)
        if batches:
            network = port.network.name
            for peer, frames in batches.items():
                self._to_peer(peer, network, frames)

    def _switch_port(self, port: Port, events: int, batches: dict[Peer, list[bytes]]) -> None:
        sock, buffer, view, switch = port.link, self._buffer, self._view, self.switch
        for _ in range(BATCH):
            try:
                size = sock.recv_into(buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                size = 0
                events |= zmq.POLLERR
            if size == 0 and (events & zmq.POLLERR or hung_up(sock)):  # else an empty datagram
                log.info("conet: guest %s disconnected", port.name)
                self._disconnect(port)
                return
            if size > CONET_MAX_FRAME:
                switch.drop(port, OVERSIZED)
                continue
            frame = view[:size]
            verdict = switch.from_port(port, frame)
            if not isinstance(verdict, str):
                ports, peers = verdict
                for dest in ports:
                    if dest is not port:
                        self._to_port(dest, frame)
                if peers:
                    data = bytes(frame)  # the buffer is reused by the next datagram
                    for peer in peers:
                        batch = batches.get(peer)
                        if batch is None:
                            batches[peer] = [data]
                        elif len(batch) < PEER_BATCH_FRAMES and size * (len(batch) + 1) <= PEER_BATCH_BYTES:
                            batch.append(data)
                        else:
                            self._to_peer(peer, port.network.name, batch)
                            batches[peer] = [data]
            if port.bucket.empty():  # read no more until it refills: the guest's own socket holds the rest
                self._paused[port] = max(port.bucket.ready_at(), time.monotonic() + MIN_PAUSE_S)
                self._watch_port(port)
                return

    def _to_port(self, port: Port, frame: memoryview) -> None:
        sock = port.link
        if sock is None:
            self.switch.drop(port, PORT_GONE)
            return
        if not port.queue:
            try:
                sock.send(frame)
                port.tx_frames += 1
                port.tx_bytes += len(frame)
                return
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self.switch.drop(port, PORT_GONE)
                return
        if port.enqueue(bytes(frame)):
            if not self._flags.get(sock.fileno(), 0) & zmq.POLLOUT:
                self._watch_port(port)
        else:
            self.switch.drop(port, QUEUE_FULL)

    def _flush(self, port: Port) -> None:
        sock = port.link
        while port.queue:
            frame = port.dequeue()
            try:
                sock.send(frame)
            except (BlockingIOError, InterruptedError):
                port.requeue(frame)
                return
            except OSError:
                self.switch.drop(port, PORT_GONE)
                continue
            port.tx_frames += 1
            port.tx_bytes += len(frame)
        self._watch_port(port)

    # --- peers ------------------------------------------------------------------------------------------------
    def _to_peer(self, peer: Peer, network: bytes, frames: list[bytes]) -> None:
        """One message [network, frame, frame, ...] to *peer* (by the relay: [its key, network, frame, ...]), or
        all its frames dropped and counted."""
        relayed = peer.relayed and self.relay is not None
        try:
            if relayed:
                self.relay.socket.send_multipart([peer.key.encode(), network, *frames],  # type: ignore[union-attr]
                                                 zmq.NOBLOCK, copy=False)
            else:
                peer.link.socket.send_multipart([network, *frames], zmq.NOBLOCK, copy=False)
        except zmq.Again:
            for _ in frames:
                self.switch.drop(peer, PEER_BUSY)
            return
        peer.tx_frames += len(frames)
        peer.tx_bytes += sum(map(len, frames))
        if relayed:
            peer.relayed_tx_frames += len(frames)

    def _on_peers(self, _flags: int) -> None:
        router = self.server.socket
        for _ in range(PEER_MESSAGES_PER_TURN):
            try:
                parts = router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(parts) < 3:
                self._bad_peer_message()
                continue
            self._deliver(parts[2].get("User-Id"), parts[1].bytes, parts[2:])

    def _on_relay(self, _flags: int) -> None:
        """Frames other switches sent us by the relay: [sender key, network, frame, ...]."""
        relay = self.relay
        for _ in range(PEER_MESSAGES_PER_TURN):
            if relay is None or relay is not self.relay:
                return
            try:
                parts = relay.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                key = parts[0].bytes.decode("ascii") if len(parts) >= 3 else None
            except UnicodeDecodeError:
                key = None
            if key is None:
                self._bad_peer_message()
                continue
            peer = self.switch.peers.get(key)
            if peer is not None:
                peer.relayed_rx_frames += len(parts) - 2
            self._deliver(key, parts[1].bytes, parts[2:])

    def _bad_peer_message(self) -> None:
        dropped = self.switch.dropped
        dropped[BAD_PEER_MESSAGE] = dropped.get(BAD_PEER_MESSAGE, 0) + 1

    def _deliver(self, key: str, network: bytes, parts: list[zmq.Frame]) -> None:
        """The frames a peer sent in one message, each through the policy to its ports."""
        switch = self.switch
        for part in parts:
            frame = part.buffer
            verdict = switch.from_peer(key, network, frame)
            if not isinstance(verdict, str):
                for dest in verdict[0]:
                    self._to_port(dest, frame)


def _field(message: dict[str, Any], name: str, kind: type[str | bytes]) -> Any:
    value = message.get(name)
    if not isinstance(value, kind):
        raise ControlError(f"field {name!r} must be {kind.__name__}")
    if len(value) > MAX_SMALL_FIELD:
        raise ControlError(f"field {name!r} is longer than {MAX_SMALL_FIELD}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conode-switchd", description="The agent's conet switch.")
    parser.add_argument("--ports", type=Path, required=True, help="Unix socket path for the guests' ports")
    parser.add_argument("--listen", required=True, help="ZeroMQ endpoint for peers, e.g. tcp://0.0.0.0:7010")
    parser.add_argument("--keys", type=Path, required=True, help="directory of the agent's CURVE key pair")
    parser.add_argument("--port-bytes-per-s", type=float, default=CONET_PORT_BYTES_PER_S,
                        help="what one guest may send, in bytes per second")
    parser.add_argument("--port-frames-per-s", type=float, default=CONET_PORT_FRAMES_PER_S,
                        help="what one guest may send, in frames per second")
    args = parser.parse_args(argv)
    if args.port_bytes_per_s <= 0 or args.port_frames_per_s <= 0:
        parser.error("rates must be positive")
    limits = Limits(port_bytes_per_s=args.port_bytes_per_s, port_frames_per_s=args.port_frames_per_s)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out_fd = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints must not corrupt the message stream
    try:
        daemon = SwitchDaemon(args.ports, args.listen, load_key_pair(args.keys, AGENT_KEY_NAME), out_fd,
                              sys.stdin.fileno(), limits)
        return daemon.run()
    except ConodeError as exc:
        print(f"conode-switchd: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
