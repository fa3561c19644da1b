from conode.vm.devices.irq import IrqLine
from conode.vm.devices.legacy.pic import PicPair
from conode.vm.devices.legacy.uart import Uart16550
from parts import out as port_out


def make():
    pic = PicPair()
    port_out(pic, 0x21, 0x00)
    out = bytearray()
    return Uart16550(IrqLine(pic, 4), out.extend), pic, out


def test_transmit_and_line_status():
    uart, _, out = make()
    uart.write_port(0, ord("h"))
    uart.write_port(0, ord("i"))
    assert bytes(out) == b"hi"
    assert uart.read_port(5) & 0x60 == 0x60  # THR empty, transmitter empty


def test_loopback_probe_and_scratch():
    uart, _, out = make()
    uart.write_port(7, 0x5A)
    assert uart.read_port(7) == 0x5A
    uart.write_port(4, 0x1A)  # loopback with RTS and OUT2 set
    assert uart.read_port(6) & 0xF0 == 0x90  # CTS (from RTS) and DCD (from OUT2)
    uart.write_port(0, 0x41)
    assert out == b"" and uart.read_port(0) == 0x41


def test_thr_empty_interrupt_needs_out2_and_is_acknowledged_by_iir():
    uart, pic, _ = make()
    uart.write_port(1, 0x02)  # enable THRI
    assert not pic.has_interrupt()  # OUT2 clear: the line is gated off
    uart.write_port(4, 0x08)
    assert pic.has_interrupt()
    assert uart.read_port(2) & 0x0F == 0x02
    assert uart.read_port(2) & 0x0F == 0x01  # reading IIR cleared it


def test_receive_data_interrupt_and_divisor_latch():
    uart, pic, _ = make()
    uart.write_port(4, 0x08)
    uart.write_port(1, 0x01)
    uart.feed(b"ab")
    assert uart.read_port(5) & 1 and uart.read_port(2) & 0x0F == 0x04
    assert uart.read_port(0) == ord("a") and uart.read_port(0) == ord("b")
    assert not uart.read_port(5) & 1
    uart.write_port(3, 0x80)
    uart.write_port(0, 1)
    uart.write_port(1, 0)
    assert uart.divisor == 1 and uart.read_port(0) == 1
