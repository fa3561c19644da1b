"""The passage: exceptions and interrupts delivered through the guest's IDT by the host, as the CPU would.

Stock Unicorn never delivers them itself: it hands each exception to a hook. This module is that hook's
work on the stock engine — and only there: conode's engine (conode/vm/cpu/engine) delivers them in C, in
QEMU's own code. It reads and edits the CPU through one reusable context buffer (conode/vm/cpu/context.py)
and guest RAM directly, so a trap costs a context save, a few RAM accesses and a context restore.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from unicorn import x86_const as x86

from conode.errors import EngineError, GuestCrashed
from conode.vm.cpu import context as ctx_layout
from conode.vm.cpu.context import CpuContext
from conode.vm.cpu.engine import UNICORN_VERSION

if TYPE_CHECKING:
    from conode.vm.cpu.unicorn_cpu import GuestRam, Registers

_VEC_UD, _VEC_DF, _VEC_GP = 6, 8, 13
_HAS_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17})
# Faults after which QEMU marks an exception in flight (contributory faults, #PF, #DF).
_MARKS_IN_FLIGHT = frozenset({0, 8, 10, 11, 12, 13, 14})
_SOFTWARE_VECTORS_BELOW_32 = frozenset({3, 4})  # int3 and into: trap-like, EIP already past them

_EFLAGS_IF = 1 << 9
_EFLAGS_CLEARED_ON_DELIVERY = (1 << 8) | (1 << 14) | (1 << 16) | (1 << 17)  # TF, NT, RF, VM
_CR0_PG = 1 << 31
_CR4_PSE = 1 << 4
_CR4_PAE = 1 << 5
_PAE_ADDRESS = 0x000FFFFFFFFFF000  # bits 12-51 of a PAE entry

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_GATE = struct.Struct("<II")  # an IDT gate or a GDT descriptor: low and high doublewords
_TSS_STACK0 = struct.Struct("<II")  # ESP0, SS0 at offset 4 of a 32-bit TSS
_DESC_B = 1 << 22  # 32-bit segment
_DESC_G = 1 << 23  # limit in pages


class Passage:
    """Delivers vectors into the guest for one CPU: its RAM, its context buffer and its register access."""

    def __init__(self, ram: "GuestRam", context: CpuContext, regs: "Registers") -> None:
        self.ram = ram
        self._context = context
        self.regs = regs
        self._marker_checked = False

    def exception(self, vector: int) -> None:
        """An exception or software interrupt Unicorn raised (its UC_HOOK_INTR)."""
        software = vector >= 32 or vector in _SOFTWARE_VECTORS_BELOW_32
        self.deliver(vector, software=software, in_flight=vector in _MARKS_IN_FLIGHT)

    def invalid_opcode(self) -> None:
        self.deliver(_VEC_UD)

    def _linear_to_physical(self, linear: int, cr0: int, cr3: int, cr4: int) -> int:
        """Walk the guest's page tables (two-level, or PAE's three); raise GuestCrashed if *linear* is not
        mapped to RAM."""
        if not cr0 & _CR0_PG:
            return linear
        if cr4 & _CR4_PAE:
            return self._pae_to_physical(linear, cr3)
        ram = self.ram
        pde = ram.u32((cr3 & 0xFFFFF000) + ((linear >> 22) << 2))
        if not pde & 1:
            raise GuestCrashed(f"kernel stack or IDT not mapped at {linear:#x}")
        if pde & 0x80 and cr4 & _CR4_PSE:
            return (pde & 0xFFC00000) | (linear & 0x3FFFFF)
        pte = ram.u32((pde & 0xFFFFF000) + (((linear >> 12) & 0x3FF) << 2))
        if not pte & 1:
            raise GuestCrashed(f"kernel stack or IDT not mapped at {linear:#x}")
        return (pte & 0xFFFFF000) | (linear & 0xFFF)

    def _pae_to_physical(self, linear: int, cr3: int) -> int:
        entry = self._pae_entry((cr3 & 0xFFFFFFE0) + ((linear >> 30) & 3) * 8, linear)
        entry = self._pae_entry((entry & _PAE_ADDRESS) + ((linear >> 21) & 0x1FF) * 8, linear)
        if entry & 0x80:  # a 2 MiB page
            return (entry & _PAE_ADDRESS & ~0x1FFFFF) | (linear & 0x1FFFFF)
        entry = self._pae_entry((entry & _PAE_ADDRESS) + ((linear >> 12) & 0x1FF) * 8, linear)
        return (entry & _PAE_ADDRESS) | (linear & 0xFFF)

    def _pae_entry(self, address: int, linear: int) -> int:
        if address + 8 > self.ram.size:
            raise GuestCrashed(f"the page tables for {linear:#x} lie outside RAM")
        entry = self.ram.u32(address) | self.ram.u32(address + 4) << 32
        if not entry & 1:
            raise GuestCrashed(f"kernel stack or IDT not mapped at {linear:#x}")
        return entry

    def deliver(self, vector: int, software: bool = False, in_flight: bool = False,
                 error_code: int | None = None) -> None:
        """Deliver *vector* through the guest IDT as the CPU would (32-bit gates; Linux's flat segments).

        One context save gives every register the passage reads; the frame is written straight into guest
        RAM; the new CS:EIP, SS:ESP, EFLAGS and CPL are edited into the context, which one restore applies.
        """
        context = self._context
        context.save()
        view = context.view
        if in_flight:
            # Unicorn never clears QEMU's "exception in flight" marker after a hooked exception, so the
            # next fault would be promoted to a double fault. Clear it; the fault's error code is beside it.
            marker, code = context.take_exception_in_flight()
            if not self._marker_checked:
                if marker != vector:
                    raise EngineError(f"Unicorn's exception marker reads {marker} during vector {vector}; "
                                      f"conode was validated on unicorn=={UNICORN_VERSION}")
                self._marker_checked = True
            if vector in _HAS_ERROR_CODE:
                error_code = code
        eip = _U64.unpack_from(view, ctx_layout.EIP)[0] & 0xFFFFFFFF
        hflags = context.u32(ctx_layout.HFLAGS)
        cpl = hflags & ctx_layout.HF_CPL_MASK
        cr0, _, _, cr3, cr4 = context.control_registers()
        idt_base = context.u64(ctx_layout.IDT + 8)
        idt_limit = context.u32(ctx_layout.IDT + 16)
        if vector * 8 + 7 > idt_limit:
            raise GuestCrashed(f"interrupt vector {vector} is beyond the guest IDT (limit {idt_limit})")
        gate_at = self._linear_to_physical(idt_base + vector * 8, cr0, cr3, cr4)
        low, high = _GATE.unpack_from(self.ram.view, gate_at)
        if software and ((high >> 13) & 3) < cpl:
            # A user program raised a kernel-only vector with `int n`: #GP(vector*8+2), as on hardware. #GP
            # is a fault, so the saved EIP goes back to the instruction (CD nn; int3 and into are 1 byte).
            start = eip - 2
            if self.ram.view[self._linear_to_physical(start, cr0, cr3, cr4)] != 0xCD:
                start = eip - 1
            self.regs.write(x86.UC_X86_REG_EIP, start)
            return self.deliver(_VEC_GP, error_code=vector * 8 + 2)
        if not high & 0x8000:
            raise GuestCrashed(f"guest took vector {vector} with no IDT gate present (EIP {eip:#x})")
        gate_type = (high >> 8) & 0x1F
        if gate_type not in (0xE, 0xF):
            what = "a double fault" if vector == _VEC_DF else f"vector {vector} through a task gate"
            raise GuestCrashed(f"guest kernel took {what} at EIP {eip:#x}; it cannot continue")
        self._enter_gate(vector, low, high, eip, cpl, hflags, cr0, cr3, cr4, error_code)

    def _enter_gate(self, vector: int, low: int, high: int, eip: int, cpl: int, hflags: int, cr0: int,
                    cr3: int, cr4: int, error_code: int | None) -> None:
        context = self._context
        eflags = self.regs.read(x86.UC_X86_REG_EFLAGS)  # with the lazily computed arithmetic flags
        cs = context.u32(ctx_layout.SEG_CS)
        ss = context.u32(ctx_layout.SEG_SS)
        esp = context.u64(ctx_layout.ESP) & 0xFFFFFFFF
        target_cs = low >> 16
        target_eip = (low & 0xFFFF) | (high & 0xFFFF0000)
        target_cpl = target_cs & 3
        frame = (eflags, cs, eip) if error_code is None else (eflags, cs, eip, error_code)
        if target_cpl < cpl:
            # Privilege change: the handler's stack comes from the TSS (SS0:ESP0); the old SS:ESP go on it.
            tss = self._linear_to_physical(context.u64(ctx_layout.TR + 8), cr0, cr3, cr4)
            stack_top, stack_ss = _TSS_STACK0.unpack_from(self.ram.view, tss + 4)
            stack_ss &= 0xFFFF
            frame = (ss, esp) + frame
            new_esp = (stack_top - 4 * len(frame)) & 0xFFFFFFFF
            self._push(new_esp, frame, cr0, cr3, cr4)
            ss_flags = self._load_segment(ctx_layout.SEG_SS, stack_ss, cr0, cr3, cr4)
            hflags = (hflags & ~ctx_layout.HF_SS32_MASK) | (ctx_layout.HF_SS32_MASK if ss_flags & _DESC_B else 0)
        else:
            new_esp = (esp - 4 * len(frame)) & 0xFFFFFFFF
            self._push(new_esp, frame, cr0, cr3, cr4)
        if target_cs != cs:
            cs_flags = self._load_segment(ctx_layout.SEG_CS, target_cs, cr0, cr3, cr4)
            hflags = (hflags & ~ctx_layout.HF_CS32_MASK) | (ctx_layout.HF_CS32_MASK if cs_flags & _DESC_B else 0)
        hflags = (hflags & ~(ctx_layout.HF_CPL_MASK | ctx_layout.HF_INHIBIT_IRQ_MASK)) | target_cpl
        cleared = _EFLAGS_CLEARED_ON_DELIVERY | (_EFLAGS_IF if (high >> 8) & 0x1F == 0xE else 0)
        raw_eflags = context.u64(ctx_layout.EFLAGS) & ~cleared
        context.set_u64(ctx_layout.ESP, new_esp)
        context.set_u64(ctx_layout.EIP, target_eip)
        context.set_u64(ctx_layout.EFLAGS, raw_eflags)
        context.set_u32(ctx_layout.HFLAGS, hflags)
        context.restore()

    def _load_segment(self, offset: int, selector: int, cr0: int, cr3: int, cr4: int) -> int:
        """Fill a segment cache in the context from the guest GDT, as a segment load would; return its flags."""
        context = self._context
        gdt_base = context.u64(ctx_layout.GDT + 8)
        if selector & 4 or (selector | 7) > context.u32(ctx_layout.GDT + 16):
            raise GuestCrashed(f"interrupt gate names selector {selector:#x} outside the GDT")
        e1, e2 = _GATE.unpack_from(self.ram.view, self._linear_to_physical(gdt_base + (selector & ~7), cr0, cr3, cr4))
        base = (e1 >> 16) | ((e2 & 0xFF) << 16) | (e2 & 0xFF000000)
        limit = (e1 & 0xFFFF) | (e2 & 0x000F0000)
        if e2 & _DESC_G:
            limit = (limit << 12) | 0xFFF
        ctx_layout.SEGMENT.pack_into(context.view, offset, selector, base, limit, e2)
        return e2

    def _push(self, esp: int, frame: tuple[int, ...], cr0: int, cr3: int, cr4: int) -> None:
        """Write an interrupt frame (lowest address first = last pushed) at linear *esp*."""
        words = frame[::-1]
        data = struct.pack(f"<{len(words)}I", *words)
        start = self._linear_to_physical(esp, cr0, cr3, cr4)
        if (esp >> 12) == ((esp + len(data) - 1) >> 12):
            self.ram.view[start : start + len(data)] = data
        else:  # the frame straddles a page boundary: map each word on its own
            for i, word in enumerate(words):
                at = self._linear_to_physical(esp + 4 * i, cr0, cr3, cr4)
                self.ram.view[at : at + 4] = _U32.pack(word)
