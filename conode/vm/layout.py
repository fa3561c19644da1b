"""Every guest-physical address, I/O port and IRQ line of the cooperative machine, in one place."""

from typing import NamedTuple

from conode.limits import DEFAULT_GUEST_MEM_MIB, MAX_GUEST_MEM_MIB, MIN_GUEST_MEM_MIB


class PortRange(NamedTuple):
    """Consecutive I/O ports of one device; the device sees offsets from *base*."""

    base: int
    count: int


PAGE_SIZE = 0x1000

# --- Guest physical memory -------------------------------------------------------------------------------
BOOT_GDT = 0x6000  # flat GDT used to enter the kernel's 32-bit entry point
BOOT_PARAMS = 0x7000  # the Linux "zero page" (struct boot_params)
SETUP_DATA = 0x8000  # linked list of struct setup_data (the RNG seed)
CMDLINE = 0x20000  # kernel command line, NUL-terminated
CMDLINE_MAX = 0x1000
LOW_MEMORY_END = 0x9F000  # usable RAM below the legacy hole (e820 type 1)
HIGH_MEMORY_START = 0x100000
INITRD_MAX_END = 0x37FFFFFF  # keep the initrd below the kernel's lowmem limit (initrd_addr_max)

MIN_RAM_MIB = MIN_GUEST_MEM_MIB
MAX_RAM_MIB = MAX_GUEST_MEM_MIB
DEFAULT_RAM_MIB = DEFAULT_GUEST_MEM_MIB

# Boot GDT selectors, as the Linux 32-bit boot protocol requires (__BOOT_CS / __BOOT_DS).
BOOT_CS = 0x10
BOOT_DS = 0x18

# --- Legacy I/O ports ------------------------------------------------------------------------------------
PORTS_PIC_MASTER = PortRange(0x20, 2)  # command, data
PORTS_PIC_SLAVE = PortRange(0xA0, 2)
PORTS_ELCR = PortRange(0x4D0, 2)  # edge/level control of the master and the slave PIC
PORTS_PIT = PortRange(0x40, 4)  # channels 0-2, mode/command
PORT_SYSTEM_CONTROL_B = PortRange(0x61, 1)  # PIT channel 2 gate and output
PORT_KEYBOARD_COMMAND = PortRange(0x64, 1)  # the 8042's command port: only its reset pulse is modelled
PORTS_CMOS = PortRange(0x70, 2)  # index, data
PORT_SYSTEM_CONTROL_A = PortRange(0x92, 1)  # fast reset
PORTS_COM1 = PortRange(0x3F8, 8)  # cocon, the console UART
PORTS_COM2 = PortRange(0x2F8, 8)  # the host channel for kernels without a virtio console
PORTS_PCI_CONFIG = PortRange(0xCF8, 8)  # configuration mechanism #1: address at 0xCF8, data at 0xCFC-0xCFF

# --- IRQ lines on the 8259 pair -------------------------------------------------------------------------
IRQ_PIT = 0
IRQ_CASCADE = 2  # the slave PIC's output, on the master's input 2
IRQ_COM1 = 4
IRQ_COM2 = 3

# --- virtio-mmio slots -----------------------------------------------------------------------------------
PHYSICAL_SPACE_END = 1 << 32  # above RAM and the device windows, up to here, the bus floats (open_bus.py)
VIRTIO_MMIO_BASE = 0xD0000000
VIRTIO_MMIO_SIZE = 0x1000
# IRQ lines the legacy PC leaves free without an APIC, half for each transport of a device: slot n's
# virtio-mmio window uses VIRTIO_IRQS[n], its virtio-pci function's INTA VIRTIO_PCI_IRQS[n].
VIRTIO_IRQS = (5, 6, 7)
VIRTIO_PCI_IRQS = (9, 10, 11)


def virtio_slot_base(slot: int) -> int:
    """Guest-physical base of virtio-mmio slot *slot*."""
    return VIRTIO_MMIO_BASE + slot * VIRTIO_MMIO_SIZE


# --- PCI ---------------------------------------------------------------------------------------------------
# The window in which PCI memory BARs decode (no firmware: the host places every BAR). Above the largest RAM
# and the virtio-mmio slots; Linux finds it unclaimed in the e820 map and keeps the BARs where they are.
PCI_MMIO_BASE = 0xE0000000
PCI_MMIO_SIZE = 0x01000000
PCI_BAR_STRIDE = 0x10000  # room for one function's BARs


def virtio_pci_device(slot: int) -> int:
    """PCI device number (bus 0, function 0) of virtio slot *slot*'s function; 0 is the host bridge."""
    return slot + 1


def virtio_pci_bar_base(slot: int) -> int:
    """Where the host places BAR 0 of virtio slot *slot*'s PCI function."""
    return PCI_MMIO_BASE + slot * PCI_BAR_STRIDE


# --- Interrupt vectors ------------------------------------------------------------------------------------
VECTOR_PIC_RESET = 0x08  # a PIC's vector base until the guest programs it (Linux i386 uses 0x30 and 0x38)
