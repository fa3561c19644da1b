"""RDTSC reads the machine's virtual clock (clock.VirtualClock.tsc), not the host's counter: on both engines."""

import struct

from conode.vm.cpu.unicorn_cpu import GuestRam, StopReason, UnicornCpu

# At 0x6000, paging off, flat segments:
#   rdtsc; mov %eax,0x8000; mov %edx,0x8004; rdtsc; mov %eax,0x8008; mov %edx,0x800c; hlt
CODE = "0f31a300800000891504800000" "0f31a30880000089150c800000f4"
READINGS = [0x0000_0012_3456_789A, 0x0000_0012_3456_789A + 0x1_0000_0001]


def flat_descriptor(access: int) -> bytes:
    return struct.pack("<HHBBBB", 0xFFFF, 0, 0, access, 0xCF, 0)


class NoPorts:
    def port_read(self, port: int, size: int) -> int:
        return 0xFF

    def port_write(self, port: int, size: int, value: int) -> None:
        pass


def test_rdtsc_returns_the_clock_s_counter_in_edx_eax():
    ram = GuestRam(1 << 20)
    gdt = bytes(8) + flat_descriptor(0x9A) + flat_descriptor(0x92)
    ram.view[0x1000:0x1000 + len(gdt)] = gdt
    code = bytes.fromhex(CODE)
    ram.view[0x6000:0x6000 + len(code)] = code
    cpu = UnicornCpu(ram, NoPorts())
    readings = iter(READINGS)
    cpu.connect_clock(lambda: next(readings))
    cpu.enter_protected_mode(0x1000, len(gdt) - 1, 0x08, 0x10, 0x6000, 0)
    assert cpu.run(1 << 62, False) is StopReason.HALT
    assert list(struct.unpack_from("<QQ", ram.view, 0x8000)) == READINGS
