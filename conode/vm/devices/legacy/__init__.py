"""The legacy PC devices: 8259 PIC pair, 8254 PIT, 16550 UART (cocon), CMOS RTC. Each decodes port offsets
relative to the base the machine attaches it at (conode/vm/layout.py)."""
