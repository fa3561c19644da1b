"""Kernels conode did not build: Debian 12's own i386 kernels (686 and 686-pae) boot with conode's initramfs
and run jobs, inputs and outputs included. They have no virtio console built in, so the in-guest agent speaks
over COM2; everything else is the same PC. With their own virtio modules (from the same package, in a second
initramfs archive appended to conode's, loaded before the agent starts) they find conode's virtio console on
the PCI bus, drive it with their own virtio_pci and virtio_console drivers, and the agent speaks over hvc0.

The kernels come from Debian's archive (``apt-get download``, cached); without the i386 architecture or the
archive the test is skipped with the reason.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from guest_programs import JobResult, run_job_in_guest

from conode.cache import cache_dir
from conode.vm import layout
from conode.vm.guest import Guest, GuestSnapshot, JobSpec
from conode.vm.guest_image import load_guest_image
from conode.vm.host_channel import VIRTIO
from conode.vm.machine import MachineConfig

pytestmark = pytest.mark.guest

FLAVOURS = ("686", "686-pae")
# The modules that drive a virtio console on PCI, in the order insmod needs them (their dependencies first).
VIRTIO_MODULES = ("drivers/virtio/virtio_ring", "drivers/virtio/virtio", "drivers/virtio/virtio_pci_modern_dev",
                  "drivers/virtio/virtio_pci_legacy_dev", "drivers/virtio/virtio_pci", "drivers/char/virtio_console")


def _newest_package(flavour: str) -> str | None:
    found = subprocess.run(["apt-cache", "search", "--names-only", rf"^linux-image-6\.1\.0-[0-9]+-{flavour}$"],
                           capture_output=True, text=True).stdout.split("\n")
    names = sorted((line.split()[0] for line in found if line.strip()),
                   key=lambda name: int(name.split("-")[3]))
    return names[-1] if names else None


def debian_kernel(flavour: str) -> Path:
    """The flavour's newest kernel, with its virtio modules beside it in ``modules/`` (fetched once)."""
    if shutil.which("apt-get") is None:
        pytest.skip("needs Debian's apt-get to fetch Debian's kernels")
    package = _newest_package(flavour)
    if package is None:
        pytest.skip(f"no linux-image-*-{flavour} known to apt: run `dpkg --add-architecture i386 && apt-get update`")
    directory = cache_dir() / "debian-kernels" / package
    release = package.removeprefix("linux-image-")
    kernel = directory / f"vmlinuz-{release}"
    modules = [directory / "modules" / f"{Path(name).name}.ko" for name in VIRTIO_MODULES]
    if not kernel.exists() or not all(module.exists() for module in modules):
        directory.mkdir(parents=True, exist_ok=True)
        fetched = subprocess.run(["apt-get", "download", f"{package}:i386"], cwd=directory, capture_output=True,
                                 text=True, timeout=600)
        debs = list(directory.glob("*.deb"))
        if fetched.returncode != 0 or not debs:
            pytest.skip(f"cannot download {package} from Debian: {fetched.stderr.strip()[-300:]}")
        wanted = [f"./boot/{kernel.name}"] + [f"./lib/modules/{release}/kernel/{name}.ko" for name in VIRTIO_MODULES]
        unpacked = subprocess.run(f"dpkg-deb --fsys-tarfile {debs[0]} | tar -x -C {directory} " + " ".join(wanted),
                                  shell=True, capture_output=True, text=True)
        assert unpacked.returncode == 0, unpacked.stderr
        (directory / "boot" / kernel.name).rename(kernel)
        (directory / "modules").mkdir(exist_ok=True)
        for name, module in zip(VIRTIO_MODULES, modules):
            (directory / "lib" / "modules" / release / "kernel" / f"{name}.ko").rename(module)
        shutil.rmtree(directory / "lib")
        shutil.rmtree(directory / "boot")
        debs[0].unlink()
    return kernel


def newc_archive(files: dict[str, tuple[int, bytes]]) -> bytes:
    """A cpio archive in the "newc" format the kernel unpacks into its initramfs: path -> (mode, content)."""
    archive = bytearray()
    for inode, (path, (mode, data)) in enumerate([*files.items(), ("TRAILER!!!", (0, b""))], start=1):
        name = path.encode() + b"\0"
        fields = (inode, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name), 0)
        archive += b"070701" + "".join(f"{field:08X}" for field in fields).encode() + name
        archive += bytes(-len(archive) % 4) + data + bytes(-len(data) % 4)
    return bytes(archive)


def initrd_with_virtio_modules(kernel: Path, into: Path) -> Path:
    """conode's initramfs followed by a second archive holding the kernel's virtio modules and /pci-init, which
    loads them and then runs conode's /init (the kernel unpacks concatenated archives in turn; each starts on a
    four-byte boundary)."""
    modules = kernel.parent / "modules"
    names = [Path(name).name for name in VIRTIO_MODULES]
    script = "#!/bin/sh\n" + "".join(f"insmod /pci-modules/{name}.ko\n" for name in names) + "exec /init\n"
    files = {"pci-modules": (0o040755, b""), "pci-init": (0o100755, script.encode())}
    files.update({f"pci-modules/{name}.ko": (0o100644, (modules / f"{name}.ko").read_bytes()) for name in names})
    base = load_guest_image().initrd
    into.write_bytes(base + bytes(-len(base) % 4) + newc_archive(files))
    return into


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


def boot_and_snapshot(kernel: Path, initrd: Path, config: MachineConfig) -> GuestSnapshot:
    """Boot until the in-guest agent is ready, then take the guest's snapshot."""
    guest = Guest.boot(load_guest_image(kernel, initrd), config)
    guest.on_ready = lambda name: guest.machine.pause()
    try:
        guest.run()
        assert guest.agent.ready, guest.failure
        return guest.snapshot()
    finally:
        guest.machine.close()


def run_restored(snapshot: GuestSnapshot, argv: list[str], inputs: dict[str, bytes]) -> JobResult:
    result = JobResult()
    guest = Guest.restore(snapshot, new_identity=True)
    guest.start_job(JobSpec.in_job_directory(1, argv, inputs, []), result)
    try:
        guest.run()
    finally:
        guest.machine.close()
    result.channel = guest.machine.channel.live
    assert result.failure is None and result.status == 0, (result.failure, bytes(result.stderr))
    return result


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_debian_kernel_drives_conodes_virtio_console_over_pci(flavour, tmp_path):
    kernel = debian_kernel(flavour)
    initrd = initrd_with_virtio_modules(kernel, tmp_path / "initrd")
    data = bytes(range(256)) * 4000
    device = f"/sys/bus/pci/devices/0000:00:{layout.virtio_pci_device(0):02x}.0"
    script = (f"cat {device}/vendor {device}/device {device}/irq; ls /sys/bus/virtio/drivers/virtio_console; "
              "readlink /sys/bus/virtio/devices/virtio0/driver; grep -c virtio0 /proc/interrupts; "
              "sha256sum data | cut -d' ' -f1")
    # Booted, then saved and restored in a new machine: the PCI state (BAR, command, INTx) comes back with it.
    snapshot = boot_and_snapshot(kernel, initrd, MachineConfig(cmdline_extra="rdinit=/pci-init"))
    result = run_restored(snapshot, ["sh", "-c", script], {"data": data})
    vendor, device_id, irq, *lines = result.stdout.decode().split()
    assert (vendor, device_id, int(irq)) == ("0x1af4", "0x1043", layout.VIRTIO_PCI_IRQS[0])
    assert "virtio0" in lines and lines[-3].endswith("/virtio_console") and lines[-2] == "1"
    assert lines[-1] == hashlib.sha256(data).hexdigest()
    assert result.channel == VIRTIO  # the in-guest agent found hvc0: the job and its file went over virtio-pci
