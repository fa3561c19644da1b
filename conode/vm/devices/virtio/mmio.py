"""The virtio-mmio transport (virtio 1.x, section 4.2, version 2 register layout).

It decodes the virtio-mmio registers into the bus-independent transport (:mod:`.transport`), which knows
nothing about any particular device. Devices are declared to the guest kernel on its command line
(``virtio_mmio.device=4K@base:irq``).
"""

from __future__ import annotations

from conode.vm.devices.virtio.transport import (QUEUE_DESC, QUEUE_DEVICE, QUEUE_DRIVER, QUEUE_NUM,
                                                VirtioTransport)
from conode.vm.devices.virtio.transport import STATUS_FEATURES_OK, STATUS_NEEDS_RESET  # noqa: F401 (status bits)

MAGIC = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = 0x45444F43  # "CODE" in little-endian ASCII: conode's devices

(REG_MAGIC, REG_VERSION, REG_DEVICE_ID, REG_VENDOR_ID, REG_DEVICE_FEATURES, REG_DEVICE_FEATURES_SEL,
 REG_DRIVER_FEATURES, REG_DRIVER_FEATURES_SEL, REG_QUEUE_SEL, REG_QUEUE_NUM_MAX, REG_QUEUE_NUM,
 REG_QUEUE_READY, REG_QUEUE_NOTIFY, REG_INTERRUPT_STATUS, REG_INTERRUPT_ACK, REG_STATUS,
 REG_QUEUE_DESC_LOW, REG_QUEUE_DESC_HIGH, REG_QUEUE_DRIVER_LOW, REG_QUEUE_DRIVER_HIGH,
 REG_QUEUE_DEVICE_LOW, REG_QUEUE_DEVICE_HIGH, REG_CONFIG_GENERATION) = (
    0x000, 0x004, 0x008, 0x00C, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x044, 0x050, 0x060, 0x064,
    0x070, 0x080, 0x084, 0x090, 0x094, 0x0A0, 0x0A4, 0x0FC)
REG_CONFIG = 0x100

_QUEUE_LAYOUT = {REG_QUEUE_NUM: QUEUE_NUM, REG_QUEUE_DESC_LOW: QUEUE_DESC, REG_QUEUE_DRIVER_LOW: QUEUE_DRIVER,
                 REG_QUEUE_DEVICE_LOW: QUEUE_DEVICE}  # the *_HIGH halves are always zero on a 32-bit guest


class VirtioMmio(VirtioTransport):
    """One virtio-mmio slot holding *device*."""

    def read(self, offset: int, size: int) -> int:
        if offset >= REG_CONFIG:
            return self.device.config_read(offset - REG_CONFIG, size)
        cfg = self.selected_queue
        if offset == REG_MAGIC:
            return MAGIC
        if offset == REG_VERSION:
            return VERSION
        if offset == REG_DEVICE_ID:
            return self.device.device_id
        if offset == REG_VENDOR_ID:
            return VENDOR_ID
        if offset == REG_DEVICE_FEATURES:
            return self.device_features_word()
        if offset == REG_QUEUE_NUM_MAX:
            return self.queue_size_max if cfg else 0
        if offset == REG_QUEUE_READY:
            return int(cfg.ready) if cfg else 0
        if offset == REG_INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == REG_STATUS:
            return self.status
        return 0  # REG_CONFIG_GENERATION among others: the configuration never changes

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFFFFFFFF
        if offset == REG_DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == REG_DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == REG_DRIVER_FEATURES:
            self.write_driver_features(value)
        elif offset == REG_QUEUE_SEL:
            self.queue_sel = value
        elif offset == REG_QUEUE_NOTIFY:
            self.notify(value)
        elif offset == REG_INTERRUPT_ACK:
            self.acknowledge_interrupt(value)
        elif offset == REG_STATUS:
            self.write_status(value)
        elif offset == REG_QUEUE_READY:
            self.write_queue_ready(bool(value & 1))
        elif offset in _QUEUE_LAYOUT:
            self.write_queue_layout(_QUEUE_LAYOUT[offset], value)
