"""The PCI host bridge and the virtio-pci transport under a hostile guest: random configuration-port accesses of
every width, BARs moved anywhere, random common-configuration registers, rings and notifications.

Whatever the guest does, the host side raises nothing, the interrupt line follows the function's pin and its
command register, and a driver error ends in DEVICE_NEEDS_RESET, the transport's own failure path.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conode.vm import layout
from conode.vm.devices.pci import virtio_pci as pci
from conode.vm.devices.pci.config import COMMAND_INTX_DISABLE
from conode.vm.devices.virtio.transport import STATUS_NEEDS_RESET
from parts import RINGS, pci_bring_up
from test_pci import Machine
from test_virtio_fuzz import descriptor, mostly, u32

PORTS = range(0xCF8, 0xD00)
WINDOW_END = layout.PCI_MMIO_BASE + layout.PCI_MMIO_SIZE
address_register = mostly(st.builds(lambda dev, reg, enable: enable << 31 | dev << 11 | reg,
                                    st.sampled_from([0, layout.virtio_pci_device(0), 5]),
                                    st.integers(0, 63).map(lambda r: 4 * r), st.booleans()),
                          u32)
window_address = mostly(st.integers(layout.PCI_MMIO_BASE, layout.PCI_MMIO_BASE + pci.BAR_SIZE - 1),
                        st.integers(layout.PCI_MMIO_BASE, WINDOW_END - 8))
size = st.sampled_from([1, 2, 4])

operation = st.one_of(
    st.tuples(st.just("address"), address_register),
    st.tuples(st.just("out"), st.sampled_from(PORTS), size, u32),
    st.tuples(st.just("in"), st.sampled_from(PORTS), size),
    st.tuples(st.just("config"), st.integers(0, 255), size, u32),  # to the virtio function, any register
    st.tuples(st.just("common"), st.integers(0, 0x40), size, mostly(st.integers(0, 300), u32)),
    st.tuples(st.just("mem-write"), window_address, size, u32),
    st.tuples(st.just("mem-read"), window_address, size),
    st.tuples(st.just("notify"), mostly(st.integers(0, 3), u32)),
    st.tuples(st.just("post"), st.integers(0, 1), st.lists(descriptor, min_size=1, max_size=4)),
    st.tuples(st.just("send"), st.binary(max_size=200)),
)


def run(m: Machine, ops: list) -> None:
    for op in ops:
        kind = op[0]
        if kind == "address":
            m.bus.port_write(0xCF8, 4, op[1])
        elif kind == "out":
            m.bus.port_write(op[1], op[2], op[3] & ((1 << 8 * op[2]) - 1))
        elif kind == "in":
            assert 0 <= m.bus.port_read(op[1], op[2]) < 1 << 8 * op[2]
        elif kind == "config":
            m.config_write(layout.virtio_pci_device(0), op[1] & ~(op[2] - 1), op[2], op[3] & ((1 << 8 * op[2]) - 1))
        elif kind == "common":
            m.function.bar_write(0, pci.COMMON + op[1], op[2], op[3] & ((1 << 8 * op[2]) - 1))
        elif kind == "mem-write":
            m.mem_write(op[1], op[2], op[3] & ((1 << 8 * op[2]) - 1))
        elif kind == "mem-read":
            assert 0 <= m.mem_read(op[1], op[2]) < 1 << 8 * op[2]
        elif kind == "notify":
            m.function.bar_write(0, pci.NOTIFY, 2, op[1] & 0xFFFF)
        elif kind == "post":
            desc, avail, _ = RINGS[op[1]]
            for i, (addr, length, flags, nxt) in enumerate(op[2]):
                m.ram.data[desc + 16 * i:desc + 16 * i + 16] = struct.pack("<QIHH", addr, length & 0xFFFFFFFF,
                                                                           flags & 0xFFFF, nxt & 0xFFFF)
            idx = int.from_bytes(m.ram.data[avail + 2:avail + 4], "little")
            m.ram.data[avail + 4 + 2 * (idx % 8):avail + 6 + 2 * (idx % 8)] = b"\0\0"
            m.ram.data[avail + 2:avail + 4] = ((idx + 1) & 0xFFFF).to_bytes(2, "little")
            m.function.bar_write(0, pci.NOTIFY, 2, op[1])
        elif kind == "send":
            m.stream.send(op[1])


def check(m: Machine) -> None:
    config = m.function.config
    assert m.irq_level() == (config.intx_level and not config.command & COMMAND_INTX_DISABLE)
    assert config.intx_level == (m.function.interrupt_status != 0)
    if any(q is not None and q.broken for q in m.function.queues):
        assert m.function.status & STATUS_NEEDS_RESET
    assert m.bridge.address & ~0x80FFFFFC == 0


FUZZ = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(ops=st.lists(operation, min_size=5, max_size=60))
def test_hostile_guest_from_power_on(ops):
    m = Machine()
    run(m, ops)
    check(m)


@FUZZ
@given(ops=st.lists(operation, min_size=5, max_size=60))
def test_hostile_guest_after_a_bring_up(ops):
    m = Machine()
    pci_bring_up(m.function)
    run(m, ops)
    check(m)
