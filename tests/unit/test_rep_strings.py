"""rep stos and rep movs, which the fast engine does a page at a time between plain RAM pages (patches 0013 and
0014): the same bytes, registers and code invalidation as one element at a time (overlapping copies included),
on both engines."""

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


def movs_program(source: int, target: int, count: int, size: int, backwards: bool) -> bytes:
    """mov esi, source ; mov edi, target ; mov ecx, count ; cld/std ; rep movs ; cld ; hlt"""
    movs = {1: b"\xa4", 2: b"\x66\xa5", 4: b"\xa5"}[size]
    return (b"\xbe" + struct.pack("<I", source) + b"\xbf" + struct.pack("<I", target) + b"\xb9"
            + struct.pack("<I", count) + (b"\xfd" if backwards else b"\xfc") + b"\xf3" + movs + b"\xfc\xf4")


@pytest.mark.parametrize("size", [1, 4])
@pytest.mark.parametrize("source, target, count", [
    (0x20000, 0x28000, 2), (0x20123, 0x28ffd, 3000), (0x20000, 0x24000, 4096),  # apart
    (0x20000, 0x20004, 3000), (0x20004, 0x20000, 3000), (0x20000, 0x20001, 5000),  # overlapping both ways
])
@pytest.mark.parametrize("backwards", [False, True])
def test_rep_movs_copies_what_one_element_at_a_time_copies(size: int, source: int, target: int, count: int,
                                                           backwards: bool) -> None:
    cpu = flat_cpu()
    ram = cpu.ram.view
    low, high = 0x10000, 0x38000
    ram[low:high] = bytes((i * 7 + i // 251) & 0xFF for i in range(high - low))
    model = bytearray(ram[low:high])
    step = -size if backwards else size
    for i in range(count):  # the architecture's definition: one element after the other
        s, t = source + i * step - low, target + i * step - low
        model[t:t + size] = model[s:s + size]
    cpu.write_phys(CODE, movs_program(source, target, count, size, backwards))
    cpu.enter_protected_mode(0x1000, 31, 0x10, 0x18, CODE, 0)
    assert cpu.run(1 << 62, False) is StopReason.HALT
    assert bytes(ram[low:high]) == bytes(model)
    x86 = unicorn_cpu.x86
    assert [cpu.regs.read(r) for r in (x86.UC_X86_REG_ESI, x86.UC_X86_REG_EDI, x86.UC_X86_REG_ECX)] == \
        [source + count * step, target + count * step, 0]
