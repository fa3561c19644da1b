#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""cobd, the guest's disk: conode (fast and stock engines) vs qemu-system-i386 with virtio-blk on the same image.

In the guest, on /dev/vda — a raw image of random bytes, no file system — : sequential read and write (dd of
64 MiB in 1 MiB blocks with O_DIRECT, the write ending with an fsync, each write to fresh blocks), and 4 KiB
random reads (randread.c: a static i386 program without a C library, O_DIRECT reads at random 4 KiB-aligned
offsets over the whole image), each timed between marker lines on the host, median of 3.

conode gives the guest the image as a copy-on-write disk (a temporary overlay; the image is never written).
qemu runs the same kernel and initramfs on its microvm machine, which has virtio-mmio transports — the
transport conode's guests use — with ``virtio-blk-device`` on the image opened with ``snapshot=on``: its writes
go to a temporary qcow2 overlay, copy-on-write as well. The kernel learns of qemu's transports from
``virtio_mmio.device=`` entries on its command line; the CPU has no local APIC (``-cpu qemu32,-apic``), so the
8259 delivers the timer as on conode's machine. randread reaches both guests in a cpio archive appended to
the packaged initramfs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import common
from common import Row, Target

SOURCE = Path(__file__).resolve().parent / "randread.c"
REPS = 3
QEMU_MMIO_BASE, QEMU_MMIO_SIZE, QEMU_MMIO_IRQ, QEMU_MMIO_SLOTS = 0xFEB00000, 0x200, 5, 8  # microvm, ioapic2=off


class AtLeast(Target):
    """A throughput goal: each engine's figure ≥ its limit (a multiple of qemu's figure)."""

    def met(self, row: Row) -> dict[str, bool]:
        verdicts = {}
        for engine, factor in self.limits.items():
            value = row.conode.get(engine)
            if isinstance(value, (int, float)) and isinstance(row.qemu, (int, float)) and row.qemu:
                verdicts[engine] = value >= factor * row.qemu
        return verdicts


TARGETS = {"seqread": AtLeast("≥ qemu", {engine: 1.0 for engine in common.ENGINES}, relative=True),
           "seqwrite": AtLeast("≥ qemu", {engine: 1.0 for engine in common.ENGINES}, relative=True),
           "randread": AtLeast("≥ 0.5 × qemu", {engine: 0.5 for engine in common.ENGINES}, relative=True)}


# --- what the guests get ---------------------------------------------------------------------------------------
def build_randread(directory: Path) -> Path:
    out = directory / "randread"
    gcc = shutil.which("gcc")
    if gcc is None:
        raise common.BenchmarkError("gcc with 32-bit support is needed to build randread (Debian: gcc-multilib)")
    result = subprocess.run([gcc, "-m32", "-static", "-nostdlib", "-ffreestanding", "-fno-pie", "-no-pie",
                             "-fno-stack-protector", "-Os", "-o", str(out), str(SOURCE)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise common.BenchmarkError(f"cannot build the i386 randread (Debian: gcc-multilib): {result.stderr[-300:]}")
    return out


def _newc(name: str, mode: int, data: bytes, ino: int) -> bytes:
    """One entry of a newc cpio archive."""
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0)
    header = b"070701" + b"".join(b"%08X" % value for value in fields) + name.encode() + b"\0"
    header += bytes(-len(header) % 4)
    return header + data + bytes(-len(data) % 4)


def initramfs_with(program: Path, directory: Path) -> Path:
    """The packaged initramfs with /bin/randread added (a second, uncompressed archive after the first)."""
    _, initrd = common.image_paths()
    packed = initrd.read_bytes()
    packed += bytes(-len(packed) % 4)
    packed += _newc("bin/randread", 0o100755, program.read_bytes(), 900001) + _newc("TRAILER!!!", 0, b"", 0)
    out = directory / "initramfs-randread.cpio"
    out.write_bytes(packed)
    return out


def digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def make_image(path: Path, mib: int) -> None:
    with open(path, "wb") as out:
        for _ in range(mib):
            out.write(os.urandom(1 << 20))


# --- the work -----------------------------------------------------------------------------------------------
def sizes(quick: bool) -> tuple[int, int]:
    """(MiB per sequential transfer, random reads per run)."""
    return (16, 500) if quick else (64, 2000)


def steps(mib: int, reads: int, image_mib: int) -> list[tuple[str, str]]:
    out = []
    for rep in range(REPS):
        out.append((f"seqread.{rep}", f"dd if=/dev/vda of=/dev/null bs=1M count={mib} skip={mib * rep} "
                                      f"iflag=direct 2>/dev/null"))
        out.append((f"seqwrite.{rep}", f"dd if=/dev/zero of=/dev/vda bs=1M count={mib} seek={mib * rep} "
                                       f"oflag=direct conv=fsync 2>/dev/null"))
        out.append((f"randread.{rep}", f"/bin/randread /dev/vda {reads} {image_mib} {rep + 1}"))
    return out


# --- conode, in a child process per engine ------------------------------------------------------------------
def child(argv: list[str]) -> int:
    from conode.vm.disk.config import DiskConfig
    from conode.vm.guest_image import load_guest_image
    from conode.vm.machine import MachineConfig
    from conode.vm.session import GuestSession

    image, initrd, script = Path(argv[0]), Path(argv[1]), argv[2]
    stream = common.MarkerStream(announce=common.conode_label())
    errors = common.MarkerStream()
    config = MachineConfig(mem_mib=common.DEFAULT_MEM_MIB, disk=DiskConfig(image))
    session = GuestSession.boot(load_guest_image(None, initrd), config, stream, errors,
                                lambda line: common.progress(f"{common.conode_label()}: {line}"))
    session.start(["sh", "-c", script])
    try:
        status = session.run(timeout_s=3600)
    finally:
        session.machine.close()
    if status != 0:
        raise common.BenchmarkError(f"the conode guest command exited with status {status}; "
                                    f"stderr tail: {errors.tail()!r}")
    return common.child_emit({"stream": stream.to_json()})


def run_conode(engine: str, image: Path, initrd: Path, script: str) -> common.MarkerStream:
    _, result = common.run_child(Path(__file__), [str(image), str(initrd), script], engine=engine,
                                 timeout_s=3600)
    return common.MarkerStream.from_json(result["stream"])


# --- qemu ------------------------------------------------------------------------------------------------------
def run_qemu(qemu: str, image: Path, initrd: Path, work: list[tuple[str, str]]) -> common.MarkerStream:
    slots = " ".join(f"virtio_mmio.device={QEMU_MMIO_SIZE}@{QEMU_MMIO_BASE + i * QEMU_MMIO_SIZE:#x}:"
                     f"{QEMU_MMIO_IRQ + i}" for i in range(QEMU_MMIO_SLOTS))
    guest = common.QemuGuest(qemu)
    kernel, _ = common.image_paths()
    guest.argv = [qemu, "-machine", "microvm,pic=on,pit=on,rtc=on,isa-serial=on,ioapic2=off,acpi=off", "-accel", "tcg",
                  "-cpu", "qemu32,-apic", "-m", str(common.DEFAULT_MEM_MIB), "-nographic", "-no-reboot",
                  "-nodefaults", "-serial", "stdio", "-kernel", str(kernel), "-initrd", str(initrd),
                  "-append", f"{common.qemu_append()} {slots}",
                  "-drive", f"id=vda,file={image},format=raw,if=none,snapshot=on,cache=writeback",
                  "-device", "virtio-blk-device,drive=vda"]
    with guest:
        guest.launch()
        guest.wait_prompt(300)
        for name, command in work:
            guest.run_marked(name, command)
        return guest.out


# --- the table ---------------------------------------------------------------------------------------------------
def figures(streams: dict[str, common.MarkerStream], name: str, per_run: float) -> dict[str, common.Value]:
    """per_run / the median time of *name* in every place (a rate), or why a place has none."""
    out: dict[str, common.Value] = {}
    for place in common.PLACES:
        if place in streams:
            out[place] = per_run / common.median([streams[place].span(f"{name}.{rep}") for rep in range(REPS)])
        else:
            out[place] = common.place_cell(place) if place != "native" else None
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1:])
    args = common.parser(__doc__).parse_args(argv)
    qemu = common.find_qemu()
    if qemu is None:
        common.progress("qemu-system-i386 not found: conode's figures only")
    mib, reads = sizes(args.quick)
    image_mib = mib * (REPS + 1)
    streams: dict[str, common.MarkerStream] = {}
    with tempfile.TemporaryDirectory(prefix="conode-disk-bench-") as scratch:
        directory = Path(scratch)
        initrd = initramfs_with(build_randread(directory), directory)
        image = directory / "disk.img"
        common.progress(f"making a {image_mib} MiB image of random bytes")
        make_image(image, image_mib)
        work = steps(mib, reads, image_mib)
        script = common.as_script(work)
        before = digest(image)
        for engine in common.conode_engines():
            common.progress(f"conode {engine}: booting in a child process")
            streams[engine] = run_conode(engine, image, initrd, script)
        if qemu is not None:
            common.progress("qemu: booting (microvm, virtio-blk-device)")
            streams["qemu"] = run_qemu(qemu, image, initrd, work)
        if digest(image) != before:
            raise common.BenchmarkError("the disk image changed: a guest wrote to its base image")
    for place, stream in streams.items():
        outputs = [stream.between(f"randread.{rep}").strip() for rep in range(REPS)]
        if outputs != [f"ok {reads}"] * REPS:
            raise common.BenchmarkError(f"randread in {common.place_label(place)} said {outputs!r}")
    rows = [
        Row.across(f"sequential read, {mib} MiB (bs=1M, O_DIRECT)", "MiB/s", figures(streams, "seqread", mib),
                   TARGETS["seqread"]),
        Row.across(f"sequential write, {mib} MiB (bs=1M, O_DIRECT, fsync)", "MiB/s",
                   figures(streams, "seqwrite", mib), TARGETS["seqwrite"]),
        Row.across(f"random 4 KiB reads ({reads}, O_DIRECT)", "IOPS", figures(streams, "randread", reads),
                   TARGETS["randread"]),
    ]
    notes = [f"median of {REPS} runs, host wall time between markers, boot excluded; each conode engine in its own "
             f"process; rates: higher is better (the ratio column is conode/qemu: above 1, conode is faster)",
             f"the image: {image_mib} MiB of random bytes; conode's copy-on-write overlay and qemu's snapshot=on "
             f"qcow2 overlay are temporary files on the host's {tempfile.gettempdir()}",
             "qemu: -M microvm with virtio-blk-device (virtio-mmio, as conode), -cpu qemu32,-apic, TCG; "
             "no native column: the host's disk is not the guest's"]
    title = f"cobd: the guest's disk ({'quick' if args.quick else 'full'} sizes)"
    refs = common.References(qemu, "not used")  # no native column: busybox is not needed
    return common.report("disk", title, args, rows, notes, refs,
                         extra={"mib": mib, "random_reads": reads, "repetitions": REPS})


if __name__ == "__main__":
    common.run_main(main)
