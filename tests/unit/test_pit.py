from conode.vm.devices.irq import IrqLine
from conode.vm.devices.legacy.pic import PicPair
from conode.vm.devices.legacy.pit import PIT_HZ, Pit
from parts import inp, out


class Clock:
    def __init__(self) -> None:
        self.ns = 0

    def __call__(self) -> int:
        return self.ns


def make_pit():
    clock = Clock()
    pic = PicPair()
    out(pic, 0x21, 0x00)  # unmask
    return Pit(IrqLine(pic, 0), clock), pic, clock


def program_periodic(pit: Pit, count: int) -> None:
    out(pit, 0x43, 0x34)  # channel 0, lo/hi, mode 2
    out(pit, 0x40, count & 0xFF)
    out(pit, 0x40, count >> 8)


def test_periodic_tick_at_100_hz():
    pit, pic, clock = make_pit()
    program_periodic(pit, 11932)
    first = pit.next_event_ns()
    assert abs(first - 10_000_000) < 1_000  # 11932 / 1.193182 MHz = 10 ms
    clock.ns = first - 1
    pit.update()
    assert not pic.has_interrupt()
    clock.ns = first
    pit.update()
    assert pic.has_interrupt()
    assert pit.next_event_ns() > first


def test_missed_periods_collapse_into_one_tick():
    pit, pic, clock = make_pit()
    program_periodic(pit, 11932)
    clock.ns = 55_000_000
    pit.update()
    assert pit.next_event_ns() > clock.ns


def test_latched_count_reads_low_then_high():
    pit, _, clock = make_pit()
    program_periodic(pit, 10000)
    clock.ns = -(-1_000_000_000 * 1000 // PIT_HZ)  # 1000 input ticks later
    out(pit, 0x43, 0x00)  # latch channel 0
    clock.ns *= 3  # the latched value must not move
    low, high = inp(pit, 0x40), inp(pit, 0x40)
    assert (high << 8 | low) == 9000


def test_channel2_output_via_port_61():
    pit, _, clock = make_pit()
    out(pit, 0x61, 0x01)
    out(pit, 0x43, 0xB0)  # channel 2, lo/hi, mode 0
    out(pit, 0x42, 100)
    out(pit, 0x42, 0)
    assert not inp(pit, 0x61) & 0x20
    clock.ns = 200 * 1_000_000_000 // PIT_HZ
    assert inp(pit, 0x61) & 0x20


def test_state_roundtrip_keeps_schedule():
    pit, _, clock = make_pit()
    program_periodic(pit, 11932)
    clock.ns = 25_000_000
    pit.update()
    other, _, _ = make_pit()
    other.set_state(pit.get_state())
    assert other.next_event_ns() == pit.next_event_ns()
