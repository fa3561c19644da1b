"""Translated code stays coherent with guest memory: self-modifying code, and host writes over old code."""

import struct

import pytest
from unicorn import x86_const as x86

from conode.vm.cpu.unicorn_cpu import GuestRam, StopReason, UnicornCpu, engine_has_native_interrupts

# At address 0:  mov $3,%ecx
#         loop:  movb %cl, patched+1      (rewrites the immediate of the next instruction)
#      patched:  mov $0x99,%eax ; add %eax,%ebx ; loop loop ; hlt
SELF_MODIFYING = bytes.fromhex("b903000000880d0c000000b89900000001c3e2f1f4")
MOV_EAX_1_HLT = bytes.fromhex("b801000000f4")
MOV_EAX_2_HLT = bytes.fromhex("b802000000f4")


class NoPorts:
    def port_read(self, port: int, size: int) -> int:
        return 0xFF

    def port_write(self, port: int, size: int, value: int) -> None:
        pass


def flat_cpu(code: bytes, at: int) -> UnicornCpu:
    ram = GuestRam(1 << 20)
    gdt = struct.pack("<4Q", 0, 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF)
    ram.view[0x1000:0x1000 + len(gdt)] = gdt
    ram.view[at:at + len(code)] = code
    cpu = UnicornCpu(ram, NoPorts())
    cpu.enter_protected_mode(0x1000, len(gdt) - 1, 0x10, 0x18, at, 0)
    return cpu


def test_self_modifying_code_runs_the_new_instruction_each_time():
    cpu = flat_cpu(SELF_MODIFYING, 0)
    assert cpu.run(1 << 62, False) is StopReason.HALT
    assert cpu.uc.reg_read(x86.UC_X86_REG_EBX) == 3 + 2 + 1  # not 3 * 0x99 from a stale translation


@pytest.mark.skipif(not engine_has_native_interrupts(),
                    reason="stock Unicorn 2.1.4 does not invalidate translated code on host writes; conode's engine does")
def test_host_write_over_translated_code_replaces_it():
    cpu = flat_cpu(MOV_EAX_1_HLT, 0x2000)
    assert cpu.run(1 << 62, False) is StopReason.HALT
    assert cpu.uc.reg_read(x86.UC_X86_REG_EAX) == 1
    cpu.write_phys(0x2000, MOV_EAX_2_HLT)  # device DMA over a page that holds translated code
    cpu.uc.reg_write(x86.UC_X86_REG_EIP, 0x2000)
    assert cpu.run(1 << 62, False) is StopReason.HALT
    assert cpu.uc.reg_read(x86.UC_X86_REG_EAX) == 2
