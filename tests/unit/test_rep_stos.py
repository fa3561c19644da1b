"""rep stos, which the fast engine does a page at a time where the destination is plain RAM (patch 0013): the
same bytes, registers and code invalidation as one element at a time, on both engines."""

from __future__ import annotations

import struct

import pytest
from test_dirty_pages import flat_cpu, run

from conode.vm.cpu import unicorn_cpu
from conode.vm.cpu.unicorn_cpu import StopReason

CODE = 0x2000
MARK = 0x60000
PATTERN = 0x11223344
SIZES = {1: b"\xaa", 2: b"\x66\xab", 4: b"\xab"}  # stosb, stosw (operand-size prefix), stosd


def program(start: int, count: int, size: int, backwards: bool) -> bytes:
    """mov edi, start ; mov ecx, count ; mov eax, PATTERN ; cld/std ; rep stos ; cld ; hlt"""
    return (b"\xbf" + struct.pack("<I", start) + b"\xb9" + struct.pack("<I", count) + b"\xb8"
            + struct.pack("<I", PATTERN) + (b"\xfd" if backwards else b"\xfc") + b"\xf3" + SIZES[size] + b"\xfc\xf4")


@pytest.mark.parametrize("size", [1, 2, 4])
@pytest.mark.parametrize("start, count", [(0x20000, 1), (0x20000, 2), (0x20ffe, 3), (0x20123, 3000),
                                          (0x21000, 4096), (0x20001, 10000)])
@pytest.mark.parametrize("backwards", [False, True])
def test_rep_stos_fills_what_one_element_at_a_time_fills(size: int, start: int, count: int,
                                                         backwards: bool) -> None:
    cpu = flat_cpu()
    ram = cpu.ram.view
    ram[0x10000:0x30000] = bytes(range(256)) * (0x20000 // 256)  # the bytes around must stay
    expected = bytearray(ram[0x10000:0x30000])
    element = PATTERN.to_bytes(4, "little")[:size]
    first = start - (count - 1) * size if backwards else start
    expected[first - 0x10000:first - 0x10000 + count * size] = element * count
    run(cpu, program(start, count, size, backwards), CODE)
    assert bytes(ram[0x10000:0x30000]) == bytes(expected)
    edi = start - count * size if backwards else start + count * size
    assert (cpu.regs.read(unicorn_cpu.x86.UC_X86_REG_EDI), cpu.regs.read(unicorn_cpu.x86.UC_X86_REG_ECX)) == (edi, 0)


def test_rep_stos_over_translated_code_throws_the_translation_away() -> None:
    cpu = flat_cpu()
    target = 0x5000
    run(cpu, b"\xc6\x05" + struct.pack("<I", MARK) + b"\x01\xf4", target)  # mov byte [MARK], 1 ; hlt: translated
    assert cpu.ram.view[MARK] == 1
    cpu.ram.view[MARK] = 0
    run(cpu, program(target, 4096, 1, False)[:15] + b"\xb0\xf4" + program(target, 4096, 1, False)[15:], CODE)
    assert bytes(cpu.ram.view[target:target + 4096]) == b"\xf4" * 4096  # the page is all HLT now
    cpu.enter_protected_mode(0x1000, 31, 0x10, 0x18, target, 0)
    assert cpu.run(1 << 62, False) is StopReason.HALT
    assert cpu.ram.view[MARK] == 0  # the new bytes ran (HLT at once), not the old translation
