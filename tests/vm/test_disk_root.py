"""A guest whose root file system is its disk: guest/init switches to it, jobs run there, and the post-boot
snapshot serves image guests as it serves the initramfs guest."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from guest_programs import ready_snapshot, run_job_restored

from conode.testing.root_image import root_image
from conode.vm.disk.config import DiskConfig
from conode.vm.guest import JobSpec
from conode.vm.machine import MachineConfig

pytestmark = pytest.mark.skipif(shutil.which("mke2fs") is None or shutil.which("cpio") is None,
                                reason="needs e2fsprogs (mke2fs) and cpio")

MARKER = "this file is on the root disk"


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return root_image(tmp_path, {"marker.txt": MARKER + "\n"})


def test_the_guest_boots_into_its_disk_and_the_job_runs_there(conode, image):
    result = conode("vm", "run", "-q", "--disk", str(image), "--disk-root", "--", "sh", "-c",
                    "cat /marker.txt; grep ' / ' /proc/mounts; pwd; exit 3")
    lines = result.stdout.decode().splitlines()
    assert result.returncode == 3, result.stderr.decode()
    assert lines[0] == MARKER
    assert lines[1].startswith("/dev/vda / ext2 rw")
    assert lines[2] == "/"


def test_a_read_only_root_disk_gives_jobs_a_writable_job_directory(conode, image):
    if conode.engine != "fast":
        pytest.skip("the mount choices do not depend on the CPU engine: checked on the fast one")
    result = conode("vm", "run", "-q", "--disk", str(image), "--disk-root", "--disk-ro", "--", "sh", "-c",
                    "grep ' / ' /proc/mounts; echo x > /job/x && echo job-writable; echo x > /y || echo root-refused")
    lines = result.stdout.decode().splitlines()
    assert lines[0].startswith("/dev/vda / ext2 ro") and lines[1:] == ["job-writable", "root-refused"], \
        result.stdout.decode() + result.stderr.decode()


def test_a_disk_without_a_file_system_leaves_the_guest_on_its_initramfs_saying_why(conode, tmp_path):
    if conode.engine != "fast":
        pytest.skip("the fallback does not depend on the CPU engine: checked on the fast one")
    blank = tmp_path / "blank.img"
    blank.write_bytes(bytes(1 << 20))
    result = conode("vm", "run", "-v", "--disk", str(blank), "--disk-root", "--", "sh", "-c",
                    "grep ' / ' /proc/mounts | cut -d ' ' -f 1-3")
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert "conode: cannot use /dev/vda as the root file system: mount: " in err and "staying on the initramfs" in err
    assert result.stdout.decode().splitlines() == ["rootfs / rootfs"]


def test_fresh_guests_from_the_post_boot_snapshot_of_an_image_guest_each_get_their_own_disk(image):
    pristine = ready_snapshot(MachineConfig(disk=DiskConfig(image, root=True)))
    ram = pristine.ram_image()
    data = b"3\n4\n5\n"
    script = ("cat /marker.txt; df -P . | tail -n 1 | cut -d ' ' -f 1; "
              "test -e /left-by-the-first || echo clean; touch /left-by-the-first; "
              "awk '{s += $1} END {print s}' data.txt > sum.txt; exit 7")
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    for job in (1, 2):  # the second guest must not see what the first wrote: each has its own overlay
        sink = run_job_restored(pristine, JobSpec.in_job_directory(job, ["sh", "-c", script], {"data.txt": data},
                                                                   ["sum.txt"]), ram)
        assert sink.failure is None and sink.status == 7, (sink.failure, sink.stdout)
        assert sink.stdout.decode().splitlines() == [MARKER, "/dev/vda", "clean"]
        assert sink.outputs == {"sum.txt": b"12\n"}
    ram.close()
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before
