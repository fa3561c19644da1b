"""The copy-on-write disk: a read-only base image seen through a per-guest overlay, on real files."""

from __future__ import annotations

import hashlib
import os
import random
import resource
import signal
from pathlib import Path

import pytest

from conode.errors import DiskImageError, SnapshotError
from conode.vm.disk.config import DiskConfig
from conode.vm.disk.image import BaseImage
from conode.vm.disk.overlay import CLUSTER, MAP_OFFSET, CowDisk, DiskIOError

BASE_BYTES = 256 << 10


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "base.img"
    path.write_bytes(random.Random(7).randbytes(BASE_BYTES))
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def contents(disk: CowDisk, offset: int = 0, length: int | None = None) -> bytes:
    buffer = bytearray(disk.size - offset if length is None else length)
    disk.read(offset, memoryview(buffer))
    return bytes(buffer)


def test_reads_come_from_the_base_until_written_and_the_base_is_never_changed(base: Path) -> None:
    before = digest(base)
    disk = CowDisk(BaseImage(base), None, 1 << 20)
    model = bytearray(base.read_bytes())
    assert contents(disk) == model
    rng = random.Random(1)
    for _ in range(200):  # unaligned writes of any length, made of several parts, over partly written clusters
        offset = rng.randrange(0, BASE_BYTES - 1)
        length = rng.randrange(1, min(3 * CLUSTER, BASE_BYTES - offset) + 1)
        data = rng.randbytes(length)
        cut = rng.randrange(0, length + 1)
        disk.write(offset, [memoryview(data)[:cut], data[cut:]])
        model[offset:offset + length] = data
    assert contents(disk) == model
    assert contents(disk, 5, 9000) == model[5:9005]
    disk.flush()
    assert digest(base) == before
    assert disk.allocated == sum(1 for c in range(disk.clusters) if disk.map[c])


def test_a_partial_write_keeps_the_rest_of_its_cluster_from_the_base(base: Path) -> None:
    disk = CowDisk(BaseImage(base), None, 1 << 20)
    disk.write(CLUSTER + 100, [b"x" * 10])
    original = base.read_bytes()
    assert contents(disk, CLUSTER, CLUSTER) == original[CLUSTER:CLUSTER + 100] + b"x" * 10 + \
        original[CLUSTER + 110:2 * CLUSTER]
    assert disk.allocated == 1


def test_the_budget_stops_new_clusters_but_not_rewrites(base: Path) -> None:
    disk = CowDisk(BaseImage(base), None, 4 * CLUSTER)
    disk.write(0, [bytes(4 * CLUSTER)])
    with pytest.raises(DiskIOError, match="budget"):
        disk.write(4 * CLUSTER, [b"y"])
    disk.write(10, [b"rewrite"])  # already in the overlay: no new cluster
    assert contents(disk, 10, 7) == b"rewrite"
    assert contents(disk, 4 * CLUSTER, 1) == base.read_bytes()[4 * CLUSTER:4 * CLUSTER + 1]
    disk.discard(0, CLUSTER)  # the guest frees a cluster: the budget has room again
    disk.write(4 * CLUSTER, [b"y"])
    assert disk.allocated == 4


def test_discard_gives_whole_clusters_back_to_the_base_and_the_host(base: Path) -> None:
    disk = CowDisk(BaseImage(base), None, 1 << 20)
    disk.write(0, [b"\xAA" * (16 * CLUSTER)])
    blocks_before = os.fstat(disk.fd).st_blocks
    disk.discard(CLUSTER // 2, 8 * CLUSTER)  # clusters 1..7 whole; 0 and 8 only in part: kept
    original = base.read_bytes()
    assert contents(disk, CLUSTER, 7 * CLUSTER) == original[CLUSTER:8 * CLUSTER]
    assert contents(disk, 0, CLUSTER) == b"\xAA" * CLUSTER
    assert contents(disk, 8 * CLUSTER, CLUSTER) == b"\xAA" * CLUSTER
    assert disk.allocated == 9
    assert os.fstat(disk.fd).st_blocks < blocks_before  # the host got the blocks back


def test_write_zeroes_reads_as_zeros_over_a_non_zero_base(base: Path) -> None:
    disk = CowDisk(BaseImage(base), None, 1 << 20)
    disk.write_zeroes(100, 3 * CLUSTER)
    assert contents(disk, 100, 3 * CLUSTER) == bytes(3 * CLUSTER)
    assert contents(disk, 0, 100) == base.read_bytes()[:100]


def test_requests_outside_the_disk_and_writes_to_a_read_only_disk_fail(base: Path) -> None:
    disk = CowDisk(BaseImage(base), None, 1 << 20)
    with pytest.raises(DiskIOError):
        disk.read(BASE_BYTES - 10, memoryview(bytearray(20)))
    with pytest.raises(DiskIOError):
        disk.write(BASE_BYTES, [b"z"])
    read_only = CowDisk(BaseImage(base), None, 1 << 20, read_only=True)
    for attempt in (lambda: read_only.write(0, [b"z"]), lambda: read_only.discard(0, CLUSTER)):
        with pytest.raises(DiskIOError, match="read-only"):
            attempt()


def test_a_host_that_cannot_write_is_an_io_error_not_a_crash(base: Path) -> None:
    disk = CowDisk(BaseImage(base), None, 1 << 20)
    disk.write(0, [b"before"])
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (disk._data_offset + CLUSTER, limit[1]))  # the host file is full
    try:
        with pytest.raises(DiskIOError, match="host could not write"):
            disk.write(8 * CLUSTER, [b"z" * CLUSTER])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    assert disk.map[8] == 0 and contents(disk, 0, 6) == b"before"  # the failed write left nothing behind
    disk.write(8 * CLUSTER, [b"z" * CLUSTER])  # room again: it works
    assert contents(disk, 8 * CLUSTER, CLUSTER) == b"z" * CLUSTER


def test_a_named_overlay_keeps_its_changes_across_runs(base: Path, tmp_path: Path) -> None:
    overlay = tmp_path / "guest.overlay"
    disk = DiskConfig(base, overlay, 1).open()
    disk.write(3 * CLUSTER + 1, [b"kept"])
    disk.flush()
    disk.close()
    again = DiskConfig(base, overlay, 1).open()
    assert contents(again, 3 * CLUSTER + 1, 4) == b"kept" and again.allocated == 1
    again.close()


def test_a_damaged_or_foreign_overlay_is_refused(base: Path, tmp_path: Path) -> None:
    overlay = tmp_path / "guest.overlay"
    disk = DiskConfig(base, overlay, 1).open()
    disk.write(0, [b"data"])
    disk.close()
    with open(overlay, "r+b") as f:  # one byte of the cluster map changes
        f.seek(MAP_OFFSET + 5)
        f.write(b"\x01")
    with pytest.raises(DiskImageError, match="damaged"):
        DiskConfig(base, overlay, 1).open()
    other = tmp_path / "other.img"
    other.write_bytes(bytes(BASE_BYTES))
    fresh = tmp_path / "fresh.overlay"
    DiskConfig(base, fresh, 1).open().close()
    with pytest.raises(DiskImageError, match="another base image"):
        DiskConfig(other, fresh, 1).open()
    junk = tmp_path / "junk.overlay"
    junk.write_bytes(b"not an overlay" * 10)
    with pytest.raises(DiskImageError, match="not a conode disk overlay"):
        DiskConfig(base, junk, 1).open()


def test_bad_images_are_refused_with_one_line(tmp_path: Path) -> None:
    with pytest.raises(DiskImageError, match="cannot open disk image"):
        DiskConfig(tmp_path / "missing.img").open()
    with pytest.raises(DiskImageError, match="not a regular file"):
        DiskConfig(tmp_path).open()
    (tmp_path / "tiny.img").write_bytes(b"x" * 100)
    with pytest.raises(DiskImageError, match="smaller than one"):
        DiskConfig(tmp_path / "tiny.img").open()


def test_the_overlay_travels_in_its_state_and_needs_its_own_base(base: Path, tmp_path: Path) -> None:
    disk = CowDisk(BaseImage(base), None, 1 << 20)
    rng = random.Random(3)
    for _ in range(40):
        offset = rng.randrange(0, BASE_BYTES - 5000)
        disk.write(offset, [rng.randbytes(rng.randrange(1, 5000))])
    disk.discard(0, 8 * CLUSTER)
    saved = disk.get_state()
    restored = CowDisk(BaseImage(base), None, 1 << 20)
    restored.set_state(saved)
    assert contents(restored) == contents(disk) and restored.allocated == disk.allocated
    other = tmp_path / "other.img"
    other.write_bytes(bytes(BASE_BYTES))
    with pytest.raises(SnapshotError, match="another base image than .*other.img"):
        CowDisk(BaseImage(other), None, 1 << 20).set_state(saved)
    small = CowDisk(BaseImage(base), None, CLUSTER)
    with pytest.raises(SnapshotError, match="over the guest's disk budget"):
        small.set_state(saved)
    damaged = {**saved, "chunks": [saved["chunks"][0][:-3]]}
    with pytest.raises(SnapshotError, match="damaged"):
        CowDisk(BaseImage(base), None, 1 << 20).set_state(damaged)
    short = {**saved, "chunks": []}
    with pytest.raises(SnapshotError, match="fewer clusters"):
        CowDisk(BaseImage(base), None, 1 << 20).set_state(short)
