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

The Debian image (``--debian IMAGE``, built by guest/mkimage-debian.sh; default ``$CONODE_DEBIAN_IMAGE``): the
time from the start of the boot to a ready guest — conode: to the in-guest agent's READY, in a fresh process per
boot; qemu: from its launch to the first prompt of Debian's shell on the serial port (the same kernel and
initramfs, the image as the root disk through ``conode.root=/dev/vda``, a virtio console so that the agent
finds its channel at once and starts the shell without waiting) — and a Python workload in it: the
interpreter's start (``python3 -c pass``) and a short computation, each timed between markers, median of the
boots.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
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
def conode_session(image: Path, root: bool, initrd: Path | None, script: str) -> tuple[common.MarkerStream, float]:
    """Boot conode with *image* as its disk (its root with *root*) and the packaged kernel (and *initrd*, or the
    packaged initramfs), run ``sh -c script``; (its stdout, seconds from the boot's start to the agent's READY)."""
    from conode.vm.disk.config import DiskConfig
    from conode.vm.guest_image import load_guest_image
    from conode.vm.machine import MachineConfig
    from conode.vm.session import GuestSession

    stream = common.MarkerStream(announce=common.conode_label())
    errors = common.MarkerStream()
    config = MachineConfig(mem_mib=common.DEFAULT_MEM_MIB, disk=DiskConfig(image, root=root))
    guest_image = load_guest_image(None, initrd)
    started = time.monotonic()
    session = GuestSession.boot(guest_image, config, stream, errors,
                                lambda line: common.progress(f"{common.conode_label()}: {line}"))
    session.start(["sh", "-c", script])
    try:
        status = session.run(timeout_s=3600)
    finally:
        session.machine.close()
    if status != 0 or session.ready_at is None:
        raise common.BenchmarkError(f"the conode guest command exited with status {status}; "
                                    f"stderr tail: {errors.tail()!r}")
    return stream, session.ready_at - started


def child(argv: list[str]) -> int:
    stream, _ = conode_session(Path(argv[0]), False, Path(argv[1]), argv[2])
    return common.child_emit({"stream": stream.to_json()})


def run_conode(engine: str, image: Path, initrd: Path, script: str) -> common.MarkerStream:
    _, result = common.run_child(Path(__file__), [str(image), str(initrd), script], engine=engine,
                                 timeout_s=3600)
    return common.MarkerStream.from_json(result["stream"])


# --- qemu ------------------------------------------------------------------------------------------------------
def qemu_microvm(qemu: str, image: Path, initrd: Path, append: str = "",
                 devices: tuple[str, ...] = ()) -> common.QemuGuest:
    """qemu's microvm with the packaged kernel, *initrd* and *image* on virtio-blk-device (not yet launched)."""
    slots = " ".join(f"virtio_mmio.device={QEMU_MMIO_SIZE}@{QEMU_MMIO_BASE + i * QEMU_MMIO_SIZE:#x}:"
                     f"{QEMU_MMIO_IRQ + i}" for i in range(QEMU_MMIO_SLOTS))
    guest = common.QemuGuest(qemu, initrd=initrd)
    kernel, _ = common.image_paths()
    guest.argv = [qemu, "-machine", "microvm,pic=on,pit=on,rtc=on,isa-serial=on,ioapic2=off,acpi=off", "-accel", "tcg",
                  "-cpu", "qemu32,-apic", "-m", str(common.DEFAULT_MEM_MIB), "-nographic", "-no-reboot",
                  "-nodefaults", "-serial", "stdio", "-kernel", str(kernel), "-initrd", guest.initrd.name,
                  "-append", " ".join(part for part in (common.qemu_append(), append, slots) if part),
                  "-drive", f"id=vda,file={image},format=raw,if=none,snapshot=on,cache=writeback",
                  "-device", "virtio-blk-device,drive=vda", *devices]
    return guest


def run_qemu(qemu: str, image: Path, initrd: Path, work: list[tuple[str, str]]) -> common.MarkerStream:
    with qemu_microvm(qemu, image, initrd) as guest:
        guest.launch()
        guest.wait_prompt(300)
        for name, command in work:
            guest.run_marked(name, command)
        return guest.out


# --- the Debian image ------------------------------------------------------------------------------------------
PYTHON_WORK = [
    ("python.start", "python3 -c pass"),
    ("python.compute", "python3 -c 'import json, statistics; d = [(i * 7919) % 1000 / 10 for i in range(30000)]; "
                       "print(round(statistics.fmean(d), 3), len(json.dumps(d)))'"),
]
PYTHON_EXPECTED = "49.95 177000"  # what python.compute prints
DEBIAN_PROMPT = b"# "  # dash's prompt for root


def debian_child(argv: list[str]) -> int:
    """One boot of the Debian image in this fresh process: seconds to READY, then the Python work."""
    stream, ready_s = conode_session(Path(argv[0]), True, None, argv[1])
    return common.child_emit({"ready_s": ready_s, "stream": stream.to_json()})


def qemu_debian(qemu: str, image: Path) -> tuple[float, common.MarkerStream]:
    """One qemu boot of the Debian image: (seconds from launch to the shell's prompt, the Python work's stream)."""
    _, initrd = common.image_paths()
    console = ("-device", "virtio-serial-device", "-chardev", "null,id=hvc", "-device", "virtconsole,chardev=hvc")
    with qemu_microvm(qemu, image, initrd, "conode.root=/dev/vda", console) as guest:
        guest.prompt = DEBIAN_PROMPT
        launched = guest.launch()
        guest.wait_for_bytes(b"conode: root file system: /dev/vda", 300)  # the prompt after the switch counts
        ready = guest.wait_prompt(300)
        for name, command in PYTHON_WORK:
            guest.run_marked(name, command)
        return ready - launched, guest.out


def debian_rows(image: Path | None, qemu: str | None, quick: bool) -> tuple[list[Row], list[str]]:
    """The Debian image's rows: boot to ready, Python's start and a computation."""
    metrics = [("Debian image: boot to a ready guest (qemu: to the shell prompt)", "s", "ready"),
               ("Debian image: python3 -c pass", "s", "python.start"),
               ("Debian image: python3, 30k floats through statistics and json", "s", "python.compute")]
    if image is None:
        cell = "no image: --debian IMAGE (guest/mkimage-debian.sh)"
        return [Row(metric, unit, {engine: cell for engine in common.ENGINES}, cell) for metric, unit, _ in metrics], []
    boots = 1 if quick else 3
    script = common.as_script(PYTHON_WORK)
    times: dict[str, dict[str, list[float]]] = {}
    for rep in range(boots):  # the places alternate, so a slow spell of the host does not fall on one only
        for engine in common.conode_engines():
            common.progress(f"conode {engine}: Debian image boot {rep + 1}/{boots} (fresh process)")
            _, result = common.run_child(Path(__file__), ["--debian", str(image), script], engine=engine,
                                         timeout_s=3600)
            stream = common.MarkerStream.from_json(result["stream"])
            _check_python(stream, engine)
            spans = times.setdefault(engine, {})
            spans.setdefault("ready", []).append(result["ready_s"])
            for name, _ in PYTHON_WORK:
                spans.setdefault(name, []).append(stream.span(name))
        if qemu is not None:
            common.progress(f"qemu: Debian image boot {rep + 1}/{boots}")
            ready, stream = qemu_debian(qemu, image)
            _check_python(stream, "qemu")
            spans = times.setdefault("qemu", {})
            spans.setdefault("ready", []).append(ready)
            for name, _ in PYTHON_WORK:
                spans.setdefault(name, []).append(stream.span(name))
    rows = []
    for metric, unit, key in metrics:
        cells: dict[str, common.Value] = {}
        for place in common.PLACES:
            if place in times:
                cells[place] = common.median(times[place][key])
            else:
                cells[place] = common.place_cell(place) if place != "native" else None
        target = common.Target.at_most("≤ qemu", 1.0, relative=True) if key == "ready" else ""
        rows.append(Row.across(metric, unit, cells, target))
    notes = [f"Debian image {image.name} ({image.stat().st_size >> 20} MiB): median of {boots} boots; conode from "
             f"the start of the boot in a fresh process to the agent's READY, qemu from its launch to dash's "
             f"first prompt; the Python rows between markers, the interpreter's start included; these rows are "
             f"times: a ratio below 1 means conode is faster",
             "conode stock has no FPU (conode/vm/cpu/cpuid.py): Python's floats go through the kernel's x87 "
             "emulator there"]
    return rows, notes


def _check_python(stream: common.MarkerStream, place: str) -> None:
    said = stream.between("python.compute").strip()
    if said != PYTHON_EXPECTED:
        raise common.BenchmarkError(f"the Python workload in {common.place_label(place)} said {said!r}, "
                                    f"not {PYTHON_EXPECTED!r}")


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
        if argv[1:2] == ["--debian"]:
            return debian_child(argv[2:])
        return child(argv[1:])
    parser = common.parser(__doc__)
    parser.add_argument("--debian", metavar="IMAGE", type=Path, default=os.environ.get("CONODE_DEBIAN_IMAGE"),
                        help="a Debian image built by guest/mkimage-debian.sh: also time its boot and Python in it "
                             "(default: $CONODE_DEBIAN_IMAGE)")
    args = parser.parse_args(argv)
    if args.debian is not None and not Path(args.debian).is_file():
        raise common.BenchmarkError(f"--debian {args.debian}: no such image; build one with guest/mkimage-debian.sh")
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
    debian, debian_notes = debian_rows(Path(args.debian) if args.debian else None, qemu, args.quick)
    rows += debian
    notes = [f"median of {REPS} runs, host wall time between markers, boot excluded; each conode engine in its own "
             f"process; rates: higher is better (the ratio column is conode/qemu: above 1, conode is faster)",
             f"the image: {image_mib} MiB of random bytes; conode's copy-on-write overlay and qemu's snapshot=on "
             f"qcow2 overlay are temporary files on the host's {tempfile.gettempdir()}",
             "qemu: -M microvm with virtio-blk-device (virtio-mmio, as conode), -cpu qemu32,-apic, TCG; "
             "no native column: the host's disk is not the guest's", *debian_notes]
    title = f"cobd: the guest's disk ({'quick' if args.quick else 'full'} sizes)"
    refs = common.References(qemu, "not used")  # no native column: busybox is not needed
    return common.report("disk", title, args, rows, notes, refs,
                         extra={"mib": mib, "random_reads": reads, "repetitions": REPS})


if __name__ == "__main__":
    common.run_main(main)
