import hashlib
import os
import resource
import signal
import threading

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conode.errors import SnapshotError
from conode.vm.snapshot import FORMAT_VERSION, HEADER, MAGIC, MAX_PAYLOAD, decode_ram, encode_ram, read_snapshot, \
    write_snapshot

MACHINE = {"machine": {"cpu": b"..."}}


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
    write_snapshot(path, {**MACHINE, "a": 1, "blob": b"\x00\x01"})
    assert read_snapshot(path) == {**MACHINE, "a": 1, "blob": b"\x00\x01"}


@pytest.mark.parametrize("damage, message", [
    (lambda d: b"NOTASNAP" + d[8:], "not a conode snapshot"),
    (lambda d: d[:-3], "truncated"),
    (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "checksum"),
    (lambda d: d[:8] + (99).to_bytes(4, "little") + d[12:], "format 99, written by a newer conode"),
    (lambda d: d[:8] + (1).to_bytes(4, "little") + d[12:], "format 1, written by an older conode"),
    (lambda d: d[:12] + (MAX_PAYLOAD + 1).to_bytes(8, "little") + d[20:], "over the"),
    (lambda d: b"", "not a conode snapshot"),
])
def test_damaged_files_are_refused_clearly(tmp_path, damage, message):
    path = tmp_path / "s.snap"
    write_snapshot(path, {**MACHINE, "a": list(range(100))})
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(SnapshotError, match=message):
        read_snapshot(path)


def test_failed_write_leaves_previous_snapshot_intact(tmp_path):
    path = tmp_path / "s.snap"
    write_snapshot(path, {**MACHINE, "v": 1})
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
    assert read_snapshot(path) == {**MACHINE, "v": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "s.snap"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []
    reader = threading.Thread(target=lambda: outcome.append(pytest.raises(SnapshotError, read_snapshot, fifo).value))
    reader.start()
    reader.join(5)
    assert not reader.is_alive(), "read_snapshot blocked on a FIFO"
    assert "not a regular file" in str(outcome[0])


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/null", "."])
def test_devices_and_directories_are_refused(path):
    with pytest.raises(SnapshotError, match="not a regular file"):
        read_snapshot(path)


def test_a_file_over_the_size_limit_is_refused_before_reading(tmp_path):
    path = tmp_path / "big.snap"
    with open(path, "wb") as out:
        out.truncate(HEADER.size + MAX_PAYLOAD + 1)  # sparse: no disk used
    with pytest.raises(SnapshotError, match="over the"):
        read_snapshot(path)


def signed(payload: bytes) -> bytes:
    return HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), hashlib.sha256(payload).digest()) + payload


@pytest.mark.parametrize("payload, message", [
    (msgpack.packb([1, 2]), "not a map"),
    (msgpack.packb({"machine": 3}), "no 'machine' map"),
    (msgpack.packb({"other": {}}), "no 'machine' map"),
    (b"\xc1", "corrupt"),
    (msgpack.packb({"machine": {}}) + b"\x00", "corrupt"),
    (b"\x81\x91\x01\x01", "corrupt"),  # a map keyed by a list
    (b"\xdd\xff\xff\xff\xff", "corrupt"),  # an array claiming 4 billion elements
])
def test_envelope_with_a_valid_checksum_is_still_checked(tmp_path, payload, message):
    path = tmp_path / "s.snap"
    path.write_bytes(signed(payload))
    with pytest.raises(SnapshotError, match=message):
        read_snapshot(path)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=200))
def test_random_signed_payloads_raise_only_snapshot_error(tmp_path, payload):
    path = tmp_path / "s.snap"
    path.write_bytes(signed(payload))
    try:
        assert isinstance(read_snapshot(path)["machine"], dict)
    except SnapshotError:
        pass
