"""Typed access to a Unicorn 2.1.4 CPU context: QEMU's CPUX86State as the passage reads and writes it.

A context save copies the CPU state into a buffer and a restore copies it back (0.3 µs each). Editing the
segment caches, hflags (which hold the CPL), EIP, ESP and EFLAGS in between switches privilege the way QEMU's
own interrupt delivery does: without reloading CR0, so without flushing the TLB, and without the binding's
per-register cost. The offsets below are those of Unicorn 2.1.4's x86-64 build and are verified against
register writes when each CPU is created (:func:`verify_layout`), so another build fails loudly, not subtly.
"""

from __future__ import annotations

import ctypes
import struct

from unicorn import x86_const as x86
from unicorn.unicorn_py3.unicorn import uclib

from conode.errors import EngineError
from conode.vm.cpu.engine import UNICORN_VERSION

CONTEXT_SIZE = 5608
HEADER = 40  # uc_context's own fields (size, mode, arch, snapshot bookkeeping) precede CPUX86State

REGS = 40  # target_ulong regs[16]
ESP = REGS + 4 * 8
EIP = 168
EFLAGS = 176  # env->eflags: the arithmetic flags live elsewhere (lazily), IF/TF/NT/RF/VM live here
HFLAGS = 216
SEGS = 224  # SegmentCache segs[6]: selector u32, (pad), base u64, limit u32, flags u32
SEG_SIZE = 24
SEG_CS = SEGS + 1 * SEG_SIZE
SEG_SS = SEGS + 2 * SEG_SIZE
GDT = 416  # SegmentCache gdt
IDT = 440  # SegmentCache idt
TR = 392  # SegmentCache tr
CR = 464  # target_ulong cr[5]
ERROR_CODE = 5424  # env->error_code of the exception being raised
OLD_EXCEPTION = 5536  # env->old_exception: QEMU's "exception in flight" marker

HF_CPL_MASK = 0x3
HF_INHIBIT_IRQ_MASK = 1 << 3
HF_CS32_MASK = 1 << 4
HF_SS32_MASK = 1 << 5

SEGMENT = struct.Struct("<I4xQII")
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")
_CR = struct.Struct("<5Q")


class CpuContext:
    """One reusable context buffer of a Unicorn instance, with a memoryview over its bytes."""

    def __init__(self, uc: object) -> None:
        self._handle = uc._uch  # type: ignore[attr-defined]
        saved = uc.context_save()  # type: ignore[attr-defined]
        self._keep = saved  # owns the buffer
        self._pointer = saved.context
        if saved.size != CONTEXT_SIZE:
            raise EngineError(f"Unicorn's CPU context is {saved.size} bytes; conode was validated on "
                              f"{CONTEXT_SIZE} (unicorn {UNICORN_VERSION})")
        self.view = memoryview((ctypes.c_char * saved.size).from_address(saved.context.value)).cast("B")

    def save(self) -> None:
        uclib.uc_context_save(self._handle, self._pointer)

    def restore(self) -> None:
        uclib.uc_context_restore(self._handle, self._pointer)

    # Field helpers (the hot path unpacks directly; these serve the rest).
    def u32(self, offset: int) -> int:
        return _U32.unpack_from(self.view, offset)[0]

    def set_u32(self, offset: int, value: int) -> None:
        _U32.pack_into(self.view, offset, value & 0xFFFFFFFF)

    def u64(self, offset: int) -> int:
        return _U64.unpack_from(self.view, offset)[0]

    def set_u64(self, offset: int, value: int) -> None:
        _U64.pack_into(self.view, offset, value)

    def control_registers(self) -> tuple[int, int, int, int, int]:
        return _CR.unpack_from(self.view, CR)

    def take_exception_in_flight(self) -> tuple[int, int]:
        """Return (marker, error code) of the exception being raised and clear QEMU's in-flight marker."""
        marker = _I32.unpack_from(self.view, OLD_EXCEPTION)[0]
        error_code = self.u32(ERROR_CODE)
        _I32.pack_into(self.view, OLD_EXCEPTION, -1)
        return marker, error_code


def verify_layout(uc: object, context: CpuContext) -> None:
    """Write known values through the public API and check they land where the offsets say."""
    probes = {
        x86.UC_X86_REG_EIP: (EIP, 0x1234ABC0),
        x86.UC_X86_REG_ESP: (ESP, 0x0BADF00C),
        x86.UC_X86_REG_CR3: (CR + 3 * 8, 0x00ABC000),
    }
    saved = {reg: uc.reg_read(reg) for reg in probes}  # type: ignore[attr-defined]
    idtr = uc.reg_read(x86.UC_X86_REG_IDTR)  # type: ignore[attr-defined]
    try:
        for reg, (_, value) in probes.items():
            uc.reg_write(reg, value)  # type: ignore[attr-defined]
        uc.reg_write(x86.UC_X86_REG_IDTR, (0, 0xC0DE0000, 0x7FF, 0))  # type: ignore[attr-defined]
        context.save()
        found = {reg: context.u64(offset) for reg, (offset, _) in probes.items()}
        ok = all(found[reg] == value for reg, (_, value) in probes.items())
        ok = ok and context.u64(IDT + 8) == 0xC0DE0000 and context.u32(IDT + 16) == 0x7FF
    finally:
        for reg, value in saved.items():
            uc.reg_write(reg, value)  # type: ignore[attr-defined]
        uc.reg_write(x86.UC_X86_REG_IDTR, idtr)  # type: ignore[attr-defined]
    if not ok:
        raise EngineError("Unicorn's internal CPU layout is not the one conode was validated on; "
                          f"install unicorn=={UNICORN_VERSION}")
