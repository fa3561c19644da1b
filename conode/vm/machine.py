"""CoMachine: the cooperative machine — CPU, legacy devices, virtio devices and the run loop that binds them.

The host and the guest are two coroutines. The guest CPU runs in slices — until its next timer event, until
the host asks for the CPU back, or until it executes HLT (it is idle) — and between slices the host delivers
interrupts, serves devices and runs work other threads handed it. Only the machine thread touches the
machine; other threads use :meth:`CoMachine.call_soon`, :meth:`pause` and :meth:`stop`.
"""

from __future__ import annotations

import enum
import logging
import os
import select
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from conode.errors import ConodeError, GuestCrashed, SnapshotError
from conode.vm import layout, state
from conode.vm.bootloader import RNG_SEED_BYTES, KernelImage, load_linux
from conode.vm.builder import MachineBuilder, PortBus
from conode.vm.clock import VirtualClock
from conode.vm.cpu.unicorn_cpu import GuestRam, RamImage, StopReason, UnicornCpu
from conode.vm.devices.legacy.cmos import Cmos
from conode.vm.devices.legacy.pic import PicPair
from conode.vm.devices.legacy.pit import Pit
from conode.vm.devices.legacy.uart import Uart16550
from conode.vm.devices.virtio.block import VirtioBlock
from conode.vm.devices.virtio.block_native import NativeRam
from conode.vm.devices.virtio.console import VirtioConsole
from conode.vm.devices.virtio.net import VirtioNet
from conode.vm.disk.config import DiskConfig, DiskConfigState
from conode.vm.host_channel import HostChannel, connect_uart
from conode.vm.snapshot import decode_ram, encode_ram, ram_elsewhere
from conode.vm.state import blob, bounded, items

log = logging.getLogger(__name__)

MAX_SLICE_NS = 20_000_000  # the host takes the CPU back at least every 20 ms of guest time
CONSOLE_TAIL_BYTES = 4096  # kept to explain a crash ("Kernel panic - not syncing: ...")


class MachineExit(enum.Enum):
    """Why :meth:`CoMachine.run` returned."""

    PAUSED = "paused"  # the host asked (pause): the machine can be snapshotted or run again
    POWER_OFF = "power-off"  # the guest halted with interrupts off: it is finished
    RESET = "reset"  # the guest asked for a reset (after a panic, or `reboot`)


@dataclass(frozen=True)
class MachineConfig:
    mem_mib: int = layout.DEFAULT_RAM_MIB
    cmdline_extra: str = ""
    disk: DiskConfig | None = None  # cobd: /dev/vda


@dataclass(frozen=True)
class ConfigState(state.Record):
    KIND = "machine configuration"
    VERSION = 3  # 2: the disk; 3: whether the disk holds the root file system
    MIGRATIONS = {1: lambda data: {**data, "disk": None},
                  2: lambda data: {**data, "disk": {**data["disk"], "root": False}}
                  if isinstance(data.get("disk"), dict) else data}

    mem_mib: int = bounded(layout.MIN_RAM_MIB, layout.MAX_RAM_MIB)
    cmdline_extra: str = blob(max_len=layout.CMDLINE_MAX)
    disk: DiskConfigState | None


@dataclass(frozen=True)
class DevicesState:
    pic: dict
    pit: dict
    uart: dict
    serial_channel: dict  # COM2
    cmos: dict
    virtio: tuple[dict, ...] = items(max_len=len(layout.VIRTIO_IRQS))
    channel: dict
    pci: dict
    virtio_pci: tuple[dict, ...] = items(max_len=len(layout.VIRTIO_PCI_IRQS))
    disk: dict | None  # the overlay (conode/vm/disk/overlay.py DiskState)


@dataclass(frozen=True)
class MachineState(state.Record):
    """The machine's own record; each part below is checked by its owner's record."""

    KIND = "machine"
    VERSION = 5  # 2: COM2 and the two-transport host channel; 3: the PCI bus and virtio-pci functions;
    # 4: the conet NIC; 5: the disk (cobd)
    MIGRATIONS = {4: lambda data: {**data, "devices": {**data["devices"], "disk": None}}
                  if isinstance(data.get("devices"), dict) else data}

    config: dict
    cpu: dict
    ram: dict
    clock: dict
    halted: bool
    devices: DevicesState


class DmaMemory:
    """Guest memory as devices see it: reads from the shared RAM, writes through the CPU (for coherence)."""

    def __init__(self, ram: GuestRam, cpu: UnicornCpu) -> None:
        self.size = ram.size
        self.read = ram.read
        self.write = cpu.write_phys
        self.scatter = cpu.write_phys_scatter
        self._view = ram.view
        self.native = NativeRam(ram.host_address, ram.size, *cpu.dma_functions())  # for C device code (cobd)

    def window(self, address: int, length: int) -> memoryview:
        return self._view[address:address + length]


class Wakeup:
    """What the machine thread rests on: :meth:`set` ends the rest (from any thread), and while the guest idles
    the thread also serves the file descriptors it was given to :meth:`watch` (a conet port's socket), so
    that their data reaches an idle guest without first waking another thread."""

    def __init__(self) -> None:
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._watched: dict[int, Callable[[], None]] = {}

    def watch(self, fd: int, handler: Callable[[], None] | None) -> None:
        """Call *handler* on the machine thread when *fd* is readable while the guest idles; None: stop. From
        any thread: a rest that already began may still report *fd* once (the handler must expect that)."""
        if handler is None:
            self._watched.pop(fd, None)
        else:
            self._watched[fd] = handler

    def set(self) -> None:
        os.eventfd_write(self._fd, 1)

    def wait(self, seconds: float, serve: bool = True) -> None:
        """Rest up to *seconds*, until :meth:`set`, or (with *serve*) until a watched fd was readable and served."""
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        watched = list(self._watched.items()) if serve else []
        for fd, _ in watched:
            poller.register(fd, select.POLLIN)
        ready = {fd for fd, _ in poller.poll(seconds * 1000)}
        for fd, handler in watched:
            if fd in ready:
                handler()

    def clear(self) -> None:
        try:
            os.eventfd_read(self._fd)
        except BlockingIOError:
            pass

    def __del__(self) -> None:
        # Not in CoMachine.close: another thread may still call set(), and a closed descriptor's number is
        # soon another file's. Nothing can call it once this is unreachable.
        os.close(self._fd)


class CoMachine:
    """An i386 PC reduced to what the guest kernel uses, plus conode's paravirtual devices."""

    def __init__(self, config: MachineConfig, console_output: Callable[[bytes], None],
                 channel_receive: Callable[[bytes], None], ram_image: RamImage | None = None) -> None:
        if not layout.MIN_RAM_MIB <= config.mem_mib <= layout.MAX_RAM_MIB:
            raise ConodeError(
                f"guest memory must be between {layout.MIN_RAM_MIB} and {layout.MAX_RAM_MIB} MiB "
                f"(got {config.mem_mib})"
            )
        self.config = config
        self.clock = VirtualClock()
        self.ram = GuestRam(config.mem_mib << 20, ram_image)
        self._ram_preloaded = ram_image is not None  # set_state then leaves RAM alone: it is the image's
        self.ports = PortBus()
        self.pic = PicPair(on_output=self._on_pic_output)
        self.cpu = UnicornCpu(self.ram, self.ports)
        self.cpu.connect_interrupt_controller(self.pic.acknowledge)
        self.cpu.connect_clock(self.clock)
        self._console_output = console_output
        self.console_tail = bytearray()
        build = MachineBuilder(self.ports, self.pic, self.cpu.map_mmio, DmaMemory(self.ram, self.cpu))
        build.attach_pic()
        self.pit = Pit(build.irq(layout.IRQ_PIT), self.clock.now)
        build.attach_pit(self.pit)
        self.uart = Uart16550(build.irq(layout.IRQ_COM1), self._on_console_output)
        build.attach_uart(self.uart)
        self.cmos = Cmos(self.clock.now)
        build.attach_cmos(self.cmos)
        build.bus.attach(layout.PORT_KEYBOARD_COMMAND, lambda offset: 0xFF, self._keyboard_controller_command)
        build.bus.attach(layout.PORT_SYSTEM_CONTROL_A, lambda offset: 0x02, self._system_control_a)
        self.pci = build.attach_pci()
        self.channel = HostChannel(channel_receive)
        build.attach_virtio(VirtioConsole(self.channel.virtio))
        # Every guest has its NIC from boot, so the pristine snapshot has the driver bound; the MAC it reads
        # then is a placeholder: a job's identity is applied in the guest after the restore (guest.py).
        self.nic = VirtioNet()
        build.attach_virtio(self.nic)
        self.disk = config.disk.open() if config.disk is not None else None
        if self.disk is not None:
            build.attach_virtio(VirtioBlock(self.disk, self.disk.base.name.encode()))
        self.serial_channel = Uart16550(build.irq(layout.IRQ_COM2), self.channel.serial.on_receive)
        build.attach_uart(self.serial_channel, layout.PORTS_COM2)
        self._refill_serial_channel = connect_uart(self.channel.serial, self.serial_channel)
        self.open_bus = build.attach_open_bus(self.ram.size)
        self.virtio = build.virtio
        self.virtio_pci = build.virtio_pci
        self._build = build
        self.halted = False
        self._calls: deque[Callable[[], None]] = deque()
        self._wake = Wakeup()
        self.watch = self._wake.watch
        self._pause_requested = False
        self._reset_requested = False
        self.pause_at_ns: int | None = None  # guest time at which run() returns PAUSED by itself
        self.cpu_cap = 1.0  # share of one host core the guest may use, enforced per slice

    # --- wiring -----------------------------------------------------------------------------------------
    def virtio_cmdline(self) -> str:
        return self._build.kernel_cmdline()

    def _keyboard_controller_command(self, offset: int, value: int) -> None:
        if value == 0xFE:  # pulse the reset line: how Linux reboots a PC without ACPI
            self._request_reset()

    def _system_control_a(self, offset: int, value: int) -> None:
        if value & 1:  # fast reset
            self._request_reset()

    def _request_reset(self) -> None:
        self._reset_requested = True
        self.cpu.request_stop()

    def _on_console_output(self, data: bytes) -> None:
        tail = self.console_tail
        tail += data
        if len(tail) > CONSOLE_TAIL_BYTES:
            del tail[: len(tail) - CONSOLE_TAIL_BYTES]
        self._console_output(data)

    def _on_pic_output(self, level: bool) -> None:
        if self.cpu.native_interrupts:
            self.cpu.set_irq_line(level)  # the CPU takes it at the next instruction boundary where IF allows
        elif level:
            self.cpu.request_stop()  # end the slice so that the host delivers it promptly

    # --- boot ----------------------------------------------------------------------------------------------
    def boot(self, kernel: KernelImage, initrd: bytes, cmdline: str) -> None:
        disk = self.config.disk.kernel_cmdline() if self.config.disk is not None else ""
        full = " ".join(part for part in (cmdline, self.virtio_cmdline(), disk, self.config.cmdline_extra) if part)
        plan = load_linux(self.ram.view, kernel, initrd, full, os.urandom(RNG_SEED_BYTES))
        self.cpu.enter_protected_mode(layout.BOOT_GDT, 31, layout.BOOT_CS, layout.BOOT_DS, plan.entry,
                                      plan.boot_params)

    # --- cross-thread control --------------------------------------------------------------------------------
    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run *fn* on the machine thread between slices; safe from any thread."""
        self._calls.append(fn)
        self.cpu.request_stop()
        self._wake.set()

    def run_calls(self) -> None:
        """Run now what other threads handed over with call_soon (only while the machine is not running)."""
        while self._calls:
            self._calls.popleft()()

    def pause(self) -> None:
        """Make :meth:`run` return PAUSED at the next slice boundary; safe from any thread."""
        self._pause_requested = True
        self.cpu.request_stop()
        self._wake.set()

    # --- the run loop --------------------------------------------------------------------------------------
    def run(self) -> MachineExit:
        """Run the guest until it is paused, powers off or resets. Raises GuestCrashed on a fatal fault."""
        self._pause_requested = False
        self.clock.resume()
        try:
            return self._loop()
        except GuestCrashed as exc:
            raise GuestCrashed(self._explain(str(exc))) from None
        finally:
            self.clock.pause()

    def _loop(self) -> MachineExit:
        cpu, pic, pit, clock = self.cpu, self.pic, self.pit, self.clock
        calls = self._calls
        native = cpu.native_interrupts
        while True:
            cpu.slicer.clear_request()
            while calls:
                calls.popleft()()
            if self._reset_requested:
                return MachineExit.RESET
            if self._pause_requested:
                return MachineExit.PAUSED
            if self.pause_at_ns is not None and clock.now() >= self.pause_at_ns:
                self.pause_at_ns = None
                return MachineExit.PAUSED
            pit.update()
            if pic.has_interrupt() and cpu.interrupts_enabled():
                if not native:
                    cpu.deliver_interrupt(pic.acknowledge())
                self.halted = False
            next_tick = pit.next_event_ns()
            if self.pause_at_ns is not None and (next_tick is None or self.pause_at_ns < next_tick):
                next_tick = self.pause_at_ns
            now = clock.now()
            if self.halted:
                if not cpu.interrupts_enabled():
                    return MachineExit.POWER_OFF  # HLT with interrupts off: nothing can wake it
                self._idle_until(next_tick if next_tick is not None else now + MAX_SLICE_NS)
                continue
            deadline = now + MAX_SLICE_NS if next_tick is None else min(next_tick, now + MAX_SLICE_NS)
            started = time.monotonic()
            reason = cpu.run(clock.host_deadline(deadline), wait_for_if=not native and pic.has_interrupt())
            if reason is StopReason.HALT:
                self.halted = True
            if self.cpu_cap < 1.0:
                self._throttle((time.monotonic() - started) * (1.0 / self.cpu_cap - 1.0))

    def _throttle(self, seconds: float) -> None:
        """Rest after a slice so the guest averages cpu_cap of a core: short slices, short rests, no sawtooth."""
        if seconds > 0 and not self._calls and not self._pause_requested:
            self._wake.wait(seconds, serve=False)  # a rest the cap imposes: the guest does not idle
        self._wake.clear()

    def _idle_until(self, guest_ns: int) -> None:
        """The guest is idle (HLT): sleep until its next timer event or until the host has work for it."""
        timeout = (guest_ns - self.clock.now()) / 1e9
        if timeout > 0 and not self._calls and not self._pause_requested:
            self._wake.wait(timeout)
        self._wake.clear()

    # --- snapshots ---------------------------------------------------------------------------------------
    def get_state(self, with_ram: bool = True, with_disk: bool = True) -> dict:
        """The whole machine as plain data (call only while it is not running); without its RAM's pages if not
        *with_ram* (migration sends them apart: the machine is then restored with them as its RAM image), and
        without its disk overlay if not *with_disk* (checkpoints carry it as deltas, and put it back)."""
        config = state.dump(ConfigState(self.config.mem_mib, self.config.cmdline_extra,
                                        DiskConfigState.of(self.config.disk)))
        devices = DevicesState(self.pic.get_state(), self.pit.get_state(), self.uart.get_state(),
                               self.serial_channel.get_state(), self.cmos.get_state(),
                               tuple(t.get_state() for t in self.virtio), self.channel.get_state(),
                               self.pci.get_state(), tuple(f.get_state() for f in self.virtio_pci),
                               self.disk.get_state() if self.disk is not None and with_disk else None)
        ram = encode_ram(self.ram.view) if with_ram else ram_elsewhere(self.ram.size)
        return state.dump(MachineState(config, self.cpu.get_state(), ram,
                                       self.clock.get_state(), self.halted, devices))

    def set_state(self, data: dict) -> None:
        """Continue from :meth:`get_state` output, in a freshly built machine of the same config.

        Bad content raises SnapshotError only; the machine is then unusable (build a new one).
        """
        saved = state.load(MachineState, data)
        if self.config_from_state(data) != self.config:
            raise SnapshotError("snapshot is of a machine with another configuration than this one")
        if len(saved.devices.virtio) != len(self.virtio) or len(saved.devices.virtio_pci) != len(self.virtio_pci):
            raise SnapshotError(f"snapshot has {len(saved.devices.virtio)} virtio devices; this machine has "
                                f"{len(self.virtio)}")
        if not self._ram_preloaded:
            decode_ram(saved.ram, self.ram.view)
        self.cpu.set_state(saved.cpu)
        self.clock.set_state(saved.clock)
        self.halted = saved.halted
        devices = saved.devices
        self.pic.set_state(devices.pic)
        self.pit.set_state(devices.pit)
        self.uart.set_state(devices.uart)
        self.serial_channel.set_state(devices.serial_channel)
        self.cmos.set_state(devices.cmos)
        self.channel.set_state(devices.channel)  # backends before transports: activation may move bytes
        self.pci.set_state(devices.pci)
        if (devices.disk is None) != (self.disk is None):
            raise SnapshotError("snapshot disk state does not match the machine's disk configuration")
        if self.disk is not None:
            self.disk.set_state(devices.disk)
        for transport, transport_state in zip(self.virtio, devices.virtio):
            transport.set_state(transport_state)
        for function, function_state in zip(self.virtio_pci, devices.virtio_pci):
            function.set_state(function_state)
        self._refill_serial_channel()

    @staticmethod
    def ram_image(data: dict) -> RamImage:
        """The RAM of a saved machine as an image that machines built from it map copy-on-write (they must
        then be restored from *data* itself); raise SnapshotError if the RAM is not valid."""
        saved = state.load(MachineState, data)
        image = RamImage(CoMachine.config_from_state(data).mem_mib << 20)
        with image.writable() as memory:
            try:
                decode_ram(saved.ram, memoryview(memory))
            except SnapshotError:
                image.close()
                raise
        return image

    def close(self) -> None:
        """Release what outlives a dropped machine: the slicer's timer thread, the disk's files."""
        self.cpu.slicer.close()
        if self.disk is not None:
            self.disk.close()
            self.disk.base.close()

    @staticmethod
    def config_from_state(data: dict) -> MachineConfig:
        """The configuration to build a machine with for :meth:`set_state`; raise SnapshotError if invalid."""
        state.load(MachineState, data)  # a machine of another version (other devices) is refused here, in one line
        config = state.load(ConfigState, data.get("config"))
        return MachineConfig(mem_mib=config.mem_mib, cmdline_extra=config.cmdline_extra,
                             disk=config.disk.config() if config.disk is not None else None)

    def _explain(self, message: str) -> str:
        panic = self.panic_message()
        return f"guest kernel panic: {panic}" if panic else message

    def panic_message(self) -> str | None:
        tail = self.console_tail.decode(errors="replace")
        marker = tail.rfind("Kernel panic - not syncing:")
        if marker < 0:
            return None
        return tail[marker:].splitlines()[0].split(":", 1)[1].strip()
