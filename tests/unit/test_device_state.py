"""Every component's saved state: round trips, version refusal, and fuzzing that finds only SnapshotError."""

from __future__ import annotations

import copy
import struct
from dataclasses import dataclass
from typing import Any, Callable

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conode.errors import SnapshotError
from conode.vm import state
from conode.vm.clock import VirtualClock
from conode.vm.cpu.unicorn_cpu import GuestRam, UnicornCpu
from conode.vm.devices.irq import IrqLine
from conode.vm.devices.legacy.cmos import Cmos
from conode.vm.devices.legacy.pic import PicPair
from conode.vm.devices.legacy.pit import Pit
from conode.vm.devices.legacy.uart import Uart16550
from conode.vm.devices.virtio.console import VirtioConsole
from conode.vm.devices.virtio.host_stream import HostStream
from conode.vm.devices.pci.host_bridge import PciHostBridge
from conode.vm.devices.pci.virtio_pci import VirtioPci
from conode.vm.devices.virtio.mmio import VirtioMmio
from conode.vm.machine import CoMachine, MachineConfig
from conode.vm.snapshot import decode_ram, encode_ram, read_snapshot, write_snapshot
from conode.vm.state import uint
from parts import Ram, bring_up, out, pci_bring_up


class NoPorts:
    def port_read(self, port: int, size: int) -> int:
        return 0xFF

    def port_write(self, port: int, size: int, value: int) -> None:
        pass


# --- components in a state a running guest would leave them in ------------------------------------------------
def make_pic() -> PicPair:
    pic = PicPair()
    for port, value in ((0x20, 0x11), (0x21, 0x30), (0x21, 0x04), (0x21, 0x01),
                        (0xA0, 0x11), (0xA1, 0x38), (0xA1, 0x02), (0xA1, 0x01), (0x21, 0xE8), (0x4D1, 0x0C)):
        out(pic, port, value)
    pic.set_irq(4, True)
    pic.acknowledge()
    return pic


def make_pit() -> Pit:
    now = [5_000_000]
    pit = Pit(IrqLine(PicPair(), 0), lambda: now[0])
    out(pit, 0x43, 0x34)
    out(pit, 0x40, 0x9C)
    out(pit, 0x40, 0x2E)
    now[0] += 30_000_000
    pit.update()
    out(pit, 0x43, 0x00)  # latch channel 0
    out(pit, 0x61, 0x01)
    return pit


def make_uart() -> Uart16550:
    pic = PicPair()
    uart = Uart16550(IrqLine(pic, 4), lambda data: None)
    uart.write_port(3, 0x83)
    uart.write_port(0, 1)
    uart.write_port(3, 0x03)
    uart.write_port(1, 0x03)
    uart.write_port(4, 0x0B)
    uart.write_port(2, 0xC7)
    uart.feed(b"typed")
    return uart


def make_cmos() -> Cmos:
    cmos = Cmos(lambda: 7_000_000_000, epoch_s=1_700_000_000)
    out(cmos, 0x70, 0x0B)
    out(cmos, 0x71, 0x06)
    out(cmos, 0x70, 0x20)
    out(cmos, 0x71, 0x5A)
    return cmos


def make_clock() -> VirtualClock:
    host = [0]
    clock = VirtualClock(lambda: host[0])
    clock.resume()
    host[0] += 123_456_789
    clock.pause()
    return clock


def make_transport() -> tuple[VirtioMmio, HostStream]:
    stream = HostStream(lambda data: None)
    transport = VirtioMmio(VirtioConsole(stream), IrqLine(PicPair(), 5), Ram(1 << 16))
    bring_up(transport)
    stream.send(b"waiting for the guest")
    return transport, stream


def make_fresh_function() -> VirtioPci:
    return VirtioPci(VirtioConsole(HostStream(lambda data: None)), IrqLine(PicPair(), 9), Ram(1 << 16), 0xE0000000)


def make_function() -> VirtioPci:
    function = make_fresh_function()
    function.config.write(0x10, 4, 0xE0010000)  # moved by the guest
    function.config.write(0x3C, 1, 11)
    function.config.write(0x04, 2, 0x0406)  # memory, bus master, INTx disabled
    pci_bring_up(function)
    function.signal_used(0)
    return function


def make_host_bridge() -> PciHostBridge:
    bridge = PciHostBridge(0xE0000000, 1 << 24)
    bridge.write_port(0, 4, 0x80000808)
    bridge.write_port(4, 1, 0x40)  # the bridge's latency timer
    return bridge


@pytest.fixture(scope="module")
def cpu() -> UnicornCpu:
    return UnicornCpu(GuestRam(1 << 20), NoPorts())


@dataclass
class Component:
    """How to build a fresh component, and its saved state after some activity."""

    name: str
    fresh: Callable[[], Any]
    exercised: Callable[[], Any]


COMPONENTS = [
    Component("PIC", PicPair, make_pic),
    Component("PIT", lambda: Pit(IrqLine(PicPair(), 0), lambda: 0), make_pit),
    Component("UART", lambda: Uart16550(IrqLine(PicPair(), 4), lambda data: None), make_uart),
    Component("CMOS", lambda: Cmos(lambda: 0), make_cmos),
    Component("clock", VirtualClock, make_clock),
    Component("virtio transport", lambda: make_fresh_transport(), lambda: make_transport()[0]),
    Component("host channel", lambda: HostStream(lambda data: None), lambda: make_transport()[1]),
    Component("virtio-pci", make_fresh_function, make_function),
    Component("PCI host bridge", lambda: PciHostBridge(0xE0000000, 1 << 24), make_host_bridge),
]


def make_fresh_transport() -> VirtioMmio:
    return VirtioMmio(VirtioConsole(HostStream(lambda data: None)), IrqLine(PicPair(), 5), Ram(1 << 16))


@pytest.mark.parametrize("component", COMPONENTS, ids=lambda c: c.name)
def test_round_trip(component):
    saved = component.exercised().get_state()
    assert saved != component.fresh().get_state()  # the activity changed something worth saving
    restored = component.fresh()
    restored.set_state(copy.deepcopy(saved))
    assert restored.get_state() == saved


@pytest.mark.parametrize("component", COMPONENTS, ids=lambda c: c.name)
@pytest.mark.parametrize("version, writer", [(0, "an older"), (99, "a newer")])
def test_other_versions_are_refused_by_name(component, version, writer):
    saved = component.exercised().get_state()
    saved["version"] = version
    with pytest.raises(SnapshotError, match=f"{component.name} state is version {version}, written by {writer} "
                                            f"conode"):
        component.fresh().set_state(saved)


def test_cpu_round_trip_and_refusals(cpu):
    from unicorn import x86_const as x86

    cpu.uc.reg_write(x86.UC_X86_REG_EAX, 0x1234)
    saved = cpu.get_state()
    cpu.uc.reg_write(x86.UC_X86_REG_EAX, 0)
    cpu.set_state(saved)
    assert cpu.uc.reg_read(x86.UC_X86_REG_EAX) == 0x1234
    with pytest.raises(SnapshotError, match="CPU.context has length 5560, exactly 5568"):
        cpu.set_state({**saved, "context": saved["context"][:-8]})
    with pytest.raises(SnapshotError, match="laid out for 'unicorn-1.0'"):
        cpu.set_state({**saved, "layout": "unicorn-1.0"})
    with pytest.raises(SnapshotError, match="CPU state is version 2, written by a newer conode"):
        cpu.set_state({**saved, "version": 2})


def test_ram_chunks_are_checked():
    ram = bytearray(1 << 20)
    ram[8192:8200] = b"contents"
    saved = encode_ram(memoryview(ram))
    import zlib

    bomb = zlib.compress(bytes(64 << 20))  # inflates far beyond one chunk
    for chunks, message in (([bomb], "whole pages"), ([b"junk"], "corrupt"), ([], "fewer pages"),
                            ([zlib.compress(bytes(100))], "whole pages")):
        with pytest.raises(SnapshotError, match=message):
            decode_ram({**saved, "chunks": chunks}, memoryview(bytearray(1 << 20)))
    with pytest.raises(SnapshotError, match="bitmap"):
        decode_ram({**saved, "bitmap": b"\xff"}, memoryview(bytearray(1 << 20)))


def test_migration_steps_run_in_order():
    @dataclass(frozen=True)
    class Widget(state.Record):
        KIND = "widget"
        VERSION = 3
        MIGRATIONS = {1: lambda d: {**d, "version": 2, "b": 0},
                      2: lambda d: {**d, "version": 3, "c": d["a"] + 1}}

        a: int = uint(8)
        b: int = uint(8)
        c: int = uint(8)

    assert state.load(Widget, {"version": 1, "a": 4}) == Widget(4, 0, 5)
    with pytest.raises(SnapshotError, match="widget state is version 0, written by an older conode"):
        state.load(Widget, {"version": 0, "a": 4})


# --- fuzzing: random and mutated state only ever raises SnapshotError ----------------------------------------
leaves = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(1 << 70), max_value=1 << 70), st.binary(max_size=64),
    st.text(max_size=16), st.floats(allow_nan=True),
)
values = st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)


def paths(data: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside nested maps and lists."""
    found = [prefix]
    if isinstance(data, dict):
        for key, value in data.items():
            found += paths(value, prefix + (key,))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found += paths(value, prefix + (i,))
    return found


@st.composite
def mutated(draw: st.DrawFn, valid: dict) -> dict:
    """*valid* with one to three of its values replaced, removed, or joined by a stray key."""
    data = copy.deepcopy(valid)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths(data)))
        if not path:
            data = draw(values) if draw(st.integers(0, 9)) == 0 else data
            continue
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "add", "nudge"]))
        key = path[-1]
        if action == "replace":
            parent[key] = draw(values)
        elif action == "delete" and isinstance(parent, dict):
            del parent[key]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(values)
        elif isinstance(parent[key], int) and not isinstance(parent[key], bool):
            parent[key] += draw(st.sampled_from([-1, 1, 1 << 8, 1 << 16, 1 << 32, -(1 << 40)]))
        if not isinstance(data, (dict, list)):
            break
    return data


def only_snapshot_errors(restore: Callable[[Any], None], data: Any) -> None:
    try:
        restore(data)
    except SnapshotError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 300


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("component", COMPONENTS, ids=lambda c: c.name)
@FUZZ
@given(data=st.data())
def test_mutated_state_raises_only_snapshot_error(component, data):
    saved = component.exercised().get_state()
    only_snapshot_errors(component.fresh().set_state, data.draw(mutated(saved)))


@pytest.mark.parametrize("component", COMPONENTS, ids=lambda c: c.name)
@FUZZ
@given(garbage=values)
def test_random_state_raises_only_snapshot_error(component, garbage):
    only_snapshot_errors(component.fresh().set_state, garbage)


@FUZZ
@given(data=st.data())
def test_mutated_cpu_and_ram_raise_only_snapshot_error(cpu, data):
    only_snapshot_errors(cpu.set_state, data.draw(mutated(cpu.get_state())))
    ram = bytearray(1 << 20)
    ram[4096:4100] = struct.pack("<I", 0xDEADBEEF)
    only_snapshot_errors(lambda d: decode_ram(d, memoryview(bytearray(1 << 20))),
                         data.draw(mutated(encode_ram(memoryview(ram)))))


# --- a whole machine, as a snapshot file would hold it -----------------------------------------------------------
@pytest.fixture(scope="module")
def machine_state() -> dict:
    machine = CoMachine(MachineConfig(mem_mib=48), lambda data: None, lambda data: None)
    machine.ram.view[0x100000:0x100008] = b"kernel!!"
    return machine.get_state()


def restore_machine(data: Any) -> None:
    CoMachine(CoMachine.config_from_state(data), lambda d: None, lambda d: None).set_state(data)


def test_machine_round_trip(machine_state):
    machine = CoMachine(CoMachine.config_from_state(machine_state), lambda d: None, lambda d: None)
    machine.set_state(machine_state)
    assert bytes(machine.ram.view[0x100000:0x100008]) == b"kernel!!"
    assert machine.get_state() == machine_state


@pytest.mark.parametrize("mem_mib", [0, 47, 769, 1 << 40, -1])
def test_machine_memory_outside_the_limits_is_refused(machine_state, mem_mib):
    damaged = {**machine_state, "config": {**machine_state["config"], "mem_mib": mem_mib}}
    with pytest.raises(SnapshotError, match="mem_mib"):
        CoMachine.config_from_state(damaged)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_machine_state_raises_only_snapshot_error(machine_state, data):
    # RAM chunks are large; mutate everything but them, and them separately above.
    light = {**machine_state, "ram": {k: v for k, v in machine_state["ram"].items() if k != "chunks"}}
    damaged = data.draw(mutated(light))
    if isinstance(damaged, dict) and isinstance(damaged.get("ram"), dict) and "chunks" not in damaged["ram"] \
            and data.draw(st.booleans()):
        damaged["ram"]["chunks"] = machine_state["ram"]["chunks"]
    only_snapshot_errors(restore_machine, damaged)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_signed_snapshot_file_with_odd_content_raises_only_snapshot_error(machine_state, tmp_path, data):
    light = {**machine_state, "ram": {**machine_state["ram"], "chunks": machine_state["ram"]["chunks"][:1]}}
    path = tmp_path / "odd.snap"
    damaged = data.draw(mutated(light))
    try:
        msgpack.packb(damaged)
    except (OverflowError, ValueError, TypeError):
        assume(False)  # integers beyond 64 bits: no writer could put them in a file
    write_snapshot(path, {"machine": damaged})
    only_snapshot_errors(lambda d: restore_machine(read_snapshot(d)["machine"]), path)


def test_a_machine_saved_before_disks_existed_restores(machine_state):
    older = {**machine_state, "version": 4, "config": {**machine_state["config"], "version": 1},
             "devices": {k: v for k, v in machine_state["devices"].items() if k != "disk"}}
    del older["config"]["disk"]
    machine = CoMachine(CoMachine.config_from_state(older), lambda d: None, lambda d: None)
    machine.set_state(older)
    assert machine.disk is None and machine.get_state() == machine_state


def test_a_machine_with_a_disk_carries_its_overlay(tmp_path):
    from conode.vm.disk.config import DiskConfig

    base = tmp_path / "base.img"
    base.write_bytes(bytes(range(256)) * 1024)
    machine = CoMachine(MachineConfig(mem_mib=48, disk=DiskConfig(base, budget_mib=2)), lambda d: None,
                        lambda d: None)
    machine.disk.write(5000, [b"changed by the guest"])
    saved = machine.get_state()
    machine.close()
    config = CoMachine.config_from_state(saved)
    assert config.disk is not None and config.disk.base == base and config.disk.budget_mib == 2
    restored = CoMachine(config, lambda d: None, lambda d: None)
    restored.set_state(saved)
    buffer = bytearray(8192)
    restored.disk.read(4096, memoryview(buffer))
    assert bytes(buffer[904:924]) == b"changed by the guest" and buffer[:904] == base.read_bytes()[4096:5000]
    restored.close()
    assert base.read_bytes() == bytes(range(256)) * 1024
    without = {**saved, "devices": {**saved["devices"], "disk": None}}
    with pytest.raises(SnapshotError, match="disk"):
        restore_machine(without)


def test_a_root_disk_is_named_on_the_command_line_and_kept_in_the_saved_configuration(tmp_path):
    from conode.vm.disk.config import DiskConfig

    base = tmp_path / "root.img"
    base.write_bytes(bytes(64 * 1024))
    assert DiskConfig(base).kernel_cmdline() == ""
    assert DiskConfig(base, root=True).kernel_cmdline() == "conode.root=/dev/vda"
    machine = CoMachine(MachineConfig(mem_mib=48, disk=DiskConfig(base, root=True)), lambda d: None,
                        lambda d: None)
    saved = machine.get_state()
    machine.close()
    assert CoMachine.config_from_state(saved).disk.root is True
    older = {**saved, "config": {**saved["config"], "version": 2,  # before the root flag: a data disk
                                 "disk": {k: v for k, v in saved["config"]["disk"].items() if k != "root"}}}
    config = CoMachine.config_from_state(older)
    assert config.disk is not None and config.disk.root is False and config.disk.base == base
