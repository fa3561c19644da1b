"""Dirty-page tracking: pages a guest program writes are reported, pages it only reads are not (both ways)."""

import struct

import pytest

from conode.vm.cpu.dirty import (
    CompareDirtyLog,
    DirtyTracker,
    EngineDirtyLog,
    engine_logs_dirty_pages,
    pages_of,
)
from conode.vm.cpu.unicorn_cpu import GuestRam, StopReason, UnicornCpu

RAM = 1 << 20
CODE = 0x2000
# mov eax,[0x10000] ; mov [0x20000],eax ; mov byte [0x30005],1 ; mov ecx,[0x40000] ; hlt
WRITER = bytes.fromhex("a100000100" "a300000200" "c60505000300" "01" "8b0d00000400" "f4")


class NoPorts:
    def port_read(self, port: int, size: int) -> int:
        return 0xFF

    def port_write(self, port: int, size: int, value: int) -> None:
        pass


def flat_cpu() -> UnicornCpu:
    ram = GuestRam(RAM)
    # descriptors already marked accessed: the CPU would otherwise write the GDT page when it loads them
    gdt = struct.pack("<4Q", 0, 0, 0x00CF9B000000FFFF, 0x00CF93000000FFFF)
    ram.view[0x1000:0x1000 + len(gdt)] = gdt
    ram.view[0x10000:0x10004] = b"\x01\x02\x03\x04"
    ram.view[0x40000:0x40004] = b"\x05\x06\x07\x08"
    return UnicornCpu(ram, NoPorts())


def run(cpu: UnicornCpu, code: bytes, at: int) -> None:
    cpu.write_phys(at, code)
    cpu.enter_protected_mode(0x1000, 31, 0x10, 0x18, at, 0)
    assert cpu.run(1 << 62, False) is StopReason.HALT


def round_of(tracker: DirtyTracker) -> set[int]:
    """One pre-copy round: the pages reported, each read (as a migration sends it)."""
    pages = set(pages_of(tracker.take()))
    for page in pages:
        tracker.read(page, 1)
    return pages


def trackers() -> list:
    kinds = [pytest.param(lambda cpu: CompareDirtyLog(cpu.ram), id="comparison")]
    kinds.append(pytest.param(EngineDirtyLog, id="engine-log", marks=pytest.mark.skipif(
        not engine_logs_dirty_pages(), reason="stock Unicorn has no dirty-page log; the fast engine has")))
    return kinds


@pytest.mark.parametrize("make", trackers())
def test_written_pages_are_reported_and_read_pages_are_not(make):
    cpu = flat_cpu()
    tracker = make(cpu)
    tracker.start()
    first = round_of(tracker)
    assert {0x1, 0x10, 0x40} <= first  # everything the other side does not have yet
    assert round_of(tracker) == set()  # nothing changed since
    run(cpu, WRITER, CODE)
    assert round_of(tracker) == {CODE >> 12, 0x20, 0x30}  # the code (host write), the two stores; not the loads
    run(cpu, WRITER, CODE)  # the same stores again: the engine sees writes, the comparison changes
    again = round_of(tracker)
    assert again == ({CODE >> 12, 0x20, 0x30} if isinstance(tracker, EngineDirtyLog) else set())
    cpu.write_phys(0x50010, b"dma")  # a device writing guest memory
    assert round_of(tracker) == {0x50}
    tracker.stop()


@pytest.mark.parametrize("make", trackers())
def test_every_change_is_found_after_many_rounds(make):
    """What the other side holds (the pages read) equals RAM after the last round, whatever ran in between."""
    cpu = flat_cpu()
    tracker = make(cpu)
    tracker.start()
    mirror = bytearray(RAM)
    for step in range(6):
        for page in pages_of(tracker.take()):
            mirror[page << 12:(page + 1) << 12] = tracker.read(page, 1)
        target = 0x60000 + step * 0x3000
        # mov dword [target], step+1 ; hlt
        run(cpu, b"\xc7\x05" + struct.pack("<II", target, step + 1) + b"\xf4", 0x3000 + step * 0x10)
    for page in pages_of(tracker.take()):
        mirror[page << 12:(page + 1) << 12] = tracker.read(page, 1)
    assert mirror == cpu.ram.view
    tracker.stop()
