"""The PCI host bridge: configuration mechanism #1 on ports 0xCF8 (address) and 0xCFC-0xCFF (data), bus 0 only,
and the window of physical addresses in which the functions' memory BARs decode.

Function 00:00.0 is the bridge itself, a host bridge by class (what Linux's ``pci_sanity_check`` looks for before
it trusts mechanism #1) with Intel's 440FX identity, which Linux knows needs nothing more. Every other bus,
device or function reads as all ones (nothing there) and ignores writes. A BAR decodes only inside the window
the host gave PCI (layout.py): a guest that moves one elsewhere simply loses the device, as behind a bridge
whose window it missed. Every access is total; no guest value raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from conode.vm import state
from conode.vm.devices.open_bus import OpenBus
from conode.vm.devices.pci.config import NUM_BARS, ConfigSpace, Identity, PciConfigState
from conode.vm.state import bits

ADDRESS_ENABLE = 1 << 31
ADDRESS_WRITABLE = ADDRESS_ENABLE | 0x00FFFFFC  # bus, device, function, register; reserved bits read 0
DATA_PORT = 4  # offset of 0xCFC in the port range
MAX_DEVICES = 32
HOST_BRIDGE_IDENTITY = Identity(vendor=0x8086, device=0x1237, class_code=0x060000, revision=0x02)


class PciFunction(Protocol):
    """A function on bus 0: its configuration space, and its memory BARs' contents."""

    config: ConfigSpace

    def bar_read(self, bar: int, offset: int, size: int) -> int: ...

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None: ...


class _Bridge:
    """Function 00:00.0: the host bridge's own header, no BARs."""

    def __init__(self) -> None:
        self.config = ConfigSpace(HOST_BRIDGE_IDENTITY)

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        pass


@dataclass(frozen=True)
class PciHostState(state.Record):
    KIND = "PCI host bridge"
    VERSION = 1

    address: int = bits(ADDRESS_WRITABLE)
    bridge: PciConfigState


class PciHostBridge:
    """Bus 0 behind configuration mechanism #1; memory BARs decode in [*window_base*, + *window_size*)."""

    def __init__(self, window_base: int, window_size: int) -> None:
        self.window_base = window_base
        self.window_size = window_size
        self.address = 0
        self._bridge = _Bridge()
        self.functions: dict[int, PciFunction] = {0: self._bridge}
        self._unclaimed = OpenBus(window_base)

    def attach(self, device: int, function: PciFunction) -> None:
        if not 0 < device < MAX_DEVICES or device in self.functions:
            raise ValueError(f"PCI device number {device} is taken or out of range")
        self.functions[device] = function

    # --- configuration mechanism #1 ----------------------------------------------------------------------------
    def read_port(self, offset: int, size: int) -> int:
        if offset >= DATA_PORT:
            return self._config_access(offset, size)
        if offset == 0 and size == 4:
            return self.address
        return (1 << (8 * size)) - 1  # byte and word accesses to 0xCF8-0xCFB are not the address register

    def write_port(self, offset: int, size: int, value: int) -> None:
        if offset >= DATA_PORT:
            self._config_access(offset, size, value)
        elif offset == 0 and size == 4:
            self.address = value & ADDRESS_WRITABLE

    def _config_access(self, offset: int, size: int, value: int | None = None) -> int:
        """Read (value None) or write the addressed register through the data port at *offset*."""
        ones = (1 << (8 * size)) - 1
        address = self.address
        function = self.functions.get((address >> 11) & 0x1F)
        if not address & ADDRESS_ENABLE or address & 0x00FF0700 or function is None:
            return ones  # disabled, another bus, another function number, or an empty slot
        lane = offset - DATA_PORT
        width = min(size, 4 - lane)  # bytes that fall inside the data port
        register = (address & 0xFC) + lane
        if value is not None:
            function.config.write(register, width, value & ((1 << (8 * width)) - 1))
            return 0
        return function.config.read(register, width) | (ones & ~((1 << (8 * width)) - 1))

    # --- the memory window ---------------------------------------------------------------------------------------
    def _decoder(self, offset: int) -> tuple[PciFunction, int, int] | None:
        address = self.window_base + offset
        for function in self.functions.values():
            config = function.config
            for bar in range(NUM_BARS):
                base = config.bar_base(bar)
                if base is not None and base <= address < base + config.bar_sizes[bar]:
                    return function, bar, address - base
        return None

    def window_read(self, offset: int, size: int) -> int:
        target = self._decoder(offset)
        if target is None:
            return self._unclaimed.read(offset, size)
        function, bar, at = target
        return function.bar_read(bar, at, size)

    def window_write(self, offset: int, size: int, value: int) -> None:
        target = self._decoder(offset)
        if target is None:
            self._unclaimed.write(offset, size, value)
        else:
            function, bar, at = target
            function.bar_write(bar, at, size, value)

    # --- snapshots (each function saves its own configuration with its device) ---------------------------------
    def get_state(self) -> dict:
        return state.dump(PciHostState(self.address, self._bridge.config.get_state()))

    def set_state(self, data: dict) -> None:
        saved = state.load(PciHostState, data)
        self._bridge.config.set_state(saved.bridge)
        self.address = saved.address


