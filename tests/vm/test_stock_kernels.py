"""Kernels conode did not build: Debian 12's own i386 kernels (686 and 686-pae) boot with conode's initramfs
and run jobs, inputs and outputs included. They have no virtio console built in, so the in-guest agent speaks
over COM2; everything else is the same PC.

The kernels come from Debian's archive (``apt-get download``, cached); without the i386 architecture or the
archive the test is skipped with the reason.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from guest_programs import run_job_in_guest

from conode.cache import cache_dir

pytestmark = pytest.mark.guest

FLAVOURS = ("686", "686-pae")


def _newest_package(flavour: str) -> str | None:
    found = subprocess.run(["apt-cache", "search", "--names-only", rf"^linux-image-6\.1\.0-[0-9]+-{flavour}$"],
                           capture_output=True, text=True).stdout.split("\n")
    names = sorted((line.split()[0] for line in found if line.strip()),
                   key=lambda name: int(name.split("-")[3]))
    return names[-1] if names else None


def debian_kernel(flavour: str) -> Path:
    if shutil.which("apt-get") is None:
        pytest.skip("needs Debian's apt-get to fetch Debian's kernels")
    package = _newest_package(flavour)
    if package is None:
        pytest.skip(f"no linux-image-*-{flavour} known to apt: run `dpkg --add-architecture i386 && apt-get update`")
    directory = cache_dir() / "debian-kernels" / package
    kernel = directory / f"vmlinuz-{package.removeprefix('linux-image-')}"
    if not kernel.exists():
        directory.mkdir(parents=True, exist_ok=True)
        fetched = subprocess.run(["apt-get", "download", f"{package}:i386"], cwd=directory, capture_output=True,
                                 text=True, timeout=600)
        debs = list(directory.glob("*.deb"))
        if fetched.returncode != 0 or not debs:
            pytest.skip(f"cannot download {package} from Debian: {fetched.stderr.strip()[-300:]}")
        unpacked = subprocess.run(f"dpkg-deb --fsys-tarfile {debs[0]} | tar -x -C {directory} --wildcards "
                                  "'./boot/vmlinuz-*'", shell=True, capture_output=True, text=True)
        assert unpacked.returncode == 0, unpacked.stderr
        (directory / "boot" / kernel.name).rename(kernel)
        debs[0].unlink()
    return kernel


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_debian_kernel_runs_a_job_with_files(flavour, tmp_path):
    kernel = debian_kernel(flavour)
    data = bytes(range(256)) * 1000
    result = run_job_in_guest(["sh", "-c", "uname -r; sha256sum data | cut -d' ' -f1; tr a-z A-Z < note > loud"],
                              {"data": data, "note": b"stock kernel\n"}, ["loud"], kernel=kernel)
    release, digest = result.stdout.decode().splitlines()
    loud = result.outputs["loud"].decode().strip()
    assert release == kernel.name.removeprefix("vmlinuz-") and release.endswith(flavour)
    assert digest == hashlib.sha256(data).hexdigest()
    assert loud == "STOCK KERNEL"
