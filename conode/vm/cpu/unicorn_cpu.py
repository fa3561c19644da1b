"""The emulated i386 CPU: with the modules beside it (context, passage, slicer), all that knows Unicorn.

Unicorn is a CPU, not a PC: stock Unicorn never delivers an exception or an interrupt through the guest's IDT,
so on it :mod:`conode.vm.cpu.passage` does, from Unicorn's hooks. This module offers the rest of the machine a
small interface: run a slice until a deadline, deliver an interrupt vector, read and write the whole CPU
state for snapshots, and route port I/O and MMIO to the devices.

Guest RAM is host memory mapped into Unicorn (``mem_map_ptr``), so the passage and the devices read guest
memory through a ``memoryview`` without crossing into the library.
"""

from __future__ import annotations

import ctypes
import enum
import mmap
import os
import struct
import tempfile
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import unicorn
from unicorn import unicorn_const as uc_const
from unicorn import x86_const as x86
from unicorn.unicorn_py3.unicorn import uclib

from conode.errors import EngineError, GuestCrashed, SnapshotError
from conode.vm import state
from conode.vm.clock import NS_PER_S, TSC_HZ, VirtualClock
from conode.vm.cpu import context as ctx_layout
from conode.vm.cpu.cpuid import UNICORN_MODEL, cpuid_leaf
from conode.vm.cpu.context import CpuContext, verify_layout
from conode.vm.cpu.engine import UNICORN_VERSION
from conode.vm.cpu.passage import Passage
from conode.vm.cpu.slicer import (SLICE_DEADLINE, SLICE_IRQ_WINDOW, SLICE_REQUEST, SLICE_RUNNING, Slicer,
                                  holding_gil)
from conode.vm.state import blob

_EFLAGS_IF = 1 << 9
_U32 = struct.Struct("<I")

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


class _TableRegister(ctypes.Structure):
    """struct uc_x86_mmr from unicorn/x86.h: GDTR, IDTR, LDTR and TR."""

    _fields_ = [("selector", ctypes.c_uint16), ("base", ctypes.c_uint64), ("limit", ctypes.c_uint32),
                ("flags", ctypes.c_uint32)]


class Registers:
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


class RamImage:
    """A guest RAM image in an unlinked memory file. Guests mapped from it share its pages copy-on-write: a
    fresh guest's RAM is ready at once, and each guest pays only for the pages it changes."""

    def __init__(self, size: int) -> None:
        self.size = size
        if hasattr(os, "memfd_create"):  # Linux: the image lives in RAM
            self._file = os.fdopen(os.memfd_create("conode-ram-image", os.MFD_CLOEXEC), "w+b")
        else:  # elsewhere a temporary file the OS deletes on close
            self._file = tempfile.TemporaryFile()
        self._file.truncate(size)

    def writable(self) -> mmap.mmap:
        """A shared mapping to fill the image through (zeroed at first); close it when done."""
        return mmap.mmap(self._file.fileno(), self.size, access=mmap.ACCESS_WRITE)

    def private_copy(self) -> mmap.mmap:
        return mmap.mmap(self._file.fileno(), self.size, access=mmap.ACCESS_COPY)

    def close(self) -> None:
        self._file.close()


class GuestRam:
    """Guest physical RAM as host memory, shared with Unicorn: zeroed, or a private copy of a RamImage."""

    def __init__(self, size: int, image: RamImage | None = None) -> None:
        if image is not None and image.size != size:
            raise ValueError(f"a RAM image of {image.size} bytes for a guest of {size}")
        self.size = size
        self._map = image.private_copy() if image is not None else mmap.mmap(-1, size)
        self.view = memoryview(self._map)
        self.host_address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))

    def read(self, address: int, length: int) -> bytes:
        if address < 0 or address + length > self.size:
            raise GuestCrashed(f"guest physical access out of RAM at {address:#x}+{length}")
        return bytes(self.view[address : address + length])

    def u32(self, address: int) -> int:
        return _U32.unpack_from(self._map, address)[0]


_ACK_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
_INSN_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)  # uc_cb_insn_cpuid_t


def engine_has_native_interrupts() -> bool:
    """Whether the loaded Unicorn is conode's engine, which can deliver exceptions and IRQs itself."""
    return hasattr(uclib, "uc_conode_native_interrupts")


class UnicornCpu:
    """An i386 CPU on Unicorn with host-side exception and interrupt delivery.

    With conode's engine (conode/vm/cpu/engine) the delivery happens in C, in QEMU's own code, and external
    interrupts come from a line the PIC drives (:meth:`set_irq_line`), acknowledged through a callback; the
    Python passage (conode/vm/cpu/passage.py) then only serves stock Unicorn.
    """

    def __init__(self, ram: GuestRam, ports: PortBus) -> None:
        if unicorn.__version__ != UNICORN_VERSION:
            raise EngineError(
                f"conode needs unicorn=={UNICORN_VERSION} (found {unicorn.__version__}); "
                f"install it with: pip install unicorn=={UNICORN_VERSION}"
            )
        self.ram = ram
        self._ports = ports
        self.uc = unicorn.Uc(uc_const.UC_ARCH_X86, uc_const.UC_MODE_32)
        self.uc.ctl_set_cpu_model(UNICORN_MODEL)
        # An `until` address would raise bogus page faults once paging is on: run until stopped instead.
        self.uc.ctl_exits_enabled(True)
        self.uc.ctl_set_exits([])
        self.uc.mem_map_ptr(0, ram.size, uc_const.UC_PROT_ALL, ram.host_address)
        self.regs = Registers(self.uc)
        context = CpuContext(self.uc)  # reused: allocating one per trap would cost microseconds
        verify_layout(self.uc, context)
        self._passage = Passage(ram, context, self.regs)
        self._pending_error: BaseException | None = None
        self._rdtsc_callback: object = None  # RDTSC's hook, kept alive (connect_clock)
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
        conodes_engine = engine_has_native_interrupts()
        self.native_interrupts = conodes_engine and os.environ.get("CONODE_PASSAGE") != "python"
        # Only conode's engine computes the x87 as hardware does; on stock Unicorn the guest has no FPU
        # (cpuid.py) and the kernel emulates the x87 itself.
        self.has_fpu = conodes_engine
        self._ack_callback: object = None
        # Device DMA and the interrupt line are short calls made often, from the machine thread and from device
        # callbacks: they keep the GIL (slicer.holding_gil).
        self._mem_write = holding_gil(uclib.uc_mem_write, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64,
                                      ctypes.c_char_p, ctypes.c_uint64)
        self._mem_write_at = holding_gil(uclib.uc_mem_write, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64,
                                         ctypes.c_void_p, ctypes.c_uint64)  # from a host address: a disk read
        if self.native_interrupts:
            uclib.uc_conode_native_interrupts(self.uc._uch, True)
            uclib.uc_conode_take_reset.restype = ctypes.c_bool
            self._irq_line = holding_gil(uclib.uc_conode_irq_line, ctypes.c_int, ctypes.c_void_p,
                                         ctypes.c_bool)

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

    def connect_clock(self, clock: VirtualClock) -> None:
        """RDTSC reads *clock* (the machine's virtual clock) instead of the host's counter, which would run on
        while the guest is paused and jump when a snapshot resumes on another host. conode's engine reads it in
        C, told of every pause and resume (a kernel with the TSC as clocksource reads it thousands of times a
        second: a hook each, with the engine's search for the instruction's address, cost more than the read);
        stock Unicorn, or a clock on another host clock (a test's), calls :meth:`VirtualClock.tsc` per read."""
        if TSC_HZ == NS_PER_S and hasattr(uclib, "uc_conode_virtual_tsc"):
            native = uclib.uc_conode_virtual_tsc
            native.argtypes = [ctypes.c_void_p, ctypes.c_bool, ctypes.c_uint64, ctypes.c_int64]

            def follow(base_ns: int, resumed_at: int | None) -> None:
                native(self.uc._uch, True, base_ns, -1 if resumed_at is None else resumed_at)

            if clock.follow(follow):
                return

        def on_rdtsc(handle: object, user_data: object) -> int:
            try:
                value = clock.tsc()
                self.regs.write(x86.UC_X86_REG_EAX, value & 0xFFFF_FFFF)
                self.regs.write(x86.UC_X86_REG_EDX, value >> 32)
            except BaseException as exc:  # never unwind through Unicorn's C frames
                self._fail(exc)
            return 1  # skip Unicorn's own RDTSC

        # The binding offers no RDTSC hook (Unicorn does): added through the C API, like the engine's own calls.
        self._rdtsc_callback = _INSN_CALLBACK(on_rdtsc)
        hook = ctypes.c_size_t()
        status = uclib.uc_hook_add(self.uc._uch, ctypes.byref(hook), uc_const.UC_HOOK_INSN, self._rdtsc_callback,
                                   None, ctypes.c_uint64(1), ctypes.c_uint64(0), ctypes.c_int(x86.UC_X86_INS_RDTSC))
        if status != uc_const.UC_ERR_OK:
            raise EngineError(f"Unicorn refused the RDTSC hook (error {status})")

    def set_irq_line(self, level: bool) -> None:
        """Native interrupts: raise or lower the CPU's INTR input."""
        self._irq_line(self.uc._uch, bool(level))

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

    def write_phys(self, address: int, data: bytes | bytearray | memoryview) -> None:
        """Device DMA into guest RAM: through Unicorn, so translated code on those pages is invalidated."""
        status = self._mem_write(self.uc._uch, address, bytes(data), len(data))
        if status != uc_const.UC_ERR_OK:
            raise unicorn.UcError(status)

    def dma_functions(self) -> tuple[int, int, int]:
        """Device DMA for native code, as write_phys does it: (address of uc_mem_write, of conode's
        uc_conode_dma_written or 0 on stock Unicorn, this CPU's engine handle). Either way translated code on
        the written pages is invalidated and the dirty-page log sees them."""
        write = ctypes.cast(uclib.uc_mem_write, ctypes.c_void_p).value
        done_function = getattr(uclib, "uc_conode_dma_written", None)
        done = ctypes.cast(done_function, ctypes.c_void_p).value if done_function is not None else None
        handle = self.uc._uch.value
        assert write is not None and handle is not None
        return write, done or 0, handle

    def write_phys_scatter(self, pieces: Sequence[tuple[int, ...]], source: bytearray) -> None:
        """Device DMA of *source*, in order, into the guest-physical pieces (address, length, ...), as write_phys
        does. The disk's hot path (a piece per page): uc_mem_write called by plain addresses, no objects."""
        host = ctypes.addressof((ctypes.c_char * len(source)).from_buffer(source))
        mem_write, uch, at = self._mem_write_at, self.uc._uch, 0
        for piece in pieces:
            address, length = piece[0], piece[1]
            if at + length > len(source) or mem_write(uch, address, host + at, length) != uc_const.UC_ERR_OK:
                raise GuestCrashed(f"device DMA outside guest RAM at {address:#x}+{length}")
            at += length

    # --- hooks ---------------------------------------------------------------------------------------------
    def _on_in(self, uc: unicorn.Uc, port: int, size: int, user_data: object) -> int:
        return self._ports.port_read(port, size)

    def _on_out(self, uc: unicorn.Uc, port: int, size: int, value: int, user_data: object) -> None:
        self._ports.port_write(port, size, value)

    def _on_cpuid(self, uc: unicorn.Uc, user_data: object) -> int:
        eax, ebx, ecx, edx = cpuid_leaf(uc.reg_read(x86.UC_X86_REG_EAX), self.has_fpu)
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
            self._passage.exception(vector)
        except BaseException as exc:  # never let an exception unwind through Unicorn's C frames
            self._fail(exc)

    def _on_invalid_insn(self, uc: unicorn.Uc, user_data: object) -> bool:
        try:
            self.stats["exceptions"] += 1
            self._passage.invalid_opcode()
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

    # --- running ---------------------------------------------------------------------------------------------
    def interrupts_enabled(self) -> bool:
        return bool(self.regs.read(x86.UC_X86_REG_EFLAGS) & _EFLAGS_IF)

    def deliver_interrupt(self, vector: int) -> None:
        """Deliver an external interrupt (from the PIC) between slices."""
        self.stats["interrupts"] += 1
        self._passage.deliver(vector)

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
            raise SnapshotError(f"snapshot CPU state is laid out for {saved.layout[:60]!r}; this host runs "
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
