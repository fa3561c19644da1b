import calendar

from conode.vm.devices.legacy.cmos import Cmos
from parts import inp, out


def test_rtc_reports_bcd_time_advancing_with_guest_clock():
    now = [0]
    epoch = calendar.timegm((2026, 11, 21, 10, 59, 58, 0, 0, 0))
    cmos = Cmos(lambda: now[0], epoch_s=epoch)

    def reg(index):
        out(cmos, 0x70, index)
        return inp(cmos, 0x71)

    assert (reg(0x04), reg(0x02), reg(0x00)) == (0x10, 0x59, 0x58)
    assert (reg(0x09), reg(0x08), reg(0x07), reg(0x32)) == (0x26, 0x11, 0x21, 0x20)
    now[0] = 3_000_000_000
    assert (reg(0x04), reg(0x02), reg(0x00)) == (0x11, 0x00, 0x01)
    assert not reg(0x0A) & 0x80  # never "update in progress"


def test_cmos_ram_roundtrip():
    cmos = Cmos(lambda: 0, epoch_s=0)
    out(cmos, 0x70, 0x40)
    out(cmos, 0x71, 0x99)
    copy = Cmos(lambda: 0, epoch_s=1)
    copy.set_state(cmos.get_state())
    out(copy, 0x70, 0x40)
    assert inp(copy, 0x71) == 0x99 and copy.epoch_s == 0
