"""The guest image conode ships: a Linux i386 bzImage and a busybox initramfs, checked before use."""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from conode.errors import GuestImageError
from conode.vm.clock import TSC_HZ
from conode.vm.bootloader import KernelImage
from conode.vm.layout import MAX_RAM_MIB

KERNEL_NAME = "bzImage"
INITRD_NAME = "initramfs.cpio.gz"
# The console is cocon (COM1). No local APIC: the PIT and the 8259s are the machine's timers and interrupt
# controllers. The TSC runs at a stated rate on the virtual clock (clock.py): the kernel is given that rate
# (tsc_early_khz), which also gives the delay loop its loops per jiffy, instead of calibrating either on an
# emulated CPU (seconds of boot, and no usable result). The TSC is the clocksource: conode's engine reads it in C,
# where each read of the PIT (a latch and two port reads) was three trips to the host's Python, a fifth of a busy
# guest's CPU. No I/O delay: the kernel's "slow" port accesses (the 8259's, the PIT's) otherwise add a write to
# port 0x80 each, a trap to the host that emulated devices never needed.
# TCP's receive buffer starts at 1 MiB (the kernel's default is 128 KiB): a connection's window starts at half
# its buffer (the kernel keeps the rest for its buffers' overhead), and at the default that is 64 KiB, a single
# frame at conet's 64 KiB MTU, so every frame waited for the ACK of the one before, a round trip through the
# switches (between agents: half the throughput). Autotuning may grow it to 4 MiB. Kernels of 5.8 and later take
# sysctls on the command line.
TCP_RMEM = "4096 1048576 4194304"
BASE_CMDLINE = (f"console=ttyS0 tsc_early_khz={TSC_HZ // 1000} tsc=reliable clocksource=tsc io_delay=none nolapic "
                f'noapic rdinit=/init panic=-1 sysctl.net.ipv4.tcp_rmem="{TCP_RMEM}"')


@dataclass(frozen=True)
class GuestImage:
    kernel: KernelImage
    initrd: bytes  # as the guest receives it: gzip members inflated (inflate_initramfs)
    kernel_path: Path
    initrd_path: Path
    kernel_sha256: str
    initrd_sha256: str


def image_tag(kernel_path: Path | None = None, initrd_path: Path | None = None) -> str:
    """A short fingerprint of the guest image and its command line: a snapshot of a booted guest is only valid
    for the same image booted the same way (an upgrade that changes either boots afresh)."""
    directory = packaged_image_dir()
    digest = hashlib.sha256(BASE_CMDLINE.encode())
    for path in (kernel_path or directory / KERNEL_NAME, initrd_path or directory / INITRD_NAME):
        digest.update(_read(path, "guest image file"))
    return digest.hexdigest()[:12]


def packaged_image_dir() -> Path:
    return Path(str(resources.files("conode.vm").joinpath("images")))


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise GuestImageError(f"{what} not found at {path}; rebuild it with guest/build.sh") from None
    except OSError as exc:
        raise GuestImageError(f"cannot read {what} {path}: {exc.strerror}") from None


def _expected_checksums(directory: Path) -> dict[str, str]:
    sums = directory / "SHA256SUMS"
    if not sums.exists():
        return {}
    expected = {}
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            expected[parts[1].lstrip("*")] = parts[0]
    return expected


GZIP_MAGIC = b"\x1f\x8b"


def inflate_initramfs(data: bytes, what: str = "the initramfs") -> bytes:
    """*data* with its leading gzip members inflated here, on the host, and what follows them kept as it is.

    The kernel unpacks an uncompressed archive without decompressing it: inflating the packaged 1.4 MiB in the
    guest's emulated code took about a tenth of a second of every cold boot, and zlib here takes milliseconds.
    The kernel reads concatenated archives, compressed or not, skipping zero bytes between them; an uncompressed
    one must start at a multiple of 4 bytes, so each inflated member is padded to one. Raises GuestImageError for
    a damaged gzip member or one that inflates to more than the largest guest's memory.
    """
    limit = MAX_RAM_MIB << 20
    inflated = bytearray()
    rest = data
    while rest[:2] == GZIP_MAGIC:
        member = zlib.decompressobj(wbits=31)  # gzip framing
        try:
            inflated += member.decompress(rest, limit + 1 - len(inflated))
        except zlib.error as exc:
            raise GuestImageError(f"{what} is damaged: {exc}") from None
        if len(inflated) > limit:
            raise GuestImageError(f"{what} inflates to more than {MAX_RAM_MIB} MiB, the most a guest has")
        if not member.eof:
            raise GuestImageError(f"{what} is damaged: a gzip member ends early")
        inflated += bytes(-len(inflated) % 4)
        rest = member.unused_data.lstrip(b"\0")
    return bytes(inflated) + rest if inflated else data


def load_guest_image(kernel_path: Path | None = None, initrd_path: Path | None = None) -> GuestImage:
    """Load and check the kernel and initramfs (the packaged ones unless paths are given)."""
    directory = packaged_image_dir()
    kernel_path = kernel_path or directory / KERNEL_NAME
    initrd_path = initrd_path or directory / INITRD_NAME
    kernel_data = _read(kernel_path, "guest kernel")
    initrd = _read(initrd_path, "guest initramfs")
    expected = _expected_checksums(kernel_path.parent) if kernel_path.parent == initrd_path.parent else {}
    digests = []
    for path, data in ((kernel_path, kernel_data), (initrd_path, initrd)):
        digests.append(hashlib.sha256(data).hexdigest())
        want = expected.get(path.name)
        if want and digests[-1] != want:
            raise GuestImageError(f"{path} is corrupt: its SHA-256 does not match SHA256SUMS; reinstall conode")
    if initrd[:2] != GZIP_MAGIC and initrd[:6] not in (b"070701", b"070702"):
        raise GuestImageError(f"{initrd_path} is not a gzip or newc cpio initramfs")
    return GuestImage(KernelImage.parse(kernel_data, str(kernel_path)), inflate_initramfs(initrd, str(initrd_path)),
                      kernel_path, initrd_path, digests[0], digests[1])
