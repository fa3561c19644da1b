"""The Debian image (guest/mkimage-debian.sh): CI builds the recipe's small variant (debootstrap minbase with
python3) with Debian's kernel and times it; the image boots with conode's kernel into Debian's userland, and the
README's example — a Python script with its data file — runs on it as a job, from the image guest's post-boot
snapshot; Debian's own kernel and initramfs boot it too, finding its disk on PCI.

``CONODE_DEBIAN_IMAGE=PATH`` runs the same tests on an image built beforehand (e.g. the full variant) instead of
building one; an image built with ``--kernel`` also boots with Debian's own kernel and initramfs. Building needs root (debootstrap chroots), debootstrap, e2fsprogs and cpio, and Debian's archive.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from guest_programs import ready_snapshot, run_job_in_guest, run_job_restored

from conode.cache import cache_dir
from conode.vm.disk.config import DiskConfig
from conode.vm.guest import JobSpec
from conode.vm.guest_image import packaged_image_dir
from conode.vm.machine import MachineConfig

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "guest" / "mkimage-debian.sh"
EXAMPLE = REPO / "guest" / "example"
MIRROR = "http://deb.debian.org/debian"
BUILD_BUDGET_S = 600  # the small variant with the kernel: ~4 min on two busy shared cores, packages downloaded
SUMMARY = re.compile(r"^(?P<path>\S+): (?P<size>\d+) MiB \((?P<allocated>\d+) MiB allocated, (?P<files>\d+) MiB "
                     r"of files\), sha256 (?P<digest>[0-9a-f]{64})$")


@dataclass
class Built:
    path: Path
    seconds: float | None  # None: given by CONODE_DEBIAN_IMAGE, not built here
    summary: str


def _can_build() -> str | None:
    if os.geteuid() != 0:
        return "building the Debian image needs root (debootstrap chroots)"
    for tool in ("debootstrap", "mke2fs", "cpio"):
        if shutil.which(tool) is None:
            return f"building the Debian image needs {tool} (apt-get install debootstrap e2fsprogs cpio)"
    try:
        urllib.request.urlopen(f"{MIRROR}/dists/bookworm/Release", timeout=15).close()
    except OSError as exc:
        return f"Debian's archive is not reachable: {exc}"
    return None


@pytest.fixture(scope="module")
def debian_image(tmp_path_factory) -> Built:
    given = os.environ.get("CONODE_DEBIAN_IMAGE")
    if given:
        return Built(Path(given), None, "")
    reason = _can_build()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("debian")
    out = work / "debian-small.img"
    env = {**os.environ, "CONODE_IMAGE_BUILD": str(work / "build"),
           "CONODE_IMAGE_CACHE": str(cache_dir() / "debootstrap")}
    started = time.monotonic()
    built = subprocess.run([str(RECIPE), "--variant", "small", "--kernel", "--free", "128", str(out)], env=env,
                           capture_output=True, text=True, timeout=2 * BUILD_BUDGET_S)
    seconds = time.monotonic() - started
    assert built.returncode == 0, built.stderr[-3000:]
    shutil.rmtree(work / "build", ignore_errors=True)
    print(f"\nDebian image (small variant) built in {seconds:.0f} s: {built.stdout.strip()}", file=sys.stderr)
    return Built(out, seconds, built.stdout.strip())


def test_the_recipe_builds_the_small_image_in_minutes_and_states_its_size_and_digest(debian_image):
    if debian_image.seconds is None:
        pytest.skip("CONODE_DEBIAN_IMAGE names an image built beforehand")
    assert debian_image.seconds < BUILD_BUDGET_S
    summary = SUMMARY.match(debian_image.summary)
    assert summary, debian_image.summary
    image = debian_image.path
    assert Path(summary["path"]) == image and int(summary["size"]) << 20 == image.stat().st_size
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    assert summary["digest"] == digest
    assert (image.parent / f"{image.name}.sha256").read_text() == f"{digest}  {image.name}\n"
    buildinfo = (image.parent / f"{image.name}.buildinfo").read_text()
    assert re.search(r"^  python3 3\.11", buildinfo, re.M) and re.search(r"^  dash ", buildinfo, re.M)
    # The image's agent is the one conode ships in its initramfs, byte for byte.
    tree = image.parent / "initramfs"
    tree.mkdir()
    subprocess.run("gzip -dc " + str(packaged_image_dir() / "initramfs.cpio.gz") + " | cpio -id --quiet sbin/coagent",
                   shell=True, cwd=tree, check=True)
    in_image = subprocess.run(["debugfs", "-R", "cat /sbin/coagent", str(image)], capture_output=True).stdout
    assert in_image == (tree / "sbin" / "coagent").read_bytes()


def test_the_image_boots_with_conodes_kernel_into_debian(conode, debian_image):
    result = conode("vm", "run", "-q", "--disk", str(debian_image.path), "--disk-root", "--", "sh", "-c",
                    ". /etc/os-release; echo $ID $VERSION_ID; readlink /proc/1/exe; readlink /bin/sh; "
                    "df -P /job | tail -n 1 | cut -d ' ' -f 1", timeout=600)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().splitlines() == ["debian 12", "/run/conode/coagent", "dash", "/dev/vda"]


def test_a_python_script_with_its_data_file_runs_on_the_image_as_in_the_readme(debian_image, tmp_path):
    script, data = (EXAMPLE / "stats.py").read_bytes(), (EXAMPLE / "data.csv").read_bytes()
    for name in ("stats.py", "data.csv"):  # what the guest must print and write: the script run on the host
        shutil.copy(EXAMPLE / name, tmp_path / name)
    host = subprocess.run([sys.executable, "stats.py", "data.csv"], cwd=tmp_path, capture_output=True, check=True)
    expected_summary = (tmp_path / "summary.json").read_bytes()
    pristine = ready_snapshot(MachineConfig(disk=DiskConfig(debian_image.path, root=True)))
    ram = pristine.ram_image()
    try:
        result = run_job_restored(pristine, JobSpec.in_job_directory(
            1, ["python3", "stats.py", "data.csv"], {"stats.py": script, "data.csv": data}, ["summary.json"]), ram)
        assert result.failure is None and result.status == 0, (result.failure, bytes(result.stderr))
        lines = result.stdout.decode().splitlines()
        assert lines[:-1] == host.stdout.decode().splitlines()[:-1]  # the last line names Python's version
        assert re.fullmatch(r"python 3\.11\.\d+: 300 readings", lines[-1])
        assert result.outputs["summary.json"] == expected_summary
        assert json.loads(expected_summary)["Cork"]["n"] == 60
        # A second guest from the same snapshot: an uncaught exception is exit status 1 with its traceback.
        failing = run_job_restored(pristine, JobSpec.in_job_directory(
            2, ["python3", "stats.py", "missing.csv"], {"stats.py": script}, []), ram)
        assert failing.failure is None and failing.status == 1
        assert b"FileNotFoundError" in failing.stderr and b"missing.csv" in failing.stderr
    finally:
        ram.close()


def test_debians_own_kernel_and_initramfs_boot_the_image_from_its_disk_on_pci(debian_image):
    image = debian_image.path
    kernel, initrd = image.with_name(image.name + ".vmlinuz"), image.with_name(image.name + ".initrd")
    if not kernel.exists() or not initrd.exists():
        pytest.skip("the image was built without Debian's kernel (guest/mkimage-debian.sh --kernel)")
    # Debian's initramfs (udev) finds the disk on PCI, loads virtio_pci, virtio_blk and ext4 and mounts the
    # root; then conode's init from the image starts the agent, which speaks over COM2 (no virtio console yet).
    config = MachineConfig(disk=DiskConfig(image), cmdline_extra="root=/dev/vda rw init=/sbin/conode-init")
    result = run_job_in_guest(["sh", "-c", "uname -r; grep ' / ' /proc/mounts | cut -d ' ' -f 1,2; "
                                           "readlink -f /sys/block/vda/device/driver; "
                                           "readlink -f /sys/block/vda | grep -o '/pci0000:00/'; "
                                           "python3 -c 'print(6 * 7)' > answer"],
                              outputs=["answer"], kernel=kernel, initrd=initrd, config=config)
    release, root, driver, bus = result.stdout.decode().splitlines()
    assert release.endswith("-686"), release
    assert root == "/dev/vda /" and driver.endswith("/virtio_blk") and bus == "/pci0000:00/"
    assert result.outputs["answer"] == b"42\n"


def test_the_readme_example_runs_on_the_image_through_the_pool(debian_image, tmp_path):
    """The README's pool example as a user runs it: the image added to a real coordinator, a real agent fetching
    it, the script and its data file sent as inputs and the summary fetched back."""
    from tests.integration.pool import Pool

    for name in ("stats.py", "data.csv"):
        shutil.copy(EXAMPLE / name, tmp_path / name)
    host = subprocess.run([sys.executable, "stats.py", "data.csv"], cwd=tmp_path, capture_output=True, check=True)
    pool = Pool(tmp_path / "pool")
    try:
        pool.start_coordinator()
        pool.add_agent("desk", "--owner", "away")
        pool.wait_until("a ready node", lambda: len(pool.ready_nodes()) == 1, timeout=180)
        pool.cli("image", "add", "debian", str(debian_image.path), timeout=600)
        job = int(pool.cli("submit", "--image", "debian", "--input", str(tmp_path / "stats.py"), "--input",
                           str(tmp_path / "data.csv"), "--output", "summary.json", "--",
                           "python3", "stats.py", "data.csv").stdout.strip())
        waited = pool.cli("wait", str(job), "--timeout", "600", check=False, timeout=660)
        assert waited.returncode == 0, (waited.stderr, pool.cli("logs", str(job), check=False).stderr)
        lines = pool.cli("logs", str(job)).stdout.decode().splitlines()
        assert lines[:-1] == host.stdout.decode().splitlines()[:-1]  # the last line names Python's version
        fetched = tmp_path / "fetched"
        pool.cli("fetch", str(job), str(fetched))
        assert (fetched / "summary.json").read_bytes() == (tmp_path / "summary.json").read_bytes()
    finally:
        pool.close()
