"""The virtio-mmio transport (virtio 1.x, section 4.2, version 2 register layout).

It knows nothing about any particular device: it negotiates features, records where the driver put each
queue, forwards notifications and config-space accesses, and owns the interrupt status and line. Devices
are declared to the guest kernel on its command line (``virtio_mmio.device=4K@base:irq``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Protocol

from conode.errors import SnapshotError
from conode.vm import state
from conode.vm.devices.irq import IrqLine
from conode.vm.devices.virtio.queue import GuestMemory, Virtqueue, layout_error
from conode.vm.state import bits, items, uint

log = logging.getLogger(__name__)

MAGIC = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = 0x45444F43  # "CODE" in little-endian ASCII: conode's devices
VIRTIO_F_VERSION_1 = 1 << 32
QUEUE_SIZE_MAX = 256
MAX_QUEUES = 8  # more than any device here has

STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK = 1, 2, 4, 8
STATUS_NEEDS_RESET, STATUS_FAILED = 0x40, 0x80
INT_USED_BUFFER, INT_CONFIG_CHANGE = 1, 2

(REG_MAGIC, REG_VERSION, REG_DEVICE_ID, REG_VENDOR_ID, REG_DEVICE_FEATURES, REG_DEVICE_FEATURES_SEL,
 REG_DRIVER_FEATURES, REG_DRIVER_FEATURES_SEL, REG_QUEUE_SEL, REG_QUEUE_NUM_MAX, REG_QUEUE_NUM,
 REG_QUEUE_READY, REG_QUEUE_NOTIFY, REG_INTERRUPT_STATUS, REG_INTERRUPT_ACK, REG_STATUS,
 REG_QUEUE_DESC_LOW, REG_QUEUE_DESC_HIGH, REG_QUEUE_DRIVER_LOW, REG_QUEUE_DRIVER_HIGH,
 REG_QUEUE_DEVICE_LOW, REG_QUEUE_DEVICE_HIGH, REG_CONFIG_GENERATION) = (
    0x000, 0x004, 0x008, 0x00C, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x044, 0x050, 0x060, 0x064,
    0x070, 0x080, 0x084, 0x090, 0x094, 0x0A0, 0x0A4, 0x0FC)
REG_CONFIG = 0x100


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

    def config_read(self, offset: int, size: int) -> int: ...

    def activate(self, activation: Activation) -> None: ...

    def notify(self, queue_index: int) -> None: ...

    def reset(self) -> None: ...


@dataclass(frozen=True)
class QueueState:
    num: int = uint(32)
    ready: bool
    desc: int = uint(32)  # a 32-bit guest: the *_HIGH halves are always zero
    driver: int = uint(32)
    device: int = uint(32)
    next_avail: int = uint(16)
    next_used: int = uint(16)


@dataclass(frozen=True)
class VirtioMmioState(state.Record):
    KIND = "virtio-mmio"
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

    def __init__(self) -> None:
        self.num = QUEUE_SIZE_MAX
        self.ready = False
        self.desc = 0
        self.driver = 0
        self.device = 0


class VirtioMmio:
    """One virtio-mmio slot holding *device*."""

    def __init__(self, device: VirtioDevice, irq: IrqLine, memory: GuestMemory) -> None:
        self.device = device
        self.memory = memory
        self._irq = irq
        self.queues: list[Virtqueue | None] = []
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        self._configs = [_QueueConfig() for _ in range(self.device.num_queues)]
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
        error = layout_error(self.memory.size, cfg.num, cfg.desc, cfg.driver, cfg.device, QUEUE_SIZE_MAX)
        if error is not None:
            self._device_error(error)
            return None
        return Virtqueue(self.memory, cfg.num, cfg.desc, cfg.driver, cfg.device, self._device_error,
                         next_avail, next_used)

    # --- registers ----------------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset >= REG_CONFIG:
            return self.device.config_read(offset - REG_CONFIG, size)
        cfg = self._configs[self.queue_sel] if self.queue_sel < len(self._configs) else None
        if offset == REG_MAGIC:
            return MAGIC
        if offset == REG_VERSION:
            return VERSION
        if offset == REG_DEVICE_ID:
            return self.device.device_id
        if offset == REG_VENDOR_ID:
            return VENDOR_ID
        if offset == REG_DEVICE_FEATURES:
            return (self.offered_features >> (32 * self.device_features_sel)) & 0xFFFFFFFF \
                if self.device_features_sel < 2 else 0
        if offset == REG_QUEUE_NUM_MAX:
            return QUEUE_SIZE_MAX if cfg else 0
        if offset == REG_QUEUE_READY:
            return int(cfg.ready) if cfg else 0
        if offset == REG_INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == REG_STATUS:
            return self.status
        # REG_CONFIG_GENERATION among others: stays 0, because what may change in a configuration (a NIC's
        # link status) is one 16-bit field, which the driver reads whole: it cannot see a torn configuration
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFFFFFFFF
        cfg = self._configs[self.queue_sel] if self.queue_sel < len(self._configs) else None
        if offset == REG_DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == REG_DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == REG_DRIVER_FEATURES:
            if self.driver_features_sel < 2 and not self.status & STATUS_FEATURES_OK:
                shift = 32 * self.driver_features_sel
                self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
        elif offset == REG_QUEUE_SEL:
            self.queue_sel = value
        elif offset == REG_QUEUE_NOTIFY:
            if value < len(self.queues) and self.queues[value] is not None and self.driver_ok \
                    and not self.needs_reset:
                self.device.notify(value)
        elif offset == REG_INTERRUPT_ACK:
            self.interrupt_status &= ~value
            self._irq.set(self.interrupt_status != 0)
        elif offset == REG_STATUS:
            self._write_status(value)
        elif cfg is not None:
            self._write_queue_register(cfg, offset, value)

    def _write_queue_register(self, cfg: _QueueConfig, offset: int, value: int) -> None:
        if offset == REG_QUEUE_READY:
            if value & 1 and not cfg.ready:
                queue = self._make_queue(cfg)
                cfg.ready = queue is not None
                self.queues[self.queue_sel] = queue
            elif not value & 1:
                cfg.ready = False
                self.queues[self.queue_sel] = None
        elif cfg.ready:
            return  # a ready queue's layout is fixed until the driver takes it down or resets the device
        elif offset == REG_QUEUE_NUM:
            cfg.num = value
        elif offset == REG_QUEUE_DESC_LOW:
            cfg.desc = value
        elif offset == REG_QUEUE_DRIVER_LOW:
            cfg.driver = value
        elif offset == REG_QUEUE_DEVICE_LOW:
            cfg.device = value
        # the *_HIGH halves are always zero on a 32-bit guest

    def _write_status(self, value: int) -> None:
        value &= 0xFF
        if value == 0:
            self._reset()
            self.device.reset()
            return
        if value & STATUS_FEATURES_OK and not self.status & STATUS_FEATURES_OK:
            if self.driver_features & ~self.offered_features or not self.driver_features & VIRTIO_F_VERSION_1:
                value &= ~STATUS_FEATURES_OK  # refuse: the driver will see FEATURES_OK did not stick
        activating = value & STATUS_DRIVER_OK and not self.status & STATUS_DRIVER_OK
        self.status = (value & ~STATUS_NEEDS_RESET) | (self.status & STATUS_NEEDS_RESET)
        if activating and not self.needs_reset:
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
        return state.dump(VirtioMmioState(self.status, self.driver_features, self.device_features_sel,
                                          self.driver_features_sel, self.queue_sel, self.interrupt_status,
                                          queues))

    def set_state(self, data: dict) -> None:
        """Restore :meth:`get_state` output (after the device's backend); raise SnapshotError if invalid.

        The queues and the device's activation are derived: they are rebuilt from the saved registers.
        """
        saved = state.load(VirtioMmioState, data)
        if len(saved.queues) != self.device.num_queues:
            raise SnapshotError(f"snapshot virtio-mmio state has {len(saved.queues)} queues; device "
                                f"{self.device.device_id} has {self.device.num_queues}")
        for q in saved.queues:
            error = q.ready and layout_error(self.memory.size, q.num, q.desc, q.driver, q.device,
                                             QUEUE_SIZE_MAX)
            if error:
                raise SnapshotError(f"snapshot virtio-mmio state holds a queue no guest could set up: {error}")
        if saved.driver_features & ~self.offered_features:
            raise SnapshotError("snapshot virtio-mmio state has features this device does not offer")
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
        if self.driver_ok and not self.needs_reset:
            self._activate()
