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
import struct
from typing import Callable, Protocol

import unicorn
from unicorn import unicorn_const as uc_const
from unicorn import x86_const as x86

from conode.errors import EngineError, GuestCrashed
from conode.vm.slicer import SLICE_DEADLINE, SLICE_IRQ_WINDOW, SLICE_REQUEST, SLICE_RUNNING, Slicer

SUPPORTED_UNICORN = "2.1.4"

# Unicorn never resets QEMU's "exception in flight" marker (CPUX86State.old_exception) after a hooked
# exception, so the next fault would be promoted to a double fault. It is reached through a saved context:
# these are byte offsets from the start of Unicorn 2.1.4's uc_context buffer (checked at the first #PF).
_CTX_OLD_EXCEPTION = 5536
_CTX_ERROR_CODE = _CTX_OLD_EXCEPTION - 112
_CTX_SIZE = 5608
_CTX_HEADER = 40  # size, mode, arch and memory-snapshot bookkeeping that precede the CPU state

_VEC_DE, _VEC_UD, _VEC_DF, _VEC_GP, _VEC_PF = 0, 6, 8, 13, 14
_HAS_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17})
# Faults after which QEMU marks an exception in flight (contributory faults, #PF, #DF).
_MARKS_IN_FLIGHT = frozenset({0, 8, 10, 11, 12, 13, 14})
_SOFTWARE_VECTORS_BELOW_32 = frozenset({3, 4})  # int3 and into: trap-like, EIP already past them

_EFLAGS_IF = 1 << 9
_EFLAGS_CLEARED_ON_DELIVERY = (1 << 8) | (1 << 14) | (1 << 16) | (1 << 17)  # TF, NT, RF, VM
_CR0_PE = 1
_CR0_PG = 1 << 31
_CR4_PSE = 1 << 4

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


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


class UnicornCpu:
    """An i386 CPU on Unicorn with host-side exception and interrupt delivery."""

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
        self._ctx_checked = False
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
        self.slicer = Slicer(self.uc, lambda: self.uc.reg_read(x86.UC_X86_REG_EFLAGS))

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
            error_code = None
            if vector in _MARKS_IN_FLIGHT:
                error_code = self._clear_exception_in_flight(vector)
            if vector == 0x80:
                self.stats["syscalls"] += 1
            else:
                self.stats["exceptions"] += 1
            software = vector >= 32 or vector in _SOFTWARE_VECTORS_BELOW_32
            self._deliver(vector, error_code if vector in _HAS_ERROR_CODE else None, software)
        except BaseException as exc:  # never let an exception unwind through Unicorn's C frames
            self._fail(exc)

    def _on_invalid_insn(self, uc: unicorn.Uc, user_data: object) -> bool:
        try:
            self.stats["exceptions"] += 1
            self._deliver(_VEC_UD, None, False)
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
    def _clear_exception_in_flight(self, vector: int) -> int:
        """Reset QEMU's in-flight exception marker; return the fault's error code."""
        ctx = self.uc.context_save()
        base = ctx.context.value
        marker = ctypes.c_int32.from_address(base + _CTX_OLD_EXCEPTION)
        if not self._ctx_checked:
            if ctx.size != _CTX_SIZE or marker.value != vector:
                raise EngineError(
                    f"Unicorn's internal CPU layout is not the one conode was validated on "
                    f"(context {ctx.size} bytes, marker {marker.value}, vector {vector}); "
                    f"use unicorn=={SUPPORTED_UNICORN}"
                )
            self._ctx_checked = True
        error_code = ctypes.c_uint32.from_address(base + _CTX_ERROR_CODE).value
        marker.value = -1
        self.uc.context_restore(ctx)
        return error_code

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

    def _deliver(self, vector: int, error_code: int | None, software: bool) -> None:
        """Deliver *vector* through the guest IDT exactly as the CPU would (32-bit gates, flat segments)."""
        uc = self.uc
        eip, eflags, cs, ss, esp, cr0, cr3, cr4 = uc.reg_read_batch(
            (x86.UC_X86_REG_EIP, x86.UC_X86_REG_EFLAGS, x86.UC_X86_REG_CS, x86.UC_X86_REG_SS,
             x86.UC_X86_REG_ESP, x86.UC_X86_REG_CR0, x86.UC_X86_REG_CR3, x86.UC_X86_REG_CR4)
        )
        _, idt_base, idt_limit, _ = uc.reg_read(x86.UC_X86_REG_IDTR)
        if vector * 8 + 7 > idt_limit:
            raise GuestCrashed(f"interrupt vector {vector} is beyond the guest IDT (limit {idt_limit})")
        gate_at = self._linear_to_physical(idt_base + vector * 8, cr0, cr3, cr4)
        low, high = self.ram.u32(gate_at), self.ram.u32(gate_at + 4)
        gate_type = (high >> 8) & 0x1F
        cpl = cs & 3
        if software and ((high >> 13) & 3) < cpl:
            # A user program raised a kernel-only vector with `int n`: #GP(vector*8+2), as on hardware. #GP
            # is a fault, so the saved EIP goes back to the instruction (CD nn; int3 and into are 1 byte).
            start = eip - 2
            if self.ram.view[self._linear_to_physical(start, cr0, cr3, cr4)] != 0xCD:
                start = eip - 1
            uc.reg_write(x86.UC_X86_REG_EIP, start)
            return self._deliver(_VEC_GP, vector * 8 + 2, False)
        if not high & 0x8000:
            raise GuestCrashed(f"guest took vector {vector} with no IDT gate present (EIP {eip:#x})")
        if gate_type not in (0xE, 0xF):
            what = "a double fault" if vector == _VEC_DF else f"vector {vector} through a task gate"
            raise GuestCrashed(f"guest kernel took {what} at EIP {eip:#x}; it cannot continue")
        target_cs = low >> 16
        target_eip = (low & 0xFFFF) | (high & 0xFFFF0000)
        new_eflags = eflags & ~_EFLAGS_CLEARED_ON_DELIVERY
        if gate_type == 0xE:
            new_eflags &= ~_EFLAGS_IF
        frame = [eflags, cs, eip] if error_code is None else [eflags, cs, eip, error_code]
        if (target_cs & 3) < cpl:
            # Privilege change: the handler's stack comes from the TSS (SS0:ESP0); the old SS:ESP go on it.
            _, tss_base, _, _ = uc.reg_read(x86.UC_X86_REG_TR)
            tss = self._linear_to_physical(tss_base, cr0, cr3, cr4)
            stack_top = self.ram.u32(tss + 4)
            stack_ss = self.ram.u32(tss + 8) & 0xFFFF
            frame = [ss, esp] + frame
            new_esp = (stack_top - 4 * len(frame)) & 0xFFFFFFFF
            self._push(new_esp, frame, cr0, cr3, cr4)
            self._enter_ring0(cr0)
            uc.reg_write(x86.UC_X86_REG_SS, stack_ss)
        else:
            new_esp = (esp - 4 * len(frame)) & 0xFFFFFFFF
            self._push(new_esp, frame, cr0, cr3, cr4)
        uc.reg_write(x86.UC_X86_REG_ESP, new_esp)
        if target_cs != cs:
            uc.reg_write(x86.UC_X86_REG_CS, target_cs)
        uc.reg_write(x86.UC_X86_REG_EFLAGS, new_eflags)
        uc.reg_write(x86.UC_X86_REG_EIP, target_eip)

    def _push(self, esp: int, frame: list[int], cr0: int, cr3: int, cr4: int) -> None:
        """Write an interrupt frame (lowest address first = last pushed) at linear *esp*."""
        words = list(reversed(frame))
        data = struct.pack(f"<{len(words)}I", *words)
        start = self._linear_to_physical(esp, cr0, cr3, cr4)
        end_linear = esp + len(data) - 1
        if (esp >> 12) == (end_linear >> 12):
            self.ram.view[start : start + len(data)] = data
        else:  # the frame straddles a page boundary: map each word on its own
            for i, word in enumerate(words):
                at = self._linear_to_physical(esp + 4 * i, cr0, cr3, cr4)
                self.ram.view[at : at + 4] = _U32.pack(word)

    def _enter_ring0(self, cr0: int) -> None:
        """Make CPL 0 so that Unicorn accepts kernel selectors.

        Unicorn refuses to load a ring-0 SS or CS while CPL is 3. A real-mode style load of SS (PE cleared,
        paging kept) leaves CPL 0; PE is then restored before the kernel selectors are written.
        """
        uc = self.uc
        uc.reg_write(x86.UC_X86_REG_CR0, cr0 & ~_CR0_PE)
        uc.reg_write(x86.UC_X86_REG_SS, 0)
        uc.reg_write(x86.UC_X86_REG_CR0, cr0)

    # --- running ---------------------------------------------------------------------------------------------
    def interrupts_enabled(self) -> bool:
        return bool(self.uc.reg_read(x86.UC_X86_REG_EFLAGS) & _EFLAGS_IF)

    def deliver_interrupt(self, vector: int) -> None:
        """Deliver an external interrupt (from the PIC) between slices."""
        self.stats["interrupts"] += 1
        self._deliver(vector, None, False)

    def run(self, deadline_ns: int, wait_for_if: bool) -> StopReason:
        """Run the guest until *deadline_ns* (host CLOCK_MONOTONIC), a stop request, or HLT."""
        slicer = self.slicer
        slicer.arm(deadline_ns, wait_for_if)
        if slicer.control.stop_request:
            slicer.clear_request()
            return StopReason.REQUEST
        eip = self.uc.reg_read(x86.UC_X86_REG_EIP)
        try:
            self.uc.emu_start(eip, 0)
        except unicorn.UcError as exc:
            if self._pending_error is None:
                eip = self.uc.reg_read(x86.UC_X86_REG_EIP)
                raise GuestCrashed(f"the CPU stopped with {exc} at EIP {eip:#x}") from None
        if self._pending_error is not None:
            error, self._pending_error = self._pending_error, None
            raise error
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
        """The whole CPU state as plain data: Unicorn's saved context (a copy of QEMU's CPUX86State)."""
        ctx = self.uc.context_save()
        return {
            "engine": f"unicorn-{unicorn.__version__}",
            "context": ctypes.string_at(ctx.context.value, ctx.size),
        }

    def set_state(self, state: dict) -> None:
        engine = f"unicorn-{unicorn.__version__}"
        if state.get("engine") != engine:
            raise EngineError(f"snapshot CPU state is from {state.get('engine')}, this host runs {engine}")
        ctx = self.uc.context_save()
        blob = state["context"]
        if len(blob) != ctx.size:
            raise EngineError(f"snapshot CPU context has {len(blob)} bytes, expected {ctx.size}")
        # The header of the buffer (size, mode, arch, owner) belongs to this process: keep ours.
        header = _CTX_HEADER
        ctypes.memmove(ctx.context.value + header, blob[header:], ctx.size - header)
        self.uc.context_restore(ctx)
        self.uc.ctl_flush_tb()  # code translated before the restore belongs to other RAM contents

    def registers(self) -> dict[str, int]:
        """A few registers for diagnostics."""
        names = ("EIP", "ESP", "EFLAGS", "CS", "CR0", "CR3")
        values = self.uc.reg_read_batch([getattr(x86, f"UC_X86_REG_{n}") for n in names])
        return dict(zip(names, values))
