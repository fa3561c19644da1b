"""RDTSC reads the machine's virtual clock (clock.VirtualClock), not the host's counter: on both engines, through
its hook or (conode's engine, a clock on the host's monotonic clock) natively."""

import struct
import time

import pytest

from conode.vm import state
from conode.vm.clock import ClockState, VirtualClock
from conode.vm.cpu.unicorn_cpu import GuestRam, StopReason, UnicornCpu, uclib

# At 0x6000, paging off, flat segments:
#   rdtsc; mov %eax,0x8000; mov %edx,0x8004; rdtsc; mov %eax,0x8008; mov %edx,0x800c; hlt
CODE = "0f31a300800000891504800000" "0f31a30880000089150c800000f4"
READINGS = [0x0000_0012_3456_789A, 0x0000_0012_3456_789A + 0x1_0000_0001]


def flat_descriptor(access: int) -> bytes:
    return struct.pack("<HHBBBB", 0xFFFF, 0, 0, access, 0xCF, 0)


class NoPorts:
    def port_read(self, port: int, size: int) -> int:
        return 0xFF

    def port_write(self, port: int, size: int, value: int) -> None:
        pass


def run_two_reads(clock: VirtualClock) -> list[int]:
    """The two counter values the guest code above reads, on a CPU connected to *clock*."""
    ram = GuestRam(1 << 20)
    gdt = bytes(8) + flat_descriptor(0x9A) + flat_descriptor(0x92)
    ram.view[0x1000:0x1000 + len(gdt)] = gdt
    code = bytes.fromhex(CODE)
    ram.view[0x6000:0x6000 + len(code)] = code
    cpu = UnicornCpu(ram, NoPorts())
    cpu.connect_clock(clock)
    cpu.enter_protected_mode(0x1000, len(gdt) - 1, 0x08, 0x10, 0x6000, 0)
    assert cpu.run(1 << 62, False) is StopReason.HALT
    return list(struct.unpack_from("<QQ", ram.view, 0x8000))


def test_rdtsc_returns_the_clock_s_counter_in_edx_eax():
    host = iter([0, *READINGS])  # the resume's reading, then one per RDTSC
    clock = VirtualClock(lambda: next(host))  # a test's host clock: read through the hook
    clock.resume()
    assert run_two_reads(clock) == READINGS


native = pytest.mark.skipif(not hasattr(uclib, "uc_conode_virtual_tsc"), reason="stock Unicorn reads it by hook")


@native
def test_conode_s_engine_reads_a_stopped_clock_where_it_stopped():
    clock = VirtualClock()
    clock.set_state(state.dump(ClockState(READINGS[1])))
    assert run_two_reads(clock) == [READINGS[1]] * 2


@native
def test_conode_s_engine_reads_a_running_clock_as_guest_time_in_nanoseconds():
    clock = VirtualClock()
    clock.set_state(state.dump(ClockState(READINGS[0])))
    clock.resume()
    before = clock.now()
    first, second = run_two_reads(clock)
    after = clock.now()
    assert before <= first <= second <= after
    clock.pause()
    stopped = clock.now()
    time.sleep(0.01)
    assert run_two_reads(clock) == [stopped] * 2  # the pause reached the engine
