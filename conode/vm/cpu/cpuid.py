"""The CPU the guest sees: CPUID, answered from one table, and the Unicorn model whose instructions match it.

CPUID advertises exactly what the engine executes, and what it executes it computes as hardware does
(tests/vm/test_cpuid.py runs every feature's instructions in the guest and on the host and compares): the
Westmere model's instruction set — SSE to SSE4.2, SSSE3, POPCNT, AES-NI, PCLMULQDQ — which Unicorn's TCG
implements, and nothing it does not (no AVX, MOVBE, BMI, RDRAND). Features of the platform rather than the
instruction set follow what the machine provides: no local APIC, no SEP (the guest stays on ``int 0x80``), no
MSRs, no machine checks. The name is conode's own: the brand string, and the hypervisor leaf.

Only conode's engine computes the x87 as hardware does (its patch 0004); stock Unicorn computes it in host
doubles. On the stock engine the guest therefore gets no FPU: CPUID says so (and, since CR0.EM then makes
MMX and SSE undefined too, hides those); the kernel, finding no FPU, sets CR0.EM and runs its own x87
emulator (CONFIG_MATH_EMULATION), and no program gets a wrong floating-point answer — only a slower one.
"""

from __future__ import annotations

import struct

from unicorn import x86_const

UNICORN_MODEL = x86_const.UC_CPU_X86_WESTMERE  # decides which instructions execute; CPUID below says so

VENDOR = b"GenuineIntel"
HYPERVISOR = b"conodeconode"
BRAND = b"conode virtual CPU (Unicorn TCG)"

FEATURES_EDX = (
    (1 << 0)  # FPU
    | (1 << 3)  # PSE: 4 MiB pages for the kernel's direct map
    | (1 << 4)  # TSC: RDTSC
    | (1 << 6)  # PAE: 64-bit page table entries, as the engine's MMU walks them
    | (1 << 8)  # CX8
    | (1 << 13)  # PGE
    | (1 << 15)  # CMOV
    | (1 << 19)  # CLFSH: CLFLUSH
    | (1 << 23)  # MMX
    | (1 << 24)  # FXSR
    | (1 << 25)  # SSE
    | (1 << 26)  # SSE2
)
# What needs an FPU: with CR0.EM set (no FPU) these raise #UD.
NEEDS_FPU_EDX = (1 << 0) | (1 << 23) | (1 << 24) | (1 << 25) | (1 << 26)  # FPU, MMX, FXSR, SSE, SSE2
NEEDS_FPU_ECX = (1 << 0) | (1 << 1) | (1 << 9) | (1 << 19) | (1 << 20) | (1 << 25)  # SSE3 .. AES

FEATURES_ECX = (
    (1 << 0)  # SSE3
    | (1 << 1)  # PCLMULQDQ
    | (1 << 9)  # SSSE3
    | (1 << 19)  # SSE4.1
    | (1 << 20)  # SSE4.2
    | (1 << 23)  # POPCNT
    | (1 << 25)  # AES
    | (1 << 31)  # hypervisor: a virtual CPU (its vendor at leaf 0x40000000)
)


def _signature(family: int, model: int, stepping: int) -> int:
    return family << 8 | (model & 0xF) << 4 | (model >> 4) << 16 | stepping


SIGNATURE = _signature(6, 0x2C, 2)  # Westmere
# The CPU without an FPU (the stock engine's) is no Westmere: glibc 2.36 marks Intel's Nehalem and Westmere models
# "Fast_Unaligned_Load", and its i386 memcpy then takes the SSE2 version whatever the SSE2 bit says — #UD with
# CR0.EM set, so most of Debian's programs (openssl, gawk, python3, xz, zstd, bc) died with SIGILL. Model 0x10 of
# family 6 was never a product, so no model table tunes for it (glibc's, the kernel's errata); it is past 0x0e,
# from where the kernel trusts the TSC to run at a constant rate.
SIGNATURE_NO_FPU = _signature(6, 0x10, 0)
CLFLUSH_LINE = 8  # in 8-byte units: 64-byte cache lines

HYPERVISOR_LEAF = 0x40000000
EXTENDED_MAX = 0x80000004


def _words(text: bytes) -> tuple[int, ...]:
    return struct.unpack(f"<{len(text) // 4}I", text)


_BRAND = _words(BRAND.ljust(48, b"\0"))


def cpuid_leaf(leaf: int, fpu: bool = True) -> tuple[int, int, int, int]:
    """EAX, EBX, ECX, EDX for CPUID *leaf* of a CPU with or without its FPU: a pure function, tested on its own."""
    if leaf == 0:
        ebx, edx, ecx = _words(VENDOR)
        return 1, ebx, ecx, edx
    if leaf == 1:
        if not fpu:
            return SIGNATURE_NO_FPU, CLFLUSH_LINE << 8, FEATURES_ECX & ~NEEDS_FPU_ECX, FEATURES_EDX & ~NEEDS_FPU_EDX
        return SIGNATURE, CLFLUSH_LINE << 8, FEATURES_ECX, FEATURES_EDX
    if leaf == HYPERVISOR_LEAF:
        return (HYPERVISOR_LEAF, *_words(HYPERVISOR))  # type: ignore[return-value]
    if leaf == 0x80000000:
        return EXTENDED_MAX, 0, 0, 0
    if 0x80000002 <= leaf <= EXTENDED_MAX:
        first = (leaf - 0x80000002) * 4
        return _BRAND[first], _BRAND[first + 1], _BRAND[first + 2], _BRAND[first + 3]
    return 0, 0, 0, 0
