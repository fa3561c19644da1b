"""A virtio-net device (virtio 1.x, section 5.1): the guest's conet NIC, one receive and one transmit queue.

Frames leave and enter as *conet frames* — the 12-byte ``virtio_net_hdr_v1`` (the header a VERSION_1 driver
always uses, ``num_buffers`` included), then the Ethernet frame — so that checksum and segmentation offloads
travel end to end between conode guests and no host side ever computes a checksum or cuts a segment for them.
The receiving device makes each frame fit what its own driver negotiated: a partial checksum is finished in
software for a driver without GUEST_CSUM; a segmentation offload the driver did not take is dropped (its TCP
sender then falls back to smaller segments, as after any loss).

The device knows nothing of its transport or of the network: its backend (a :class:`NetBackend`, in a worker
the port to the agent's switch) takes what the guest sends, and :meth:`VirtioNet.deliver` hands it what the
network sends, through a bounded backlog that waits for the guest's receive buffers. Without a backend the
link is down and frames are dropped. Everything the guest writes is untrusted: a frame that is too short, too
long or whose header lies is dropped and counted; a broken ring stops its queue (queue.py). The device saves
no state of its own: the backlog is frames in flight, which a network may lose, and the link is the backend's.
"""

from __future__ import annotations

import logging
import struct
from collections import Counter, deque
from typing import Protocol

from conode.limits import CONET_MAX_FRAME, CONET_MTU, CONET_VNET_HDR
from conode.vm.devices.virtio.transport import Activation
from conode.vm.devices.virtio.queue import DescriptorChain, read_chain, write_chain

log = logging.getLogger(__name__)

VIRTIO_ID_NET = 1
RECEIVEQ, TRANSMITQ = 0, 1

# Feature bits (virtio 1.x, 5.1.3)
F_CSUM = 1 << 0  # the driver may hand the device partial checksums
F_GUEST_CSUM = 1 << 1  # the driver takes partial checksums
F_MTU = 1 << 3
F_MAC = 1 << 5
F_GUEST_TSO4 = 1 << 7  # the driver takes TCP/IPv4 segmentation offload frames
F_GUEST_ECN = 1 << 9  # ... with ECN (CWR) set
F_HOST_TSO4 = 1 << 11  # the driver may send TCP/IPv4 segmentation offload frames
F_HOST_ECN = 1 << 13
F_STATUS = 1 << 16  # the link status is in the configuration space
OFFERED = F_CSUM | F_GUEST_CSUM | F_MTU | F_MAC | F_GUEST_TSO4 | F_GUEST_ECN | F_HOST_TSO4 | F_HOST_ECN | F_STATUS

# virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers. The transport
# accepts only VERSION_1 drivers (mmio.py), and their header always has num_buffers: the legacy 10-byte header
# (a driver without VERSION_1 or mergeable buffers) never occurs.
HEADER = struct.Struct("<BBHHHHH")
assert HEADER.size == CONET_VNET_HDR
HDR_F_NEEDS_CSUM, HDR_F_DATA_VALID = 1, 2
GSO_NONE, GSO_TCPV4, GSO_ECN = 0, 1, 0x80
STATUS_LINK_UP = 1

ETH_HEADER = 14
MIN_FRAME = CONET_VNET_HDR + ETH_HEADER
MAX_PLAIN_FRAME = CONET_VNET_HDR + ETH_HEADER + CONET_MTU  # a frame without segmentation offload
PLACEHOLDER_MAC = bytes.fromhex("02c0de000000")  # locally administered; the job's identity replaces it

# Frames from the network that wait for the guest's receive buffers: a few TCP windows' worth.
RX_BACKLOG_FRAMES = 512
RX_BACKLOG_BYTES = 4 << 20


class NetBackend(Protocol):
    """Where the frames the guest sends go (a conet port). Called on the machine thread; must not block."""

    def send(self, frame: bytes) -> None: ...


def header_problem(frame: bytes) -> str | None:
    """Why the conet frame *frame* (at least MIN_FRAME bytes) cannot be carried, or None if it can."""
    flags, gso_type, _, gso_size, csum_start, csum_offset, _ = HEADER.unpack_from(frame)
    length = len(frame) - HEADER.size
    if flags & ~(HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID):
        return "unknown header flags"
    if flags & HDR_F_NEEDS_CSUM and csum_start + csum_offset + 2 > length:
        return "a partial checksum outside the frame"
    segmentation = gso_type & ~GSO_ECN
    if segmentation not in (GSO_NONE, GSO_TCPV4):
        return "an unsupported segmentation offload"
    if segmentation == GSO_NONE:
        if gso_type & GSO_ECN:
            return "ECN without segmentation offload"
        if len(frame) > MAX_PLAIN_FRAME:
            return "a frame over the MTU without segmentation offload"
    elif not flags & HDR_F_NEEDS_CSUM or gso_size == 0:
        return "segmentation offload without a partial checksum or a segment size"
    return None


def finish_checksum(frame: bytearray) -> None:
    """Compute the partial checksum of *frame* (valid per :func:`header_problem`, NEEDS_CSUM set) in place.

    The checksum field holds the pseudo-header's sum (how Linux hands out a partial checksum); the Internet
    checksum from csum_start to the end of the frame, field included, goes into it. Summing little-endian words
    gives the byte-swapped sum, which stored little-endian is the right bytes (RFC 1071, byte order independence).
    """
    _, _, _, _, csum_start, csum_offset, _ = HEADER.unpack_from(frame)
    start = HEADER.size + csum_start
    data = frame[start:]
    if len(data) & 1:
        data.append(0)
    total = sum(memoryview(data).cast("H"))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    struct.pack_into("<H", frame, start + csum_offset, ~total & 0xFFFF)


class VirtioNet:
    """The conet NIC of one guest; *mac* is what the driver reads at probe time (a job's identity replaces it)."""

    device_id = VIRTIO_ID_NET
    features = OFFERED
    num_queues = 2

    def __init__(self, mac: bytes = PLACEHOLDER_MAC) -> None:
        if len(mac) != 6:
            raise ValueError("a MAC address has 6 bytes")
        self.mac = bytes(mac)
        self.backend: NetBackend | None = None
        self._active: Activation | None = None
        self._backlog: deque[bytes] = deque()
        self._backlog_bytes = 0
        self.counters: Counter[str] = Counter()  # tx_frames, tx_bytes, tx_gso, rx_frames, rx_bytes, rx_gso
        self.dropped: Counter[str] = Counter()  # by reason

    # --- the link ------------------------------------------------------------------------------------------
    @property
    def link_up(self) -> bool:
        return self.backend is not None

    def connect(self, backend: NetBackend | None) -> None:
        """Plug the NIC into *backend* (link up), or unplug it (None: link down); the driver is told."""
        was_up = self.link_up
        self.backend = backend
        if backend is None:
            self._clear_backlog()
        active = self._active
        if was_up != self.link_up and active is not None and active.features & F_STATUS:
            active.signal_config()

    # --- the transport's calls ----------------------------------------------------------------------------
    def config_read(self, offset: int, size: int) -> int:
        # virtio_net_config: mac[6], status, max_virtqueue_pairs, mtu (u16 each)
        config = self.mac + struct.pack("<HHH", STATUS_LINK_UP if self.link_up else 0, 1, CONET_MTU)
        return int.from_bytes(config[offset:offset + size], "little")

    def activate(self, activation: Activation) -> None:
        self._active = activation
        self._fill_receive_buffers()

    def reset(self) -> None:
        self._active = None
        self._clear_backlog()

    def notify(self, queue_index: int) -> None:
        """The driver posted frames to send, or buffers to receive into."""
        (self._drain_transmit if queue_index == TRANSMITQ else self._fill_receive_buffers)()

    # --- guest -> network ----------------------------------------------------------------------------------
    def _drain_transmit(self) -> None:
        active = self._active
        queue = active.queues[TRANSMITQ] if active else None
        if active is None or queue is None:
            return
        sent = False
        while (chain := queue.pop()) is not None:
            frame = self._transmitted(active, chain)
            queue.push_used(chain.head, 0)
            sent = True
            backend = self.backend
            if frame is not None:
                if backend is None:
                    self.dropped["link down"] += 1  # no conet: silently, as a cable-less NIC would
                else:
                    backend.send(frame)
        if sent:
            active.signal_used(TRANSMITQ)

    def _transmitted(self, active: Activation, chain: DescriptorChain) -> bytes | None:
        """The conet frame in a transmit chain, or None (dropped and counted)."""
        size = chain.readable_bytes()
        if not MIN_FRAME <= size <= CONET_MAX_FRAME:
            self._drop("transmitted frame size", f"{size} bytes, not from {MIN_FRAME} to {CONET_MAX_FRAME}")
            return None
        frame = read_chain(active.memory, chain)
        problem = header_problem(frame) or self._unnegotiated(frame, active.features)
        if problem is not None:
            self._drop("transmitted frame header", problem)
            return None
        if frame[10:12] != b"\0\0":
            frame = frame[:10] + b"\0\0" + frame[12:]  # num_buffers is 0 on the wire
        counters = self.counters
        counters["tx_frames"] += 1
        counters["tx_bytes"] += size
        if frame[1]:
            counters["tx_gso"] += 1
        return frame

    @staticmethod
    def _unnegotiated(frame: bytes, features: int) -> str | None:
        """Offloads a transmitted frame uses that its driver did not negotiate."""
        flags, gso_type = frame[0], frame[1]
        if flags & HDR_F_NEEDS_CSUM and not features & F_CSUM:
            return "a partial checksum, not negotiated"
        if gso_type & ~GSO_ECN and not features & F_HOST_TSO4:
            return "segmentation offload, not negotiated"
        if gso_type & GSO_ECN and not features & F_HOST_ECN:
            return "ECN segmentation offload, not negotiated"
        return None

    # --- network -> guest ----------------------------------------------------------------------------------
    def deliver(self, frame: bytes) -> bool:
        """Take a conet frame from the network for the guest; False if it was dropped (counted)."""
        active = self._active
        if active is None or not self.link_up:
            self.dropped["no driver" if self.link_up else "link down"] += 1
            return False
        fitted = self._fit(frame, active.features)
        if fitted is None:
            return False
        if len(self._backlog) >= RX_BACKLOG_FRAMES or self._backlog_bytes + len(fitted) > RX_BACKLOG_BYTES:
            self._drop("receive backlog full")
            return False
        self._backlog.append(fitted)
        self._backlog_bytes += len(fitted)
        self._fill_receive_buffers()
        return True

    def _fit(self, frame: bytes, features: int) -> bytes | None:
        """*frame* as this guest's driver can take it (header adapted), or None (dropped and counted)."""
        if not MIN_FRAME <= len(frame) <= CONET_MAX_FRAME:
            self._drop("received frame size", f"{len(frame)} bytes, not from {MIN_FRAME} to {CONET_MAX_FRAME}")
            return None
        problem = header_problem(frame)
        if problem is not None:
            self._drop("received frame header", problem)
            return None
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, _ = HEADER.unpack_from(frame)
        if gso_type:
            if not features & F_GUEST_TSO4 or not features & F_GUEST_CSUM or (
                    gso_type & GSO_ECN and not features & F_GUEST_ECN):
                self._drop("segmentation offload not negotiated")
                return None
        elif not features & F_GUEST_CSUM:
            fitted = bytearray(frame)
            if flags & HDR_F_NEEDS_CSUM:
                finish_checksum(fitted)
            HEADER.pack_into(fitted, 0, 0, 0, 0, 0, 0, 0, 1)
            return bytes(fitted)
        # num_buffers is 1: every frame takes one receive chain (no mergeable buffers)
        return HEADER.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, 1) + frame[HEADER.size:]

    def _fill_receive_buffers(self) -> None:
        active = self._active
        queue = active.queues[RECEIVEQ] if active else None
        if active is None or queue is None or not self._backlog:
            return
        delivered = False
        backlog, memory, counters = self._backlog, active.memory, self.counters
        while backlog and (chain := queue.pop()) is not None:
            frame = backlog.popleft()
            self._backlog_bytes -= len(frame)
            room = sum(b.length for b in chain.writable())
            if len(frame) > room:  # handed back empty: the driver counts a length error and re-posts it
                self._drop("receive buffer too small", f"{len(frame)} bytes for {room}")
                queue.push_used(chain.head, 0)
            else:
                queue.push_used(chain.head, write_chain(memory, chain, frame))
                counters["rx_frames"] += 1
                counters["rx_bytes"] += len(frame)
                if frame[1]:
                    counters["rx_gso"] += 1
            delivered = True
        if delivered:
            active.signal_used(RECEIVEQ)

    def _clear_backlog(self) -> None:
        self._backlog.clear()
        self._backlog_bytes = 0

    @property
    def backlog(self) -> int:
        """Frames waiting for the guest's receive buffers."""
        return len(self._backlog)

    def _drop(self, reason: str, detail: str = "") -> None:
        """Count a dropped frame under *reason* (one of a fixed few); the first of each reason is logged."""
        if not self.dropped[reason]:
            log.warning("conet NIC dropped a frame: %s%s (counted; said once)", reason,
                        f" ({detail})" if detail else "")
        self.dropped[reason] += 1
