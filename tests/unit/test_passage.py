"""The passage on a hand-built protected-mode machine: ring switches, error codes, back-to-back faults."""

import struct

import pytest
from unicorn import x86_const as x86

from conode.errors import GuestCrashed
from conode.vm.cpu.cpuid import cpuid_leaf
from conode.vm.cpu.unicorn_cpu import GuestRam, StopReason, UnicornCpu

# Kernel code at 0x6000 (assembled with `as --32`; source in the comments):
#   entry:  mov $0x10,%ax; mov %ax,%ds; mov %ax,%es; mov %ax,%ss; mov $0x9000,%esp
#           push $0x23; push $0x7F00; push $0x202; push $0x1B; push $0x7000; iret      (to ring 3)
#   +0x100 syscall: mov %eax,0x8000; mov (%esp),%eax; mov %eax,0x8004; mov 4(%esp),%eax; mov %eax,0x8008
#           mov %esp,0x800C; mov 12(%esp),%eax; mov %eax,0x8030; iret
#   +0x200 #PF: pop %eax; mov 0x8020,%ebx; mov %eax,0x8010(,%ebx,4); mov %cr2,%eax; mov %eax,0x8018(,%ebx,4)
#           incl 0x8020; shr $12,%eax; orl $7,0x5000(,%eax,4); invlpg 0x300000; invlpg 0x301000; iret
#   +0x300 #GP: pop %eax; mov %eax,0x8024; mov (%esp),%eax; mov %eax,0x8028; hlt
KERNEL = {
    0x000: "66b810008ed88ec08ed0bc009000006a2368007f000068020200006a1b6800700000cf",
    0x100: "a3008000008b0424a3048000008b442404a30880000089250c8000008b44240ca330800000cf",
    0x200: "588b1d2080000089049d108000000f20d089049d18800000ff0520800000c1e80c830c8500500000"
           "070f013d000030000f013d00103000cf",
    0x300: "58a3248000008b0424a328800000f4",
    0x400: "8b0424a340800000f4",  # #UD: mov (%esp),%eax; mov %eax,0x8040; hlt
}
# User code at 0x7000: mov $42,%eax; int $0x80; mov 0x300000,%eax; movl $7,0x301004; int $0x81; hlt
USER = "b82a000000cd80a100003000c7050410300007000000cd81f4"


class NoPorts:
    def port_read(self, port: int, size: int) -> int:
        return 0xFF

    def port_write(self, port: int, size: int, value: int) -> None:
        pass


def descriptor(base: int, limit: int, access: int, flags: int) -> bytes:
    return struct.pack("<HHBBBB", limit & 0xFFFF, base & 0xFFFF, (base >> 16) & 0xFF, access,
                       (flags << 4) | ((limit >> 16) & 0xF), base >> 24)


def gate(offset: int, selector: int, type_attr: int) -> bytes:
    return struct.pack("<HHBBH", offset & 0xFFFF, selector, 0, type_attr, offset >> 16)


def build_machine(user_code: str = USER) -> tuple[UnicornCpu, GuestRam]:
    ram = GuestRam(4 << 20)
    mem = ram.view
    gdt = b"".join([
        bytes(8),
        descriptor(0, 0xFFFFF, 0x9A, 0xC),  # 0x08 kernel code
        descriptor(0, 0xFFFFF, 0x92, 0xC),  # 0x10 kernel data
        descriptor(0, 0xFFFFF, 0xFA, 0xC),  # 0x18 user code (DPL 3)
        descriptor(0, 0xFFFFF, 0xF2, 0xC),  # 0x20 user data (DPL 3)
        descriptor(0x2000, 0x67, 0x89, 0x0),  # 0x28 TSS
    ])
    mem[0x1000:0x1000 + len(gdt)] = gdt
    struct.pack_into("<II", mem, 0x2004, 0x9000, 0x10)  # TSS: ESP0, SS0
    idt = bytearray(0x82 * 8)
    idt[6 * 8:7 * 8] = gate(0x6400, 0x08, 0x8E)
    idt[13 * 8:14 * 8] = gate(0x6300, 0x08, 0x8E)
    idt[14 * 8:15 * 8] = gate(0x6200, 0x08, 0x8E)
    idt[0x80 * 8:0x81 * 8] = gate(0x6100, 0x08, 0xEE)  # DPL 3: user programs may call it
    idt[0x81 * 8:0x82 * 8] = gate(0x6100, 0x08, 0x8E)  # DPL 0: `int $0x81` from ring 3 is a #GP
    mem[0x3000:0x3000 + len(idt)] = idt
    struct.pack_into("<I", mem, 0x4000, 0x5000 | 7)  # one page table covers the first 4 MiB
    for page in range(1024):
        if page not in (0x300, 0x301):  # two holes for the page-fault handler to fill
            struct.pack_into("<I", mem, 0x5000 + 4 * page, (page << 12) | 7)
    for offset, code in KERNEL.items():
        blob = bytes.fromhex(code)
        mem[0x6000 + offset:0x6000 + offset + len(blob)] = blob
    user = bytes.fromhex(user_code)
    mem[0x7000:0x7000 + len(user)] = user
    cpu = UnicornCpu(ram, NoPorts())
    cpu.enter_protected_mode(0x1000, len(gdt) - 1, 0x08, 0x10, 0x6000, 0)
    uc = cpu.uc
    uc.reg_write(x86.UC_X86_REG_IDTR, (0, 0x3000, len(idt) - 1, 0))
    uc.reg_write(x86.UC_X86_REG_TR, (0x28, 0x2000, 0x67, 0x8900))  # present, 32-bit TSS (QEMU flag layout)
    uc.reg_write(x86.UC_X86_REG_CR3, 0x4000)
    uc.reg_write(x86.UC_X86_REG_CR0, uc.reg_read(x86.UC_X86_REG_CR0) | (1 << 31))
    return cpu, ram


def words(ram: GuestRam, address: int, count: int) -> list[int]:
    return list(struct.unpack_from(f"<{count}I", ram.view, address))


def test_syscall_faults_and_privilege_checks_are_delivered_like_hardware():
    cpu, ram = build_machine()
    assert cpu.run(1 << 62, False) is StopReason.HALT
    eax, eip, cs, esp = words(ram, 0x8000, 4)
    assert (eax, eip, cs) == (42, 0x7007, 0x1B)  # int 0x80 from ring 3: return address after the int
    assert esp == 0x9000 - 20  # SS0:ESP0 from the TSS, with SS, ESP, EFLAGS, CS, EIP pushed
    assert words(ram, 0x8030, 1) == [0x7F00]  # the user stack pointer was saved
    # Two page faults in a row (a read, then a write, both from user mode on not-present pages):
    # correct error codes and CR2, and the second is not promoted to a double fault.
    assert words(ram, 0x8020, 1) == [2]
    assert words(ram, 0x8010, 2) == [0b100, 0b110]
    assert words(ram, 0x8018, 2) == [0x300000, 0x301004]
    # `int $0x81` hits a DPL-0 gate from ring 3: #GP with error code vector*8+2, EIP at the int.
    assert words(ram, 0x8024, 2) == [0x81 * 8 + 2, 0x7016]
    if not cpu.native_interrupts:  # the Python passage counts what it delivers
        assert cpu.stats["syscalls"] == 1 and cpu.stats["exceptions"] == 3


def test_invalid_instruction_in_user_mode_is_delivered_as_ud():
    cpu, ram = build_machine("90900f0b")  # nop; nop; ud2
    assert cpu.run(1 << 62, False) is StopReason.HALT
    assert words(ram, 0x8040, 1) == [0x7002]  # #UD is a fault: EIP points at the ud2


def test_missing_gate_is_a_clear_guest_crash():
    cpu, ram = build_machine()
    ram.view[0x3000 + 14 * 8:0x3000 + 15 * 8] = bytes(8)  # remove the #PF gate
    with pytest.raises(GuestCrashed, match="vector 14|triple-faulted"):
        cpu.run(1 << 62, False)


def test_cpu_state_roundtrips_into_a_fresh_cpu():
    cpu, ram = build_machine()
    state = cpu.get_state()
    other_ram = GuestRam(4 << 20)
    other_ram.view[:] = ram.view
    other = UnicornCpu(other_ram, NoPorts())
    other.set_state(state)
    assert other.run(1 << 62, False) is StopReason.HALT
    assert words(other_ram, 0x8000, 1) == [42] and words(other_ram, 0x8020, 1) == [2]


def test_cpuid_hides_sep_and_apic_and_names_conode():
    _, ebx, ecx, edx = cpuid_leaf(1)
    assert not edx & ((1 << 11) | (1 << 9))  # no SEP (the guest stays on int 0x80), no local APIC
    assert edx & (1 << 15) and ebx >> 8 & 0xFF == 8  # CMOV, which the guest's busybox needs; 64-byte lines
    _, ebx, ecx, edx = cpuid_leaf(0)
    assert struct.pack("<III", ebx, edx, ecx) == b"GenuineIntel"
    _, ebx, ecx, edx = cpuid_leaf(0x40000000)
    assert struct.pack("<III", ebx, ecx, edx) == b"conodeconode"
    brand = b"".join(struct.pack("<IIII", *cpuid_leaf(leaf)) for leaf in (0x80000002, 0x80000003, 0x80000004))
    assert brand.rstrip(b"\0") == b"conode virtual CPU (Unicorn TCG)"


def _family_model(eax: int) -> tuple[int, int]:
    return eax >> 8 & 0xF, (eax >> 4 & 0xF) | (eax >> 16 & 0xF) << 4


def test_the_cpu_without_an_fpu_is_no_westmere():
    """Without an FPU (the stock engine) CPUID hides the x87, MMX and SSE, and gives a model of its own: glibc
    copies memory with SSE2 on any Westmere, whatever the SSE2 bit says."""
    eax, _, ecx, edx = cpuid_leaf(1, fpu=False)
    assert not edx & ((1 << 0) | (1 << 23) | (1 << 24) | (1 << 25) | (1 << 26)) and not ecx & (1 << 0)
    assert _family_model(eax) == (6, 0x10)
    assert _family_model(cpuid_leaf(1)[0]) == (6, 0x2C)
    # glibc (sysdeps/x86/cpu-features.c) sets Fast_Unaligned_Load, and its i386 memcpy then runs SSE2, for these
    # family 6 models (Nehalem, Westmere, Silvermont, Airmont, Goldmont, Tremont) whatever the feature bits say.
    assert _family_model(eax)[1] not in {0x1A, 0x1E, 0x1F, 0x25, 0x2C, 0x2E, 0x2F, 0x37, 0x4A, 0x4C, 0x4D, 0x5A,
                                         0x5C, 0x5D, 0x5F, 0x75, 0x86, 0x96, 0x9C}
