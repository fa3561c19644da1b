from conode.vm.devices.irq import IrqLine
from conode.vm.devices.legacy.pic import PicPair
from parts import inp, out


def init_linux_style(pic: PicPair) -> None:
    """The sequence Linux's init_8259A() writes: vectors 0x30 and 0x38, cascade on IRQ 2."""
    for port, value in ((0x20, 0x11), (0x21, 0x30), (0x21, 0x04), (0x21, 0x01),
                        (0xA0, 0x11), (0xA1, 0x38), (0xA1, 0x02), (0xA1, 0x01)):
        out(pic, port, value)
    out(pic, 0x21, 0x00)
    out(pic, 0xA1, 0x00)


def test_masked_pic_raises_nothing():
    pic = PicPair()
    IrqLine(pic, 0).pulse()
    assert not pic.has_interrupt()


def test_edge_is_latched_and_acknowledged_with_programmed_vector():
    requests = []
    pic = PicPair(on_output=lambda level: requests.append(level))
    init_linux_style(pic)
    IrqLine(pic, 4).pulse()
    assert requests[-1] is True and pic.has_interrupt()
    assert pic.acknowledge() == 0x34
    assert requests[-1] is False and not pic.has_interrupt()  # edge consumed, line 4 in service


def test_priority_and_in_service_blocking_until_eoi():
    pic = PicPair()
    init_linux_style(pic)
    IrqLine(pic, 4).pulse()
    assert pic.acknowledge() == 0x34
    IrqLine(pic, 5).pulse()  # lower priority than 4, which is in service
    assert not pic.has_interrupt()
    IrqLine(pic, 0).pulse()  # higher priority preempts
    assert pic.acknowledge() == 0x30
    out(pic, 0x20, 0x20)  # non-specific EOI clears IRQ 0
    out(pic, 0x20, 0x20)  # ... then IRQ 4
    assert pic.acknowledge() == 0x35


def test_slave_interrupt_goes_through_cascade():
    pic = PicPair()
    init_linux_style(pic)
    IrqLine(pic, 9).pulse()
    assert pic.has_interrupt()
    assert pic.acknowledge() == 0x39


def test_level_triggered_line_stays_pending_while_high():
    pic = PicPair()
    init_linux_style(pic)
    out(pic, 0x4D0, 1 << 5)
    line = IrqLine(pic, 5)
    line.set(True)
    assert pic.acknowledge() == 0x35
    out(pic, 0x20, 0x65)  # specific EOI for 5
    assert pic.has_interrupt()  # still high: requests again
    line.set(False)
    assert not pic.has_interrupt()


def test_ocw3_selects_isr_or_irr_and_state_roundtrips():
    pic = PicPair()
    init_linux_style(pic)
    IrqLine(pic, 3).pulse()
    out(pic, 0x20, 0x0A)
    assert inp(pic, 0x20) == 1 << 3
    pic.acknowledge()
    out(pic, 0x20, 0x0B)
    assert inp(pic, 0x20) == 1 << 3
    copy = PicPair()
    copy.set_state(pic.get_state())
    assert copy.get_state() == pic.get_state()
