"""Every guest-physical address, I/O port and IRQ line of the cooperative machine, in one place."""

from conode.limits import DEFAULT_GUEST_MEM_MIB, MAX_GUEST_MEM_MIB, MIN_GUEST_MEM_MIB

PAGE_SIZE = 0x1000

# --- Guest physical memory -------------------------------------------------------------------------------
BOOT_GDT = 0x6000  # flat GDT used to enter the kernel's 32-bit entry point
BOOT_PARAMS = 0x7000  # the Linux "zero page" (struct boot_params)
SETUP_DATA = 0x8000  # linked list of struct setup_data (the RNG seed)
CMDLINE = 0x20000  # kernel command line, NUL-terminated
CMDLINE_MAX = 0x1000
KERNEL_LOAD = 0x100000  # protected-mode kernel (code32_start) for a non-relocatable bzImage
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
PORT_PIC_MASTER = 0x20  # 0x20-0x21
PORT_PIC_SLAVE = 0xA0  # 0xA0-0xA1
PORT_PIT = 0x40  # 0x40-0x43
PORT_SYSTEM_CONTROL_B = 0x61  # PIT channel 2 gate and output
PORT_CMOS = 0x70  # 0x70-0x71
PORT_POST = 0x80  # written by the kernel as an I/O delay; ignored
PORT_ELCR = 0x4D0  # 0x4D0-0x4D1, edge/level control of the PICs
PORT_COM1 = 0x3F8  # 0x3F8-0x3FF: cocon, the console UART

# --- IRQ lines on the 8259 pair -------------------------------------------------------------------------
IRQ_PIT = 0
IRQ_CASCADE = 2
IRQ_COM1 = 4

# --- virtio-mmio slots -----------------------------------------------------------------------------------
VIRTIO_MMIO_BASE = 0xD0000000
VIRTIO_MMIO_SIZE = 0x1000
# IRQ lines the legacy PC leaves free without an APIC; slot n uses VIRTIO_IRQS[n].
VIRTIO_IRQS = (5, 6, 7, 9, 10, 11)


def virtio_slot_base(slot: int) -> int:
    """Guest-physical base of virtio-mmio slot *slot*."""
    return VIRTIO_MMIO_BASE + slot * VIRTIO_MMIO_SIZE


# --- CPU ------------------------------------------------------------------------------------------------
VECTOR_PIC_MASTER_DEFAULT = 0x08  # BIOS default; the guest reprograms the PICs to 0x30 (Linux i386)
