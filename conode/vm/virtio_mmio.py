"""The virtio-mmio transport (virtio 1.x, section 4.2, version 2 register layout).

It knows nothing about any particular device: it negotiates features, records where the driver put each
queue, forwards notifications and config-space accesses, and owns the interrupt status and line. Devices
are declared to the guest kernel on its command line (``virtio_mmio.device=4K@base:irq``).
"""

from __future__ import annotations

from typing import Protocol

from conode.vm.pic import IrqLine
from conode.vm.virtqueue import GuestMemory, Virtqueue

MAGIC = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = 0x45444F43  # "CODE" in little-endian ASCII: conode's devices
VIRTIO_F_VERSION_1 = 1 << 32
QUEUE_SIZE_MAX = 256

STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK = 1, 2, 4, 8
STATUS_FAILED = 0x80
INT_USED_BUFFER, INT_CONFIG_CHANGE = 1, 2

(REG_MAGIC, REG_VERSION, REG_DEVICE_ID, REG_VENDOR_ID, REG_DEVICE_FEATURES, REG_DEVICE_FEATURES_SEL,
 REG_DRIVER_FEATURES, REG_DRIVER_FEATURES_SEL, REG_QUEUE_SEL, REG_QUEUE_NUM_MAX, REG_QUEUE_NUM,
 REG_QUEUE_READY, REG_QUEUE_NOTIFY, REG_INTERRUPT_STATUS, REG_INTERRUPT_ACK, REG_STATUS,
 REG_QUEUE_DESC_LOW, REG_QUEUE_DESC_HIGH, REG_QUEUE_DRIVER_LOW, REG_QUEUE_DRIVER_HIGH,
 REG_QUEUE_DEVICE_LOW, REG_QUEUE_DEVICE_HIGH, REG_CONFIG_GENERATION) = (
    0x000, 0x004, 0x008, 0x00C, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x044, 0x050, 0x060, 0x064,
    0x070, 0x080, 0x084, 0x090, 0x094, 0x0A0, 0x0A4, 0x0FC)
REG_CONFIG = 0x100


class VirtioDevice(Protocol):
    """A virtio device behind a transport."""

    device_id: int
    features: int  # offered feature bits (VIRTIO_F_VERSION_1 is added by the transport)
    num_queues: int

    def config_read(self, offset: int, size: int) -> int: ...

    def activate(self, transport: "VirtioMmio") -> None: ...

    def notify(self, queue_index: int) -> None: ...

    def reset(self) -> None: ...


class _QueueConfig:
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
        self.config_generation = 0
        self._configs = [_QueueConfig() for _ in range(self.device.num_queues)]
        self.queues = [None] * self.device.num_queues
        self._irq.set(False)

    @property
    def offered_features(self) -> int:
        return self.device.features | VIRTIO_F_VERSION_1

    @property
    def driver_ok(self) -> bool:
        return bool(self.status & STATUS_DRIVER_OK)

    # --- interrupts --------------------------------------------------------------------------------------
    def signal_used(self, queue_index: int) -> None:
        """Tell the driver that *queue_index* has new used buffers, unless it asked not to be told."""
        queue = self.queues[queue_index]
        if queue is not None and queue.interrupt_wanted():
            self.interrupt_status |= INT_USED_BUFFER
            self._irq.set(True)

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
        if offset == REG_CONFIG_GENERATION:
            return self.config_generation
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        cfg = self._configs[self.queue_sel] if self.queue_sel < len(self._configs) else None
        if offset == REG_DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == REG_DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == REG_DRIVER_FEATURES:
            if self.driver_features_sel < 2:
                shift = 32 * self.driver_features_sel
                self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
        elif offset == REG_QUEUE_SEL:
            self.queue_sel = value
        elif offset == REG_QUEUE_NOTIFY:
            if value < len(self.queues) and self.queues[value] is not None and self.driver_ok:
                self.device.notify(value)
        elif offset == REG_INTERRUPT_ACK:
            self.interrupt_status &= ~value
            self._irq.set(self.interrupt_status != 0)
        elif offset == REG_STATUS:
            self._write_status(value)
        elif cfg is not None:
            self._write_queue_register(cfg, offset, value)

    def _write_queue_register(self, cfg: _QueueConfig, offset: int, value: int) -> None:
        if offset == REG_QUEUE_NUM:
            cfg.num = value
        elif offset == REG_QUEUE_READY:
            cfg.ready = bool(value & 1)
            if cfg.ready:
                self.queues[self.queue_sel] = Virtqueue(self.memory, cfg.num, cfg.desc, cfg.driver, cfg.device)
        elif offset == REG_QUEUE_DESC_LOW:
            cfg.desc = value
        elif offset == REG_QUEUE_DRIVER_LOW:
            cfg.driver = value
        elif offset == REG_QUEUE_DEVICE_LOW:
            cfg.device = value
        # the *_HIGH halves are always zero on a 32-bit guest

    def _write_status(self, value: int) -> None:
        if value == 0:
            self._reset()
            self.device.reset()
            return
        if value & STATUS_FEATURES_OK and not self.status & STATUS_FEATURES_OK:
            if self.driver_features & ~self.offered_features or not self.driver_features & VIRTIO_F_VERSION_1:
                value &= ~STATUS_FEATURES_OK  # refuse: the driver will see FEATURES_OK did not stick
        activating = value & STATUS_DRIVER_OK and not self.status & STATUS_DRIVER_OK
        self.status = value
        if activating:
            self.device.activate(self)

    # --- snapshots -------------------------------------------------------------------------------------------
    def get_state(self) -> dict:
        return {
            "status": self.status,
            "driver_features": self.driver_features,
            "device_features_sel": self.device_features_sel,
            "driver_features_sel": self.driver_features_sel,
            "queue_sel": self.queue_sel,
            "interrupt_status": self.interrupt_status,
            "queue_configs": [vars(c).copy() for c in self._configs],
            "queues": [q.get_state() if q else None for q in self.queues],
        }

    def set_state(self, state: dict) -> None:
        self.status = state["status"]
        self.driver_features = state["driver_features"]
        self.device_features_sel = state["device_features_sel"]
        self.driver_features_sel = state["driver_features_sel"]
        self.queue_sel = state["queue_sel"]
        self.interrupt_status = state["interrupt_status"]
        for cfg, saved in zip(self._configs, state["queue_configs"]):
            vars(cfg).update(saved)
        self.queues = [Virtqueue.from_state(self.memory, q) if q else None for q in state["queues"]]
        self._irq.set(self.interrupt_status != 0)
