"""The virtio-pci transport, modern only (virtio 1.x, section 4.1), with INTx interrupts.

Why modern only: Linux's virtio_pci (6.1) tries the modern interface first and takes a device whose PCI device ID
is 0x1040 + the virtio device ID through its capabilities alone; the legacy interface would need a second
register layout and pre-1.0 queue semantics that conode's transport core (:mod:`conode.vm.devices.virtio.transport`)
does not have. The registers live in one 32-bit memory BAR, which the host places in the PCI window (no firmware
does it), with four regions named by vendor capabilities: common configuration, ISR status (read to acknowledge,
which lowers INTx), device configuration, and notifications (multiplier 0: one address, the queue index as value).
There is no MSI-X: the driver falls back to INTx, which the Interrupt Line register routes to a PIC input.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from conode.vm import state
from conode.vm.devices.irq import IrqLine
from conode.vm.devices.pci.config import CAP_ID_VENDOR, ConfigSpace, Identity, PciConfigState
from conode.vm.devices.virtio.queue import GuestMemory
from conode.vm.devices.virtio.transport import (QUEUE_DESC, QUEUE_DEVICE, QUEUE_DRIVER, QUEUE_NUM, DeviceClaim,
                                                VirtioDevice, VirtioTransport)

VENDOR_REDHAT_VIRTIO = 0x1AF4  # the PCI vendor ID of virtio devices
DEVICE_ID_MODERN_BASE = 0x1040
REVISION_MODERN = 1  # a non-transitional device has revision 1 or higher
CLASS_BY_DEVICE = {1: 0x020000, 2: 0x010000, 3: 0x078000}  # net: Ethernet; block: SCSI; console: other comm.
CLASS_OTHER = 0xFF0000

BAR_SIZE = 0x4000
COMMON, ISR, DEVICE, NOTIFY = 0x0000, 0x1000, 0x2000, 0x3000  # regions of BAR 0, a page each
REGION_SIZE = 0x1000
COMMON_LENGTH, ISR_LENGTH, NOTIFY_LENGTH = 0x40, 4, 4
CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE = 1, 2, 3, 4
NO_VECTOR = 0xFFFF  # MSI-X vectors: none

# common configuration registers (struct virtio_pci_common_cfg)
(DEVICE_FEATURE_SELECT, DEVICE_FEATURE, DRIVER_FEATURE_SELECT, DRIVER_FEATURE, MSIX_CONFIG, NUM_QUEUES,
 DEVICE_STATUS, CONFIG_GENERATION, QUEUE_SELECT, QUEUE_SIZE, QUEUE_MSIX_VECTOR, QUEUE_ENABLE, QUEUE_NOTIFY_OFF,
 QUEUE_DESC_LO, QUEUE_DESC_HI, QUEUE_DRIVER_LO, QUEUE_DRIVER_HI, QUEUE_DEVICE_LO, QUEUE_DEVICE_HI) = (
    0x00, 0x04, 0x08, 0x0C, 0x10, 0x12, 0x14, 0x15, 0x16, 0x18, 0x1A, 0x1C, 0x1E, 0x20, 0x24, 0x28, 0x2C, 0x30,
    0x34)
_COMMON_LAYOUT = "<IIIIHHBBHHHHHIIIIIIHH"  # ... then queue_notify_data, queue_reset (always 0)
_QUEUE_LAYOUT = {(QUEUE_SIZE, 2): QUEUE_NUM, (QUEUE_DESC_LO, 4): QUEUE_DESC, (QUEUE_DRIVER_LO, 4): QUEUE_DRIVER,
                 (QUEUE_DEVICE_LO, 4): QUEUE_DEVICE}  # the high halves are always zero on a 32-bit guest


def _capability(cfg_type: int, offset: int, length: int, extra: bytes = b"") -> bytes:
    """A struct virtio_pci_cap in BAR 0 (the next pointer is filled in by the configuration space)."""
    return struct.pack("<BBBBBBxxII", CAP_ID_VENDOR, 0, 16 + len(extra), cfg_type, 0, 0, offset, length) + extra


CAPABILITIES = (
    _capability(CAP_COMMON, COMMON, COMMON_LENGTH),
    _capability(CAP_ISR, ISR, ISR_LENGTH),
    _capability(CAP_DEVICE, DEVICE, REGION_SIZE),
    _capability(CAP_NOTIFY, NOTIFY, NOTIFY_LENGTH, struct.pack("<I", 0)),  # notify_off_multiplier 0
)


@dataclass(frozen=True)
class VirtioPciState(state.Record):
    KIND = "virtio-pci"
    VERSION = 1

    config: PciConfigState
    transport: dict  # the transport core's own record


class VirtioPci(VirtioTransport):
    """*device* as a PCI function whose INTx pin reaches *irq*; BAR 0 sits at *bar_base*."""

    def __init__(self, device: VirtioDevice, irq: IrqLine, memory: GuestMemory, bar_base: int,
                 claim: DeviceClaim | None = None) -> None:
        identity = Identity(VENDOR_REDHAT_VIRTIO, DEVICE_ID_MODERN_BASE + device.device_id,
                            CLASS_BY_DEVICE.get(device.device_id, CLASS_OTHER), REVISION_MODERN,
                            VENDOR_REDHAT_VIRTIO, device.device_id)
        self.config = ConfigSpace(identity, (BAR_SIZE,), CAPABILITIES, irq)
        self.config.place_bar(0, bar_base)
        super().__init__(device, _IntxPin(self.config), memory, claim)

    # --- BAR 0 -----------------------------------------------------------------------------------------------
    def bar_read(self, bar: int, offset: int, size: int) -> int:
        region, at = offset & ~(REGION_SIZE - 1), offset & (REGION_SIZE - 1)
        if region == COMMON:
            return self._common_read(at, size)
        if region == ISR:
            if at != 0:
                return 0
            status = self.interrupt_status
            self.acknowledge_interrupt(status)  # reading the ISR status acknowledges it
            return status
        if region == DEVICE:
            return self.device.config_read(at, size)
        return 0

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        region, at = offset & ~(REGION_SIZE - 1), offset & (REGION_SIZE - 1)
        if region == COMMON:
            self._common_write(at, size, value & ((1 << (8 * size)) - 1))
        elif region == NOTIFY:
            self.notify(value & 0xFFFF)
        # the ISR status is read-only; device configuration writes are not supported by conode's devices

    def _common_read(self, offset: int, size: int) -> int:
        cfg = self.selected_queue
        queue = (cfg.num & 0xFFFF, NO_VECTOR, int(cfg.ready), 0, cfg.desc, 0, cfg.driver, 0, cfg.device, 0) if cfg \
            else (0, NO_VECTOR, 0, 0, 0, 0, 0, 0, 0, 0)
        image = struct.pack(_COMMON_LAYOUT, self.device_features_sel, self.device_features_word(),
                            self.driver_features_sel, self.driver_features_word(), NO_VECTOR,
                            self.device.num_queues, self.status, 0, self.queue_sel & 0xFFFF, *queue, 0, 0)
        return int.from_bytes(image[offset:offset + size].ljust(size, b"\0"), "little")

    def _common_write(self, offset: int, size: int, value: int) -> None:
        """Only whole registers are written (as a driver does); any other access is ignored."""
        if (offset, size) == (DEVICE_FEATURE_SELECT, 4):
            self.device_features_sel = value
        elif (offset, size) == (DRIVER_FEATURE_SELECT, 4):
            self.driver_features_sel = value
        elif (offset, size) == (DRIVER_FEATURE, 4):
            self.write_driver_features(value)
        elif (offset, size) == (DEVICE_STATUS, 1):
            self.write_status(value)
        elif (offset, size) == (QUEUE_SELECT, 2):
            self.queue_sel = value
        elif (offset, size) == (QUEUE_ENABLE, 2):
            self.write_queue_ready(bool(value & 1))
        elif (offset, size) in _QUEUE_LAYOUT:
            self.write_queue_layout(_QUEUE_LAYOUT[offset, size], value)
        # MSI-X vectors stay NO_VECTOR; the high halves of ring addresses stay zero

    # --- snapshots -------------------------------------------------------------------------------------------
    def get_state(self) -> dict:
        return state.dump(VirtioPciState(self.config.get_state(), super().get_state()))

    def set_state(self, data: dict) -> None:
        """Restore :meth:`get_state` output (after the device's backend); raise SnapshotError if invalid."""
        saved = state.load(VirtioPciState, data)
        self.config.set_state(saved.config)
        super().set_state(saved.transport)


class _IntxPin:
    """The transport's interrupt, as the function's INTx pin."""

    def __init__(self, config: ConfigSpace) -> None:
        self._config = config

    def set(self, level: bool) -> None:
        self._config.set_intx(level)
