"""Unbacked physical memory reads as all ones and ignores writes, as on a PC: never the end of the guest."""

import struct

from unicorn import x86_const as x86

from conode.vm import layout
from conode.vm.builder import MachineBuilder, PortBus
from conode.vm.cpu.unicorn_cpu import GuestRam, StopReason, UnicornCpu
from conode.vm.devices.legacy.pic import PicPair

# At 0x6000, paging off, flat segments:
#   movl $42,0x10000000; mov 0x10000000,%eax; mov %eax,0x8000; mov 0xfffffff0,%eax; mov %eax,0x8004; hlt
CODE = "c705000000102a000000a100000010a300800000a1f0ffffffa304800000f4"
RAM = 4 << 20


def flat_descriptor(access: int) -> bytes:
    return struct.pack("<HHBBBB", 0xFFFF, 0, 0, access, 0xCF, 0)


def test_reads_float_high_and_writes_are_lost_where_nothing_is_mapped():
    ram = GuestRam(RAM)
    gdt = bytes(8) + flat_descriptor(0x9A) + flat_descriptor(0x92)
    ram.view[0x1000:0x1000 + len(gdt)] = gdt
    code = bytes.fromhex(CODE)
    ram.view[0x6000:0x6000 + len(code)] = code

    class NoPorts:
        def port_read(self, port: int, size: int) -> int:
            return 0xFF

        def port_write(self, port: int, size: int, value: int) -> None:
            pass

    cpu = UnicornCpu(ram, NoPorts())
    buses = MachineBuilder(PortBus(), PicPair(lambda level: None), cpu.map_mmio).attach_open_bus(RAM)
    cpu.enter_protected_mode(0x1000, len(gdt) - 1, 0x08, 0x10, 0x6000, 0)
    assert cpu.run(1 << 62, False) is StopReason.HALT
    assert struct.unpack_from("<II", ram.view, 0x8000) == (0xFFFFFFFF, 0xFFFFFFFF)
    below, above = buses
    assert (below.base, below.reads, below.writes) == (RAM, 1, 1)
    assert (above.base, above.reads, above.writes) == (layout.virtio_slot_base(0), 1, 0)
    assert cpu.uc.reg_read(x86.UC_X86_REG_EIP) == 0x6000 + len(code)
