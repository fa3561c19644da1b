"""Build small static i386 programs and run them in a real guest and natively, for byte-for-byte comparisons."""

from __future__ import annotations

import platform
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conode.vm.cpu.unicorn_cpu import RamImage
from conode.vm.guest import Guest, GuestSnapshot, JobSpec
from conode.vm.guest_image import load_guest_image
from conode.vm.machine import MachineConfig


def build_static_i386(source: Path, out: Path, *flags: str, optimise: str = "-O1") -> Path:
    """``gcc -m32 -static``; skip the test (with the reason) where this host cannot build or run i386 programs."""
    if platform.machine() not in ("x86_64", "i386", "i686", "AMD64"):
        pytest.skip(f"the host is {platform.machine()}, not x86: no hardware to compare with")
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("needs gcc with 32-bit support (Debian: gcc-multilib)")
    result = subprocess.run([gcc, "-m32", "-static", optimise, "-o", str(out), str(source), *flags],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot build static i386 programs here (Debian: gcc-multilib): {result.stderr[-300:]}")
    return out


def run_natively(program: Path, *args: str) -> bytes:
    """The program on the host CPU; skip where the host kernel cannot run i386 binaries."""
    try:
        result = subprocess.run([str(program), *args], capture_output=True, timeout=120)
    except OSError as exc:
        pytest.skip(f"this host cannot run i386 programs: {exc}")
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


@dataclass
class JobResult:
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    outputs: dict[str, bytes] = field(default_factory=dict)
    status: int | None = None
    missing: list[str] = field(default_factory=list)
    failure: str | None = None
    channel: int = 0  # the host channel's transport the in-guest agent chose (conode.vm.host_channel)

    # JobSink
    def output(self, job: int, stream: str, data: bytes) -> None:
        (self.stdout if stream == "stdout" else self.stderr).extend(data)

    def finished(self, job: int, status: int, outputs: dict[str, bytes], missing: list[str],
                 runtime_s: float) -> None:
        self.status, self.outputs, self.missing = status, outputs, missing

    def failed(self, job: int, reason: str) -> None:
        self.failure = reason


def run_job_in_guest(argv: list[str], inputs: dict[str, bytes] | None = None, outputs: list[str] | None = None,
                     kernel: Path | None = None, initrd: Path | None = None,
                     config: MachineConfig | None = None) -> JobResult:
    """*argv* as a job in a freshly booted guest (conode's kernel and initramfs, or *kernel* and *initrd*) on the
    engine this process runs, its job directory holding *inputs*; it must succeed."""
    guest = Guest.boot(load_guest_image(kernel, initrd), config or MachineConfig())
    result = JobResult()
    spec = JobSpec.in_job_directory(1, argv, inputs or {}, outputs or [])
    guest.on_ready = lambda name: guest.start_job(spec, result)
    try:
        guest.run()
    finally:
        guest.machine.close()
    result.channel = guest.machine.channel.live
    assert result.failure is None, result.failure
    assert result.status == 0, (result.status, bytes(result.stderr))
    assert not result.missing, result.missing
    return result


def run_in_guest(program: Path, *args: str) -> bytes:
    """The program in a freshly booted guest; its stdout."""
    return bytes(run_job_in_guest(["sh", "-c", 'chmod +x prog && exec ./prog "$@"', "prog", *args],
                                  {"prog": program.read_bytes()}).stdout)


def ready_snapshot(config: MachineConfig, timeout_s: float = 120) -> GuestSnapshot:
    """The post-boot snapshot of a guest of *config* (conode's kernel and initramfs), taken when its agent is
    ready, as a worker takes its pristine snapshot."""
    guest = Guest.boot(load_guest_image(), config)
    guest.on_ready = lambda name: guest.machine.pause()
    deadline = time.monotonic() + timeout_s
    try:
        while not guest.agent.ready and guest.failure is None and time.monotonic() < deadline:
            guest.run()
        assert guest.agent.ready, guest.failure or f"not ready within {timeout_s:g} s"
        return guest.snapshot()
    finally:
        guest.machine.close()


def run_job_restored(snapshot: GuestSnapshot, spec: JobSpec, ram: RamImage | None = None,
                     timeout_s: float = 300) -> JobResult:
    """*spec* in a fresh guest restored from *snapshot* (mapping *ram* if given); its results, whatever they are."""
    guest = Guest.restore(snapshot, new_identity=True, ram_image=ram)
    result = JobResult()
    guest.start_job(spec, result)

    def to_the_end() -> None:
        while not guest.finished:
            guest.run()

    runner = threading.Thread(target=to_the_end, daemon=True)
    runner.start()
    runner.join(timeout_s)
    if runner.is_alive():
        guest.fail(f"the job did not end within {timeout_s:g} s")
        runner.join(10)
    guest.machine.close()
    return result
