import resource
import signal

import pytest

from conode.errors import SnapshotError
from conode.vm.snapshot import decode_ram, encode_ram, read_snapshot, write_snapshot


def test_ram_roundtrip_elides_zero_pages():
    ram = bytearray(4 << 20)
    ram[5000:5010] = b"0123456789"
    ram[3 << 20:(3 << 20) + 4096] = bytes(range(256)) * 16
    encoded = encode_ram(memoryview(ram))
    assert bin(int.from_bytes(encoded["bitmap"], "little")).count("1") == 2
    target = bytearray(len(ram))
    decode_ram(encoded, memoryview(target))
    assert target == ram


def test_ram_size_mismatch_is_refused():
    encoded = encode_ram(memoryview(bytearray(1 << 20)))
    with pytest.raises(SnapshotError, match="RAM"):
        decode_ram(encoded, memoryview(bytearray(2 << 20)))


def test_file_roundtrip(tmp_path):
    path = tmp_path / "s.snap"
    write_snapshot(path, {"a": 1, "blob": b"\x00\x01"})
    assert read_snapshot(path) == {"a": 1, "blob": b"\x00\x01"}


@pytest.mark.parametrize("damage, message", [
    (lambda d: b"NOTASNAP" + d[8:], "not a conode snapshot"),
    (lambda d: d[:-3], "truncated"),
    (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "checksum"),
    (lambda d: d[:8] + (99).to_bytes(4, "little") + d[12:], "format 99"),
    (lambda d: b"", "not a conode snapshot"),
])
def test_damaged_files_are_refused_clearly(tmp_path, damage, message):
    path = tmp_path / "s.snap"
    write_snapshot(path, {"a": list(range(100))})
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(SnapshotError, match=message):
        read_snapshot(path)


def test_failed_write_leaves_previous_snapshot_intact(tmp_path):
    path = tmp_path / "s.snap"
    write_snapshot(path, {"v": 1})
    with pytest.raises(SnapshotError, match="cannot write"):
        write_snapshot(tmp_path / "missing-dir" / "s.snap", {"v": 2})
    # A file-size limit stands in for a full disk: the write fails part-way through.
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, old_limit[1]))
    try:
        with pytest.raises(SnapshotError, match="cannot write"):
            write_snapshot(path, {"v": b"x" * 100_000})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert read_snapshot(path) == {"v": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
