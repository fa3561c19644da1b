"""What every virtio transport does, whatever the bus (virtio 1.x, sections 2 and 3).

A transport negotiates features, records where the driver put each queue, forwards notifications, owns the
interrupt status and line, and activates its device when the driver sets DRIVER_OK. The bus-specific part —
virtio-mmio registers (:mod:`.mmio`) or a virtio-pci function (:mod:`conode.vm.devices.pci.virtio_pci`) — only
decodes register accesses into the calls below. Devices never learn which transport carries them.

One device may be offered on two transports at once (virtio-mmio for conode's kernel, virtio-pci for a stock
kernel). A :class:`DeviceClaim` shared by those transports makes sure one backend is never driven by two
drivers: the first transport whose driver sets FEATURES_OK owns the device until that driver resets it; the
other transport refuses FEATURES_OK (the virtio way of saying "not this device": the driver sees the bit did
not stick and gives up cleanly), and its resets leave the device alone. FEATURES_OK, once accepted, stays set
until a reset, so the owner is derived from the saved status bits and needs no state of its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Protocol

from conode.errors import SnapshotError
from conode.vm import state
from conode.vm.devices.virtio.queue import GuestMemory, Virtqueue, layout_error
from conode.vm.state import bits, items, uint

log = logging.getLogger(__name__)

VIRTIO_F_VERSION_1 = 1 << 32
QUEUE_SIZE_MAX = 256  # a device's queues hold at most this many entries, unless it sets its own queue_size_max
MAX_QUEUES = 8  # more than any device here has

STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK = 1, 2, 4, 8
STATUS_NEEDS_RESET, STATUS_FAILED = 0x40, 0x80
INT_USED_BUFFER, INT_CONFIG_CHANGE = 1, 2

QUEUE_NUM, QUEUE_DESC, QUEUE_DRIVER, QUEUE_DEVICE = "num", "desc", "driver", "device"  # a queue's layout fields


class InterruptPin(Protocol):
    def set(self, level: bool) -> None: ...


@dataclass(frozen=True)
class Activation:
    """What a device gets when the driver sets DRIVER_OK: its queues (None where the driver set none up),
    guest memory, the negotiated features, the used-buffer interrupt and the configuration-change interrupt.
    Never the transport itself."""

    queues: list[Virtqueue | None]
    memory: GuestMemory
    features: int
    signal_used: Callable[[int], None]
    signal_config: Callable[[], None]


class VirtioDevice(Protocol):
    """A virtio device behind a transport."""

    device_id: int
    features: int  # offered feature bits (VIRTIO_F_VERSION_1 is added by the transport)
    num_queues: int
    # A device may also have queue_size_max: its queues' largest size (a power of two), if not QUEUE_SIZE_MAX.

    def config_read(self, offset: int, size: int) -> int: ...

    def activate(self, activation: Activation) -> None: ...

    def notify(self, queue_index: int) -> None: ...

    def reset(self) -> None: ...


class DeviceClaim:
    """Which of the transports offering one device drives it now (see the module docstring)."""

    def __init__(self) -> None:
        self.owner: object | None = None

    def take(self, transport: object) -> bool:
        if self.owner is None:
            self.owner = transport
        return self.owner is transport

    def release(self, transport: object) -> None:
        if self.owner is transport:
            self.owner = None


@dataclass(frozen=True)
class QueueState:
    num: int = uint(32)
    ready: bool
    desc: int = uint(32)  # a 32-bit guest: the high halves of ring addresses are always zero
    driver: int = uint(32)
    device: int = uint(32)
    next_avail: int = uint(16)
    next_used: int = uint(16)


@dataclass(frozen=True)
class VirtioTransportState(state.Record):
    KIND = "virtio transport"
    VERSION = 1

    status: int = uint(8)
    driver_features: int = uint(64)
    device_features_sel: int = uint(32)
    driver_features_sel: int = uint(32)
    queue_sel: int = uint(32)
    interrupt_status: int = bits(INT_USED_BUFFER | INT_CONFIG_CHANGE)
    queues: tuple[QueueState, ...] = items(max_len=MAX_QUEUES)


class _QueueConfig:
    """Where the driver put one queue; the Virtqueue is built from it when the driver makes it ready."""

    def __init__(self, num: int) -> None:
        self.num = num
        self.ready = False
        self.desc = 0
        self.driver = 0
        self.device = 0


class VirtioTransport:
    """The bus-independent half of a transport holding *device*; *claim* is shared with the device's other
    transports (a private one when there are none)."""

    def __init__(self, device: VirtioDevice, irq: InterruptPin, memory: GuestMemory,
                 claim: DeviceClaim | None = None) -> None:
        self.device = device
        self.memory = memory
        self._irq = irq
        self.claim = claim or DeviceClaim()
        self.queue_size_max: int = getattr(device, "queue_size_max", QUEUE_SIZE_MAX)
        self.queues: list[Virtqueue | None] = []
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        self._configs = [_QueueConfig(self.queue_size_max) for _ in range(self.device.num_queues)]
        self.queues = [None] * self.device.num_queues
        self._irq.set(False)

    @property
    def offered_features(self) -> int:
        return self.device.features | VIRTIO_F_VERSION_1

    @property
    def driver_ok(self) -> bool:
        return bool(self.status & STATUS_DRIVER_OK)

    @property
    def needs_reset(self) -> bool:
        return bool(self.status & STATUS_NEEDS_RESET)

    @property
    def live(self) -> bool:
        """The device is activated through this transport: notifications reach it."""
        return self.status & (STATUS_DRIVER_OK | STATUS_FEATURES_OK | STATUS_NEEDS_RESET) == \
            STATUS_DRIVER_OK | STATUS_FEATURES_OK

    @property
    def selected_queue(self) -> _QueueConfig | None:
        return self._configs[self.queue_sel] if self.queue_sel < len(self._configs) else None

    # --- interrupts and errors ----------------------------------------------------------------------------
    def signal_used(self, queue_index: int) -> None:
        """Tell the driver that *queue_index* has new used buffers, unless it asked not to be told."""
        queue = self.queues[queue_index]
        if queue is not None and not queue.broken and queue.interrupt_wanted():
            self.interrupt_status |= INT_USED_BUFFER
            self._irq.set(True)

    def signal_config(self) -> None:
        """Tell the driver that the device's configuration changed (a NIC's link came up or went down)."""
        if self.driver_ok and not self.needs_reset:
            self.interrupt_status |= INT_CONFIG_CHANGE
            self._irq.set(True)

    def acknowledge_interrupt(self, mask: int) -> None:
        self.interrupt_status &= ~mask
        self._irq.set(self.interrupt_status != 0)

    def _device_error(self, message: str) -> None:
        """The driver broke a rule: the device stops and asks for a reset (virtio 1.x, 2.1.2)."""
        if self.needs_reset:
            return  # said once; the driver has been told
        log.warning("virtio device %d stopped: %s; the guest driver must reset it", self.device.device_id, message)
        self.status |= STATUS_NEEDS_RESET
        if self.driver_ok:
            self.interrupt_status |= INT_CONFIG_CHANGE
            self._irq.set(True)

    def _make_queue(self, cfg: _QueueConfig, next_avail: int = 0, next_used: int = 0) -> Virtqueue | None:
        error = layout_error(self.memory.size, cfg.num, cfg.desc, cfg.driver, cfg.device, self.queue_size_max)
        if error is not None:
            self._device_error(error)
            return None
        return Virtqueue(self.memory, cfg.num, cfg.desc, cfg.driver, cfg.device, self._device_error,
                         next_avail, next_used)

    # --- the driver's requests, decoded by the bus-specific part ------------------------------------------
    def device_features_word(self) -> int:
        """The 32 offered feature bits the driver selected."""
        sel = self.device_features_sel
        return (self.offered_features >> (32 * sel)) & 0xFFFFFFFF if sel < 2 else 0

    def driver_features_word(self) -> int:
        sel = self.driver_features_sel
        return (self.driver_features >> (32 * sel)) & 0xFFFFFFFF if sel < 2 else 0

    def write_driver_features(self, value: int) -> None:
        if self.driver_features_sel < 2 and not self.status & STATUS_FEATURES_OK:
            shift = 32 * self.driver_features_sel
            self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | ((value & 0xFFFFFFFF) << shift)

    def notify(self, queue_index: int) -> None:
        if queue_index < len(self.queues) and self.queues[queue_index] is not None and self.live:
            self.device.notify(queue_index)

    def write_queue_ready(self, ready: bool) -> None:
        cfg = self.selected_queue
        if cfg is None:
            return
        if ready and not cfg.ready:
            queue = self._make_queue(cfg)
            cfg.ready = queue is not None
            self.queues[self.queue_sel] = queue
        elif not ready:
            cfg.ready = False
            self.queues[self.queue_sel] = None

    def write_queue_layout(self, field: str, value: int) -> None:
        """Set QUEUE_NUM, QUEUE_DESC, QUEUE_DRIVER or QUEUE_DEVICE of the selected queue (32 bits)."""
        cfg = self.selected_queue
        if cfg is not None and not cfg.ready:  # a ready queue's layout is fixed until it is taken down or reset
            setattr(cfg, field, value & 0xFFFFFFFF)

    def write_status(self, value: int) -> None:
        value &= 0xFF
        if value == 0:
            self._reset()
            if self.claim.owner is self or self.claim.owner is None:
                self.device.reset()  # another transport's device is not this driver's to reset
            self.claim.release(self)
            return
        if value & STATUS_FEATURES_OK and not self.status & STATUS_FEATURES_OK:
            if self.driver_features & ~self.offered_features or not self.driver_features & VIRTIO_F_VERSION_1 \
                    or not self.claim.take(self):
                value &= ~STATUS_FEATURES_OK  # refuse: the driver will see FEATURES_OK did not stick
        was_live = self.live
        # NEEDS_RESET is the device's to set; FEATURES_OK, once accepted, only a reset clears
        self.status = (value & ~STATUS_NEEDS_RESET) | (self.status & (STATUS_NEEDS_RESET | STATUS_FEATURES_OK))
        if self.live and not was_live:
            self._activate()

    def _activate(self) -> None:
        self.device.activate(Activation(self.queues, self.memory, self.driver_features, self.signal_used,
                                        self.signal_config))

    # --- snapshots -------------------------------------------------------------------------------------------
    def get_state(self) -> dict:
        queues = tuple(
            QueueState(cfg.num, cfg.ready, cfg.desc, cfg.driver, cfg.device,
                       queue.next_avail if queue else 0, queue.next_used if queue else 0)
            for cfg, queue in zip(self._configs, self.queues))
        return state.dump(VirtioTransportState(self.status, self.driver_features, self.device_features_sel,
                                               self.driver_features_sel, self.queue_sel, self.interrupt_status,
                                               queues))

    def set_state(self, data: dict) -> None:
        """Restore :meth:`get_state` output (after the device's backend); raise SnapshotError if invalid.

        The queues, the claim and the device's activation are derived: they are rebuilt from the saved registers.
        """
        saved = state.load(VirtioTransportState, data)
        if len(saved.queues) != self.device.num_queues:
            raise SnapshotError(f"snapshot virtio transport state has {len(saved.queues)} queues; device "
                                f"{self.device.device_id} has {self.device.num_queues}")
        for q in saved.queues:
            error = q.ready and layout_error(self.memory.size, q.num, q.desc, q.driver, q.device,
                                             self.queue_size_max)
            if error:
                raise SnapshotError(f"snapshot virtio transport state holds a queue no guest could set up: {error}")
        if saved.driver_features & ~self.offered_features:
            raise SnapshotError("snapshot virtio transport state has features this device does not offer")
        self.claim.release(self)
        if saved.status & STATUS_FEATURES_OK and not self.claim.take(self):
            raise SnapshotError(f"snapshot has virtio device {self.device.device_id} driven over two transports")
        self.status = saved.status
        self.driver_features = saved.driver_features
        self.device_features_sel = saved.device_features_sel
        self.driver_features_sel = saved.driver_features_sel
        self.queue_sel = saved.queue_sel
        self.interrupt_status = saved.interrupt_status
        self.queues = []
        for cfg, q in zip(self._configs, saved.queues):
            cfg.num, cfg.ready, cfg.desc, cfg.driver, cfg.device = q.num, q.ready, q.desc, q.driver, q.device
            self.queues.append(self._make_queue(cfg, q.next_avail, q.next_used) if q.ready else None)
        self._irq.set(self.interrupt_status != 0)
        if self.live:
            self._activate()
