"""cobd in the real guest: an ext2 image as /dev/vda, read, written, over budget, snapshotted and restored."""

from __future__ import annotations

import hashlib
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from conode.vm.disk.image import BaseImage
from conode.vm.disk.overlay import CowDisk

pytestmark = pytest.mark.skipif(shutil.which("mke2fs") is None or shutil.which("debugfs") is None,
                                reason="needs e2fsprogs (mke2fs, debugfs)")

MOUNT = "mkdir -p /mnt && mount /dev/vda /mnt"


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A 16 MiB ext2 image holding data.bin (300 kB of random bytes) and hello.txt."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "data.bin").write_bytes(random.Random(12).randbytes(300_000))
    (tree / "hello.txt").write_text("hello from the host\n")
    path = tmp_path / "disk.img"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext2", "-d", str(tree), str(path), "16M"], check=True,
                   capture_output=True)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def guest_view(base: Path, overlay: Path, into: Path) -> Path:
    """The disk the guest sees (the base through the overlay), as a plain image the host's tools can read."""
    disk = CowDisk(BaseImage(base), overlay, 1 << 30)
    buffer = bytearray(disk.size)
    disk.read(0, memoryview(buffer))
    disk.close()
    into.write_bytes(buffer)
    return into


def debugfs_cat(image: Path, name: str) -> bytes:
    return subprocess.run(["debugfs", "-R", f"cat /{name}", str(image)], check=True,
                          capture_output=True).stdout


def only_fast(conode) -> None:
    if conode.engine != "fast":
        pytest.skip("the disk's data path does not depend on the CPU engine: measured on the fast one")


def test_the_guest_mounts_reads_and_writes_while_the_base_stays_unchanged(conode, image, tmp_path):
    before = sha256(image)
    overlay = tmp_path / "guest.overlay"
    script = (f"{MOUNT} && sha256sum /mnt/data.bin && cat /mnt/hello.txt && echo written-in-the-guest > "
              "/mnt/new.txt && dd if=/mnt/data.bin of=/mnt/copy.bin bs=4k 2>/dev/null && rm /mnt/hello.txt && "
              "sync && umount /mnt && echo done")
    result = conode("vm", "run", "-q", "--disk", str(image), "--disk-overlay", str(overlay), "--",
                    "sh", "-c", script)
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    data = (image.parent / "tree" / "data.bin").read_bytes()
    assert lines[0].split()[0] == hashlib.sha256(data).hexdigest()
    assert lines[1:] == ["hello from the host", "done"]
    assert sha256(image) == before  # the base image is never written
    seen = guest_view(image, overlay, tmp_path / "seen.img")
    assert debugfs_cat(seen, "new.txt") == b"written-in-the-guest\n"
    assert debugfs_cat(seen, "copy.bin") == data
    assert debugfs_cat(image, "hello.txt") == b"hello from the host\n"  # removed in the overlay only
    assert subprocess.run(["e2fsck", "-fn", str(seen)], capture_output=True).returncode == 0
    again = conode("vm", "run", "-q", "--disk", str(image), "--disk-overlay", str(overlay), "--",
                   "sh", "-c", f"{MOUNT} && cat /mnt/new.txt && ls /mnt")
    assert again.stdout.decode().splitlines()[0] == "written-in-the-guest"
    assert "hello.txt" not in again.stdout.decode()


def test_a_read_only_disk_mounts_read_only(conode, image):
    only_fast(conode)
    result = conode("vm", "run", "-q", "--disk", str(image), "--disk-ro", "--", "sh", "-c",
                    f"cat /sys/block/vda/ro; {MOUNT} -o ro && cat /mnt/hello.txt; echo x > /mnt/x || echo refused")
    assert result.stdout.decode().splitlines() == ["1", "hello from the host", "refused"], result.stderr.decode()


def test_writing_past_the_budget_fails_in_the_guest_which_keeps_running(conode, image, tmp_path):
    only_fast(conode)
    before = sha256(image)
    overlay = tmp_path / "guest.overlay"
    script = (f"{MOUNT} && dd if=/dev/zero of=/mnt/big bs=64k count=64 conv=fsync; echo dd-status=$?; "
              "echo still-running")
    result = conode("vm", "run", "-q", "--disk", str(image), "--disk-overlay", str(overlay), "--disk-budget", "1",
                    "--", "sh", "-c", script)
    out = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 0, out
    assert "dd-status=0" not in out and "dd-status=" in out and "still-running" in out
    assert "I/O error" in out or "No space" in out
    assert sha256(image) == before
    assert (overlay.stat().st_blocks * 512) < (1 << 20) + (1 << 20)  # the budget, plus the map and the header


def test_a_guest_with_a_dirty_disk_continues_in_another_process(conode, image, tmp_path):
    only_fast(conode)
    snap = tmp_path / "dirty.snap"
    script = (f"{MOUNT} && echo before-the-snapshot > /mnt/note.txt && head -c 200000 /mnt/data.bin > /mnt/part && "
              "sync && echo written && sleep 4 && cat /mnt/note.txt && sha256sum /mnt/part")
    first = conode("vm", "run", "-q", "--disk", str(image), "--snapshot-after", "3", "--snapshot-to", str(snap),
                   "--", "sh", "-c", script)
    assert first.returncode == 0, first.stderr.decode()
    assert first.stdout == b"written\n"  # stopped in the sleep: the files are on the disk, not yet read back
    resumed = conode("vm", "resume", "-q", str(snap))
    assert resumed.returncode == 0, resumed.stderr.decode()
    lines = resumed.stdout.decode().splitlines()
    data = (image.parent / "tree" / "data.bin").read_bytes()
    assert lines == ["before-the-snapshot", f"{hashlib.sha256(data[:200000]).hexdigest()}  /mnt/part"]

    other = tmp_path / "other.img"  # another image under another name: refused, naming it
    shutil.copy(image, other)
    with open(other, "r+b") as f:
        f.seek(2000)
        f.write(b"changed")
    refused = conode("vm", "resume", "-q", "--disk", str(other), str(snap))
    err = refused.stderr.decode()
    assert refused.returncode == 125 and "Traceback" not in err and "other.img" in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1
    image.rename(tmp_path / "moved.img")  # the base is gone
    missing = conode("vm", "resume", "-q", str(snap))
    err = missing.stderr.decode()
    assert missing.returncode == 125 and "disk.img" in err and "Traceback" not in err
    moved = conode("vm", "resume", "-q", "--disk", str(tmp_path / "moved.img"), str(snap))
    assert moved.stdout.decode().splitlines()[0] == "before-the-snapshot"
