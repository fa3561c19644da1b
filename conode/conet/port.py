"""The worker's end of a conet port: a guest's NIC joined to its agent's switch.

The agent gives the worker a Unix ``SOCK_SEQPACKET`` socket path and a 16-byte token for the guest. The port
connects, sends one datagram ``msgpack {"token": token}``, and from then on every datagram either way is one
conet frame (a 12-byte virtio_net_hdr_v1 and an Ethernet frame, at most CONET_MAX_FRAME bytes).

Neither side ever blocks the other. Frames the guest sends leave on the machine thread with a non-blocking
send; a full socket drops the frame (counted). A reader thread takes frames from the switch into a bounded
queue and asks the machine, once per batch, to hand them to the NIC between slices (``call_soon``): the guest
is interrupted at most once per batch, and a guest that does not read costs the worker a bounded queue. While
the guest idles, the machine thread waits on the socket itself (``watch``) and takes the frames straight from
it: a frame for an idle guest then costs the host one thread wake-up, not two (the reader's, then the
machine's), which is most of a round trip's time on a busy host. Both take frames from the socket under one
lock, and only the machine thread hands them to the NIC, in the order they came. When the switch goes away the
port unplugs the NIC: its link goes down and further frames are dropped.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
from collections import Counter, deque
from collections.abc import Callable
from typing import Protocol

import msgpack

from conode.errors import ConodeError
from conode.limits import CONET_MAX_FRAME, CONET_VNET_HDR

log = logging.getLogger(__name__)

TOKEN_BYTES = 16
MIN_FRAME = CONET_VNET_HDR + 14
QUEUE_FRAMES = 512  # frames from the switch not yet handed to the NIC
SOCKET_BUFFER = 4 << 20  # asked of the kernel for each direction (it caps it at its own maximum)


Watch = Callable[[int, "Callable[[], None] | None"], None]  # CoMachine.watch: serve an fd while idle, or stop


def hung_up(sock: socket.socket) -> bool:
    """Whether the other end of a SEQPACKET socket has closed (a read of 0 bytes is EOF or an empty datagram)."""
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP)
    return any(events & (select.POLLHUP | select.POLLRDHUP) for _, events in poller.poll(0))


class PortError(ConodeError):
    """The worker cannot join its guest to the conet switch."""


class NetInterface(Protocol):
    """What a port needs of a NIC: frames to deliver, and the cable to plug in or pull."""

    def deliver(self, frame: bytes) -> bool: ...

    def connect(self, backend: Port | None) -> None: ...


class Port:
    """One guest's port to the switch at *path*; plug it into *nic* with :meth:`attach`."""

    def __init__(self, path: str, token: bytes) -> None:
        if not isinstance(token, bytes) or len(token) != TOKEN_BYTES:
            raise PortError(f"a conet port token has {TOKEN_BYTES} bytes; the agent sent another")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            sock.connect(path)
            sock.send(msgpack.packb({"token": token}, use_bin_type=True))
        except OSError as exc:
            sock.close()
            raise PortError(f"cannot join the conet switch at {path} ({exc.strerror or exc}); the guest runs "
                            f"without network: check that the agent's switch is running") from None
        self._sock = sock
        self.path = path
        self.counters: Counter[str] = Counter()  # tx_frames, rx_frames
        self.dropped: Counter[str] = Counter()  # by reason
        self._inbox: deque[bytes] = deque()
        self._lock = threading.Lock()
        self._flush_scheduled = False
        self._closed = False
        self._nic: NetInterface | None = None
        self._schedule: Callable[[Callable[[], None]], None] = lambda fn: None
        self._watch: Watch | None = None
        self._reader: threading.Thread | None = None
        self._buffer = bytearray(CONET_MAX_FRAME + 1)  # a longer datagram is cut to this and recognised as too long
        self._view = memoryview(self._buffer)

    def attach(self, nic: NetInterface, schedule: Callable[[Callable[[], None]], None],
               watch: Watch | None = None) -> None:
        """Plug *nic* in (call on the machine thread); *schedule* runs a function there (``call_soon``), and
        *watch*, if given, has the machine thread serve the socket itself while the guest idles."""
        self._nic = nic
        self._schedule = schedule
        nic.connect(self)
        self._reader = threading.Thread(target=self._read, name=f"conet port {self.path}", daemon=True)
        self._reader.start()
        if watch is not None:
            self._watch = watch
            watch(self._sock.fileno(), self._serve)

    # --- guest -> switch (machine thread) ---------------------------------------------------------------------
    def send(self, frame: bytes) -> None:
        if self._closed:
            return
        try:
            self._sock.send(frame, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            self._drop("switch socket full")
            return
        except OSError as exc:
            self._drop("switch gone", str(exc))
            return
        self.counters["tx_frames"] += 1

    # --- switch -> guest ------------------------------------------------------------------------------------
    def _read(self) -> None:
        """The reader thread: wait until the switch sends, take what came, have the machine thread hand it over."""
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        while True:
            poller.poll()  # POLLHUP and POLLERR come unasked
            with self._lock:
                ended = self._take()
                schedule = bool(self._inbox) and not self._flush_scheduled
                self._flush_scheduled |= schedule
            if schedule:
                self._schedule(self._flush)
            if ended is not None:
                break
        if not self._closed:
            log.warning("conet port %s: %s; the NIC's link is down", self.path, ended)
            self._schedule(self._unplug)

    def _serve(self) -> None:
        """On the machine thread, the guest idle and the socket readable: take the frames and hand them over."""
        with self._lock:
            if self._closed:
                return
            ended = self._take()
        if ended is not None and self._watch is not None:
            self._watch(self._sock.fileno(), None)  # the reader thread reports it and unplugs the NIC
        self._flush()

    def _take(self) -> str | None:
        """Move the datagrams waiting on the socket into the queue (holding the lock, without blocking); why the
        connection ended, or None while it stands. What is over the size bounds or the queue is dropped."""
        sock, buffer, view, inbox = self._sock, self._buffer, self._view, self._inbox
        for _ in range(QUEUE_FRAMES):  # a switch that never stops sending does not keep the lock
            try:
                size = sock.recv_into(buffer, 0, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as exc:
                return f"the switch connection failed ({exc})"
            if size == 0 and hung_up(sock):
                return "the switch closed the connection"
            if not MIN_FRAME <= size <= CONET_MAX_FRAME:
                self._drop("wrong size from the switch", f"{size} bytes")
            elif len(inbox) >= QUEUE_FRAMES:
                self._drop("queue to the guest full")
            else:
                inbox.append(bytes(view[:size]))
        return None

    def _flush(self) -> None:
        """On the machine thread: hand every queued frame to the NIC."""
        with self._lock:
            frames = list(self._inbox)
            self._inbox.clear()
            self._flush_scheduled = False
        nic = self._nic
        if nic is None:
            return
        for frame in frames:
            if nic.deliver(frame):
                self.counters["rx_frames"] += 1

    def _unplug(self) -> None:
        nic = self._nic
        if nic is not None:
            nic.connect(None)

    # --- end ----------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Leave the switch and stop the reader (from any thread); the NIC is not touched."""
        if self._closed:
            return
        self._closed = True
        if self._watch is not None:
            self._watch(self._sock.fileno(), None)
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the reader's recv
        except OSError:
            pass
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(5)
        self._sock.close()

    def _drop(self, reason: str, detail: str = "") -> None:
        """Count a dropped frame under *reason* (one of a fixed few); the first of each reason is logged."""
        if not self.dropped[reason]:
            log.warning("conet port %s dropped a frame: %s%s (counted; said once)", self.path, reason,
                        f" ({detail})" if detail else "")
        self.dropped[reason] += 1
