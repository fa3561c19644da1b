import gzip
import struct

import pytest

from conode.errors import GuestImageError
from conode.vm import bootloader, guest_image, layout
from conode.vm.bootloader import KernelImage, e820_map, load_linux
from conode.vm.guest_image import load_guest_image


def fake_bzimage(setup_sects: int = 4, protocol: int = 0x020F, payload: bytes = b"\x90" * 4096) -> bytes:
    data = bytearray((setup_sects + 1) * 512)
    data[0x1F1] = setup_sects
    data[0x201] = 0x6A  # header length past 0x202
    data[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", data, 0x206, protocol)
    data[0x211] = 0x01
    struct.pack_into("<I", data, 0x214, 0x100000)
    struct.pack_into("<I", data, 0x22C, 0x37FFFFFF)
    struct.pack_into("<I", data, 0x238, 2047)
    struct.pack_into("<Q", data, 0x258, 0x1000000)  # pref_address: 16 MiB
    struct.pack_into("<I", data, 0x260, 8 << 20)  # init_size
    return bytes(data) + payload


def test_load_places_kernel_initrd_cmdline_and_zero_page():
    ram = memoryview(bytearray(64 << 20))
    kernel = KernelImage.parse(fake_bzimage())
    plan = load_linux(ram, kernel, b"\x1f\x8b" + b"x" * 5000, "console=ttyS0 quiet")
    assert plan.entry == 0x100000 and plan.boot_params == layout.BOOT_PARAMS
    assert bytes(ram[0x100000:0x100010]) == b"\x90" * 16
    assert plan.initrd_address % 4096 == 0 and plan.initrd_address + plan.initrd_size <= 64 << 20
    zp = layout.BOOT_PARAMS
    assert struct.unpack_from("<I", ram, zp + bootloader.OFF_RAMDISK_IMAGE)[0] == plan.initrd_address
    assert struct.unpack_from("<I", ram, zp + bootloader.OFF_CMD_LINE_PTR)[0] == layout.CMDLINE
    assert bytes(ram[layout.CMDLINE:layout.CMDLINE + 20]) == b"console=ttyS0 quiet\0"
    assert ram[zp + bootloader.OFF_TYPE_OF_LOADER] == 0xFF
    entries = ram[zp + bootloader.OFF_E820_ENTRIES]
    table = [struct.unpack_from("<QQI", ram, zp + bootloader.OFF_E820_TABLE + 20 * i) for i in range(entries)]
    assert table == e820_map(64 << 20)
    assert sum(size for _, size, kind in table if kind == 1) < 64 << 20


def test_rng_seed_is_passed_as_setup_data():
    ram = memoryview(bytearray(64 << 20))
    load_linux(ram, KernelImage.parse(fake_bzimage()), b"\x1f\x8b" * 10, "", rng_seed=b"S" * 32)
    pointer = struct.unpack_from("<Q", ram, layout.BOOT_PARAMS + bootloader.OFF_SETUP_DATA)[0]
    assert pointer == layout.SETUP_DATA
    nxt, kind, length = struct.unpack_from("<QII", ram, pointer)
    assert (nxt, kind, length) == (0, bootloader.SETUP_RNG_SEED, 32)
    assert bytes(ram[pointer + 16:pointer + 48]) == b"S" * 32


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d[:0x200] + b"XXXX" + d[0x204:], "not a Linux bzImage"),
    (lambda d: d[:0x206] + b"\x00\x02" + d[0x208:], "boot protocol 2.0"),
    (lambda d: d[:100], "not a Linux bzImage"),
])
def test_bad_kernels_are_refused_clearly(mutate, message):
    with pytest.raises(GuestImageError, match=message):
        KernelImage.parse(mutate(fake_bzimage()))


def test_too_little_memory_for_kernel_and_initrd():
    ram = memoryview(bytearray(20 << 20))
    with pytest.raises(GuestImageError, match="too small"):
        load_linux(ram, KernelImage.parse(fake_bzimage()), b"\x1f\x8b" * 1000, "")


def test_packaged_image_is_present_and_checks_out():
    image = load_guest_image()
    assert image.kernel.protocol >= 0x0206 and image.initrd[:6] == b"070701"  # inflated on the host
    archive = gzip.decompress(image.initrd_path.read_bytes())
    assert image.initrd == archive + bytes(-len(archive) % 4)


def test_corrupt_packaged_copy_is_detected(tmp_path):
    image = load_guest_image()
    for name in ("bzImage", "initramfs.cpio.gz", "SHA256SUMS"):
        (tmp_path / name).write_bytes((image.kernel_path.parent / name).read_bytes())
    data = bytearray((tmp_path / "bzImage").read_bytes())
    data[-100] ^= 0xFF
    (tmp_path / "bzImage").write_bytes(data)
    with pytest.raises(GuestImageError, match="corrupt"):
        load_guest_image(tmp_path / "bzImage", tmp_path / "initramfs.cpio.gz")


def test_missing_kernel_says_where(tmp_path):
    with pytest.raises(GuestImageError, match="not found"):
        load_guest_image(tmp_path / "nope", None)


def test_the_image_tag_names_the_command_line_too(monkeypatch):
    # An agent's post-boot snapshot is named by the tag: an upgrade that changes how the guest boots (a sysctl on
    # the command line, say) must boot afresh rather than resume guests booted the old way.
    before = guest_image.image_tag()
    assert guest_image.image_tag() == before
    monkeypatch.setattr(guest_image, "BASE_CMDLINE", guest_image.BASE_CMDLINE + " sysctl.vm.swappiness=1")
    assert guest_image.image_tag() != before


def cpio_entry(name: str, data: bytes) -> bytes:
    """One newc cpio entry (a regular file), padded as the format wants."""
    header = b"070701" + b"".join(b"%08X" % field for field in
                                  (1, 0o100644, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0))
    entry = header + name.encode() + b"\0"
    entry += bytes(-len(entry) % 4) + data
    return entry + bytes(-len(entry) % 4)


def test_gzip_members_are_inflated_and_what_follows_them_is_kept():
    first, second = cpio_entry("a", b"x" * 5), cpio_entry("bb", b"y" * 3)
    tail = cpio_entry("c", b"uncompressed") + cpio_entry("TRAILER!!!", b"")
    data = gzip.compress(first[:-2]) + gzip.compress(second) + bytes(8) + tail
    inflated = guest_image.inflate_initramfs(data)
    assert inflated == first[:-2] + bytes(2) + second + tail  # each member padded to 4 bytes, the zeros dropped
    assert guest_image.inflate_initramfs(tail) is tail  # nothing to inflate: the very bytes


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[:-9], "ends early"),
    (lambda data: data[:12] + bytes(len(data) - 12), "damaged"),
])
def test_a_damaged_gzip_initramfs_is_refused_clearly(damage, message):
    with pytest.raises(GuestImageError, match=message):
        guest_image.inflate_initramfs(damage(gzip.compress(cpio_entry("a", b"data" * 100))), "initrd.gz")


def test_an_initramfs_larger_than_any_guest_is_refused(monkeypatch):
    monkeypatch.setattr(guest_image, "MAX_RAM_MIB", 1)
    with pytest.raises(GuestImageError, match="more than 1 MiB"):
        guest_image.inflate_initramfs(gzip.compress(bytes(2 << 20)))
