"""The emulated i386 CPU: the only module that knows Unicorn.

Unicorn is a CPU, not a PC: it never delivers an exception or an interrupt through the guest's IDT. This
module therefore contains *the passage*, the host-side delivery of exceptions and interrupts, and offers the
rest of the machine a small interface: run a slice until a deadline, deliver an interrupt vector, read and
write the whole CPU state for snapshots, and route port I/O and MMIO to the devices.

Guest RAM is host memory mapped into Unicorn (``mem_map_ptr``), so the passage and the devices read guest
memory through a ``memoryview`` without crossing into the library.
"""

from __future__ import annotations

import ctypes
import enum
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Callable, Protocol

import unicorn
from unicorn import unicorn_const as uc_const
from unicorn import x86_const as x86
from unicorn.unicorn_py3.unicorn import uclib

from conode.errors import EngineError, GuestCrashed, SnapshotError
from conode.vm import _uc_context as ctx_layout
from conode.vm import state
from conode.vm._uc_context import CpuContext, verify_layout
from conode.vm.slicer import SLICE_DEADLINE, SLICE_IRQ_WINDOW, SLICE_REQUEST, SLICE_RUNNING, Slicer
from conode.vm.state import blob

SUPPORTED_UNICORN = "2.1.4"

_VEC_DE, _VEC_UD, _VEC_DF, _VEC_GP, _VEC_PF = 0, 6, 8, 13, 14
_HAS_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17})
# Faults after which QEMU marks an exception in flight (contributory faults, #PF, #DF).
_MARKS_IN_FLIGHT = frozenset({0, 8, 10, 11, 12, 13, 14})
_SOFTWARE_VECTORS_BELOW_32 = frozenset({3, 4})  # int3 and into: trap-like, EIP already past them

_EFLAGS_IF = 1 << 9
_EFLAGS_CLEARED_ON_DELIVERY = (1 << 8) | (1 << 14) | (1 << 16) | (1 << 17)  # TF, NT, RF, VM
_CR0_PG = 1 << 31
_CR4_PSE = 1 << 4

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_GATE = struct.Struct("<II")  # an IDT gate or a GDT descriptor: low and high doublewords
_TSS_STACK0 = struct.Struct("<II")  # ESP0, SS0 at offset 4 of a 32-bit TSS
_DESC_B = 1 << 22  # 32-bit segment
_DESC_G = 1 << 23  # limit in pages


def _context_layout() -> str:
    """What the saved context blob's layout depends on: the Unicorn release (both engines share it)."""
    return f"unicorn-{unicorn.__version__}"


@dataclass(frozen=True)
class CpuState(state.Record):
    KIND = "CPU"
    VERSION = 1

    layout: str = blob(max_len=64)
    context: bytes = blob(exact=ctx_layout.CONTEXT_SIZE - ctx_layout.HEADER)


class StopReason(enum.Enum):
    """Why a slice of guest execution ended."""

    DEADLINE = "deadline"  # the slice's time ran out
    REQUEST = "request"  # the host asked for the CPU back (device event, owner activity)
    IRQ_WINDOW = "irq-window"  # the guest enabled interrupts while one is pending
    HALT = "halt"  # the guest executed HLT: it is idle until the next interrupt


class PortBus(Protocol):
    """Where port I/O goes: the machine's device table."""

    def port_read(self, port: int, size: int) -> int: ...

    def port_write(self, port: int, size: int, value: int) -> None: ...


# The CPU the guest sees. The kernel is built for a 486 and needs no TSC; hiding it (and SEP, APIC, PAE)
# keeps the guest on the PIT, on int 0x80 and on the 8259s, which is all this machine provides.
_CPUID_VENDOR = b"GenuineIntel"
_CPUID_FEATURES_EDX = (
    (1 << 0)  # FPU
    | (1 << 3)  # PSE: 4 MiB pages for the kernel's direct map
    | (1 << 8)  # CX8
    | (1 << 13)  # PGE
    | (1 << 15)  # CMOV: Debian's i386 busybox uses it
    | (1 << 23)  # MMX
    | (1 << 24)  # FXSR
)
_CPUID_SIGNATURE = (6 << 8) | (1 << 4) | 1  # family 6, model 1, stepping 1: a Pentium Pro-class part


def cpuid_leaf(leaf: int) -> tuple[int, int, int, int]:
    """EAX, EBX, ECX, EDX for CPUID *leaf*: a pure function, so it is tested on its own."""
    if leaf == 0:
        ebx, edx, ecx = struct.unpack("<III", _CPUID_VENDOR)
        return 1, ebx, ecx, edx
    if leaf == 1:
        return _CPUID_SIGNATURE, 0, 0, _CPUID_FEATURES_EDX
    if leaf == 0x80000000:
        return 0x80000000, 0, 0, 0
    return 0, 0, 0, 0


class _TableRegister(ctypes.Structure):
    """struct uc_x86_mmr from unicorn/x86.h: GDTR, IDTR, LDTR and TR."""

    _fields_ = [("selector", ctypes.c_uint16), ("base", ctypes.c_uint64), ("limit", ctypes.c_uint32),
                ("flags", ctypes.c_uint32)]


class _Registers:
    """Register access through Unicorn's C API directly: the binding's generic path costs 2-15 µs a call,
    which the passage cannot afford (it needs a dozen per trap)."""

    def __init__(self, uc: unicorn.Uc) -> None:
        self._handle = uc._uch
        self._read = uclib.uc_reg_read
        self._write = uclib.uc_reg_write
        self._value = ctypes.c_uint64()
        self._value_ref = ctypes.byref(self._value)
        self._mmr = _TableRegister()
        self._mmr_ref = ctypes.byref(self._mmr)

    def read(self, reg: int) -> int:
        self._value.value = 0
        self._read(self._handle, reg, self._value_ref)
        return self._value.value

    def write(self, reg: int, value: int) -> None:
        self._value.value = value
        if self._write(self._handle, reg, self._value_ref) != 0:
            raise EngineError(f"Unicorn refused a write of {value:#x} to register {reg}")

    def table_base(self, reg: int) -> tuple[int, int]:
        """Base and limit of a descriptor-table register (IDTR, GDTR, TR)."""
        self._read(self._handle, reg, self._mmr_ref)
        return self._mmr.base, self._mmr.limit


class GuestRam:
    """Guest physical RAM as host memory, shared with Unicorn."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._map = mmap.mmap(-1, size)
        self.view = memoryview(self._map)
        self.host_address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))

    def read(self, address: int, length: int) -> bytes:
        if address < 0 or address + length > self.size:
            raise GuestCrashed(f"guest physical access out of RAM at {address:#x}+{length}")
        return bytes(self.view[address : address + length])

    def u32(self, address: int) -> int:
        return _U32.unpack_from(self._map, address)[0]


_ACK_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)


def engine_has_native_interrupts() -> bool:
    """Whether the loaded Unicorn is conode's engine, which can deliver exceptions and IRQs itself."""
    return hasattr(uclib, "uc_conode_native_interrupts")


class UnicornCpu:
    """An i386 CPU on Unicorn with host-side exception and interrupt delivery.

    With conode's engine (conode/vm/engine) the delivery happens in C, in QEMU's own code, and external
    interrupts come from a line the PIC drives (:meth:`set_irq_line`), acknowledged through a callback; the
    Python passage below then only serves stock Unicorn.
    """

    def __init__(self, ram: GuestRam, ports: PortBus) -> None:
        if unicorn.__version__ != SUPPORTED_UNICORN:
            raise EngineError(
                f"conode needs unicorn=={SUPPORTED_UNICORN} (found {unicorn.__version__}); "
                f"install it with: pip install unicorn=={SUPPORTED_UNICORN}"
            )
        self.ram = ram
        self._ports = ports
        self.uc = unicorn.Uc(uc_const.UC_ARCH_X86, uc_const.UC_MODE_32)
        self.uc.ctl_set_cpu_model(x86.UC_CPU_X86_QEMU32)
        # An `until` address would raise bogus page faults once paging is on: run until stopped instead.
        self.uc.ctl_exits_enabled(True)
        self.uc.ctl_set_exits([])
        self.uc.mem_map_ptr(0, ram.size, uc_const.UC_PROT_ALL, ram.host_address)
        self.regs = _Registers(self.uc)
        self._context = CpuContext(self.uc)  # reused: allocating one per trap would cost microseconds
        verify_layout(self.uc, self._context)
        self._marker_checked = False
        self._pending_error: BaseException | None = None
        self.stats = {"exceptions": 0, "interrupts": 0, "syscalls": 0}
        self._hooks = [
            self.uc.hook_add(uc_const.UC_HOOK_INSN, self._on_in, None, 1, 0, x86.UC_X86_INS_IN),
            self.uc.hook_add(uc_const.UC_HOOK_INSN, self._on_out, None, 1, 0, x86.UC_X86_INS_OUT),
            self.uc.hook_add(uc_const.UC_HOOK_INSN, self._on_cpuid, None, 1, 0, x86.UC_X86_INS_CPUID),
            self.uc.hook_add(uc_const.UC_HOOK_INTR, self._on_exception),
            self.uc.hook_add(uc_const.UC_HOOK_INSN_INVALID, self._on_invalid_insn),
            self.uc.hook_add(uc_const.UC_HOOK_MEM_UNMAPPED, self._on_unmapped),
        ]
        self.slicer = Slicer(self.uc, lambda: self.regs.read(x86.UC_X86_REG_EFLAGS))
        self.native_interrupts = engine_has_native_interrupts() and os.environ.get("CONODE_PASSAGE") != "python"
        self._ack_callback: object = None
        if self.native_interrupts:
            uclib.uc_conode_native_interrupts(self.uc._uch, True)
            uclib.uc_conode_take_reset.restype = ctypes.c_bool

    def connect_interrupt_controller(self, acknowledge: Callable[[], int]) -> None:
        """Native interrupts: the CPU asks *acknowledge* for the vector when it takes an external interrupt."""
        if not self.native_interrupts:
            return

        def ack(opaque: object) -> int:
            try:
                self.stats["interrupts"] += 1
                return acknowledge()
            except BaseException as exc:  # never unwind through Unicorn's C frames
                self._fail(exc)
                return -1

        self._ack_callback = _ACK_CALLBACK(ack)
        uclib.uc_conode_set_pic(self.uc._uch, self._ack_callback, None)

    def set_irq_line(self, level: bool) -> None:
        """Native interrupts: raise or lower the CPU's INTR input."""
        uclib.uc_conode_irq_line(self.uc._uch, bool(level))

    # --- devices ------------------------------------------------------------------------------------------
    def map_mmio(
        self,
        base: int,
        size: int,
        read: Callable[[int, int], int],
        write: Callable[[int, int, int], None],
    ) -> None:
        """Route guest-physical [base, base+size) to a device's read(offset, size) / write(offset, size, value)."""
        self.uc.mmio_map(
            base,
            size,
            lambda uc, offset, sz, ud: read(offset, sz),
            None,
            lambda uc, offset, sz, value, ud: write(offset, sz, value),
            None,
        )

    def write_phys(self, address: int, data: bytes) -> None:
        """Device DMA into guest RAM: through Unicorn, so translated code on those pages is invalidated."""
        self.uc.mem_write(address, data)

    # --- hooks ---------------------------------------------------------------------------------------------
    def _on_in(self, uc: unicorn.Uc, port: int, size: int, user_data: object) -> int:
        return self._ports.port_read(port, size)

    def _on_out(self, uc: unicorn.Uc, port: int, size: int, value: int, user_data: object) -> None:
        self._ports.port_write(port, size, value)

    def _on_cpuid(self, uc: unicorn.Uc, user_data: object) -> int:
        eax, ebx, ecx, edx = cpuid_leaf(uc.reg_read(x86.UC_X86_REG_EAX))
        uc.reg_write(x86.UC_X86_REG_EAX, eax)
        uc.reg_write(x86.UC_X86_REG_EBX, ebx)
        uc.reg_write(x86.UC_X86_REG_ECX, ecx)
        uc.reg_write(x86.UC_X86_REG_EDX, edx)
        return 1  # skip Unicorn's own CPUID

    def _on_exception(self, uc: unicorn.Uc, vector: int, user_data: object) -> None:
        try:
            if vector == 0x80:
                self.stats["syscalls"] += 1
            else:
                self.stats["exceptions"] += 1
            software = vector >= 32 or vector in _SOFTWARE_VECTORS_BELOW_32
            self._deliver(vector, software=software, in_flight=vector in _MARKS_IN_FLIGHT)
        except BaseException as exc:  # never let an exception unwind through Unicorn's C frames
            self._fail(exc)

    def _on_invalid_insn(self, uc: unicorn.Uc, user_data: object) -> bool:
        try:
            self.stats["exceptions"] += 1
            self._deliver(_VEC_UD)
        except BaseException as exc:
            self._fail(exc)
        return True

    def _on_unmapped(
        self, uc: unicorn.Uc, access: int, address: int, size: int, value: int, user_data: object
    ) -> bool:
        eip = uc.reg_read(x86.UC_X86_REG_EIP)
        kind = "write to" if access in (uc_const.UC_MEM_WRITE_UNMAPPED,) else "access to"
        self._fail(GuestCrashed(f"guest {kind} unbacked physical address {address:#x} at EIP {eip:#x}"))
        return False

    def _fail(self, exc: BaseException) -> None:
        if self._pending_error is None:
            self._pending_error = exc
        self.uc.emu_stop()

    # --- the passage -------------------------------------------------------------------------------------
    def _linear_to_physical(self, linear: int, cr0: int, cr3: int, cr4: int) -> int:
        """Walk the guest's (non-PAE) page tables; raise GuestCrashed if *linear* is not mapped."""
        if not cr0 & _CR0_PG:
            return linear
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

    def _deliver(self, vector: int, software: bool = False, in_flight: bool = False,
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
                                      f"conode was validated on unicorn=={SUPPORTED_UNICORN}")
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
            return self._deliver(_VEC_GP, error_code=vector * 8 + 2)
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

    # --- running ---------------------------------------------------------------------------------------------
    def interrupts_enabled(self) -> bool:
        return bool(self.regs.read(x86.UC_X86_REG_EFLAGS) & _EFLAGS_IF)

    def deliver_interrupt(self, vector: int) -> None:
        """Deliver an external interrupt (from the PIC) between slices."""
        self.stats["interrupts"] += 1
        self._deliver(vector)

    def run(self, deadline_ns: int, wait_for_if: bool) -> StopReason:
        """Run the guest until *deadline_ns* (host CLOCK_MONOTONIC), a stop request, or HLT."""
        slicer = self.slicer
        slicer.arm(deadline_ns, wait_for_if)
        if slicer.control.stop_request:
            slicer.clear_request()
            return StopReason.REQUEST
        eip = self.regs.read(x86.UC_X86_REG_EIP)
        try:
            self.uc.emu_start(eip, 0)
        except unicorn.UcError as exc:
            if self._pending_error is None:
                eip = self.uc.reg_read(x86.UC_X86_REG_EIP)
                raise GuestCrashed(f"the CPU stopped with {exc} at EIP {eip:#x}") from None
        finally:
            slicer.disarm()
        if self._pending_error is not None:
            error, self._pending_error = self._pending_error, None
            raise error
        if self.native_interrupts and uclib.uc_conode_take_reset(self.uc._uch):
            eip = self.regs.read(x86.UC_X86_REG_EIP)
            raise GuestCrashed(f"the guest CPU triple-faulted at EIP {eip:#x} (a fault while delivering a double "
                               f"fault); it cannot continue")
        reason = slicer.control.reason
        if slicer.control.stop_request:
            slicer.clear_request()
            return StopReason.REQUEST
        if reason == SLICE_RUNNING:
            return StopReason.HALT
        return {SLICE_DEADLINE: StopReason.DEADLINE, SLICE_REQUEST: StopReason.REQUEST,
                SLICE_IRQ_WINDOW: StopReason.IRQ_WINDOW}[reason]

    def request_stop(self) -> None:
        """End the running slice soon; safe from any thread and from device callbacks."""
        self.slicer.request_stop()

    # --- boot and snapshots ------------------------------------------------------------------------------
    def enter_protected_mode(self, gdt_base: int, gdt_limit: int, cs: int, ds: int, eip: int,
                             esi: int) -> None:
        """Set up the state the Linux 32-bit boot protocol expects at code32_start."""
        uc = self.uc
        uc.reg_write(x86.UC_X86_REG_GDTR, (0, gdt_base, gdt_limit, 0))
        uc.reg_write(x86.UC_X86_REG_CR0, 0x11)  # PE, ET
        uc.reg_write(x86.UC_X86_REG_CS, cs)
        for reg in (x86.UC_X86_REG_DS, x86.UC_X86_REG_ES, x86.UC_X86_REG_SS,
                    x86.UC_X86_REG_FS, x86.UC_X86_REG_GS):
            uc.reg_write(reg, ds)
        for reg in (x86.UC_X86_REG_EAX, x86.UC_X86_REG_EBX, x86.UC_X86_REG_ECX, x86.UC_X86_REG_EDX,
                    x86.UC_X86_REG_EDI, x86.UC_X86_REG_EBP, x86.UC_X86_REG_ESP):
            uc.reg_write(reg, 0)
        uc.reg_write(x86.UC_X86_REG_ESI, esi)
        uc.reg_write(x86.UC_X86_REG_EFLAGS, 0x2)  # interrupts off
        uc.reg_write(x86.UC_X86_REG_EIP, eip)

    def get_state(self) -> dict:
        """The whole CPU state as plain data: QEMU's CPUX86State as Unicorn's context holds it (the context's
        own header describes this process's buffer, not the guest, and is left out)."""
        ctx = self.uc.context_save()
        blob = ctypes.string_at(ctx.context.value + ctx_layout.HEADER, ctx.size - ctx_layout.HEADER)
        return state.dump(CpuState(_context_layout(), blob))

    def set_state(self, data: dict) -> None:
        """Restore :meth:`get_state` output; raise SnapshotError (and change nothing) if it is not valid."""
        saved = state.load(CpuState, data)
        if saved.layout != _context_layout():
            raise SnapshotError(f"snapshot CPU state is laid out for {saved.layout}; this host runs "
                                f"{_context_layout()}: boot the guest afresh")
        ctx = self.uc.context_save()
        ctypes.memmove(ctx.context.value + ctx_layout.HEADER, saved.context, len(saved.context))
        self.uc.context_restore(ctx)
        self.uc.ctl_flush_tb()  # code translated before the restore belongs to other RAM contents

    def registers(self) -> dict[str, int]:
        """A few registers for diagnostics."""
        names = ("EIP", "ESP", "EFLAGS", "CS", "CR0", "CR3")
        values = self.uc.reg_read_batch([getattr(x86, f"UC_X86_REG_{n}") for n in names])
        return dict(zip(names, values))
