"""cobd's C request path writes guest RAM as the engine's own DMA — straight from the file and then telling the
engine, or copying through uc_mem_write: the migration's dirty-page log sees a disk read, and translated code
on the pages it overwrites is thrown away (the guest runs what it read, not stale code)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from parts import bring_up
from test_dirty_pages import CODE, flat_cpu, round_of, run

from conode.vm.cpu.dirty import EngineDirtyLog, engine_logs_dirty_pages
from conode.vm.cpu.unicorn_cpu import StopReason
from conode.vm.devices.irq import IrqLine
from conode.vm.devices.legacy.pic import PicPair
from conode.vm.devices.virtio.block import S_OK, T_IN, VirtioBlock
from conode.vm.devices.virtio.mmio import REG_QUEUE_NOTIFY, VirtioMmio
from conode.vm.disk.image import BaseImage
from conode.vm.disk.overlay import CowDisk
from conode.vm.machine import DmaMemory

REQUEST = 0x70000  # the request's header; its status byte 0x100 further
MARK = 0x60000
RINGS = ((0x80000, 0x81000, 0x82000),)  # clear of the test CPU's GDT, code and data
# mov byte [0x60000], 7 ; hlt
NEW_CODE = bytes.fromhex("c60500000600" "07" "f4")
# mov byte [0x60000], 1 ; hlt
OLD_CODE = bytes.fromhex("c60500000600" "01" "f4")


@pytest.mark.skipif(not engine_logs_dirty_pages(), reason="stock Unicorn has no dirty-page log; the fast engine has")
@pytest.mark.parametrize("direct", [True, False], ids=["straight-into-ram", "through-uc_mem_write"])
def test_a_disk_read_is_logged_dirty_and_replaces_translated_code(tmp_path: Path, direct: bool) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(NEW_CODE.ljust(4096, b"\x90"))
    cpu = flat_cpu()
    run(cpu, OLD_CODE, CODE)  # translated and run once
    assert cpu.ram.view[MARK] == 1
    memory = DmaMemory(cpu.ram, cpu)
    assert memory.native.dma_done, "conode's engine tells of RAM a device wrote itself"
    if not direct:
        memory.native = memory.native._replace(dma_done=0)
    device = VirtioBlock(CowDisk(BaseImage(image), None, 1 << 20))
    transport = VirtioMmio(device, IrqLine(PicPair(), 5), memory)
    bring_up(transport, (8,), RINGS)
    assert device._native is not None, "the C request path did not load (a C compiler?)"
    tracker = EngineDirtyLog(cpu)
    tracker.start()
    round_of(tracker)  # everything once; from now on only changes
    desc, avail, _ = RINGS[0]
    view = cpu.ram.view
    struct.pack_into("<IIQ", view, REQUEST, T_IN, 0, 0)
    for i, (address, length, flags) in enumerate([(REQUEST, 16, 1), (CODE, 512, 3), (REQUEST + 0x100, 1, 2)]):
        struct.pack_into("<QIHH", view, desc + 16 * i, address, length, flags, i + 1)
    struct.pack_into("<HH", view, avail + 2, 1, 0)
    transport.write(REG_QUEUE_NOTIFY, 4, 0)
    assert view[REQUEST + 0x100] == S_OK and bytes(view[CODE:CODE + len(NEW_CODE)]) == NEW_CODE
    assert (CODE >> 12) in round_of(tracker)  # the page the disk wrote
    cpu.enter_protected_mode(0x1000, 31, 0x10, 0x18, CODE, 0)
    assert cpu.run(1 << 62, False) is StopReason.HALT
    assert view[MARK] == 7  # the code read from the disk ran, not the translation of the old one
    tracker.stop()
