#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Live migration of a running 128 MiB guest between two processes: downtime, total time, bytes sent.

Two jobs, each a static i386 program (tests/vm/migration/dirtier.c): (a) CPU-bound arithmetic, (b) writing
20 MiB/s of distinct pages of a 64 MiB buffer. conode: two processes of ``python -m conode.testing.migration``
on one engine each time, a Unix socket between them; the source boots the guest, starts the job, moves it a
few seconds in (conode.migration, pre-copy, default policy: 0.1 s downtime limit; the checksum of the last
round's pages in the downtime, of all RAM after the hand-over) and the destination runs it to the end.
Downtime = the guest's last instruction on the source to its first on the destination (host CLOCK_MONOTONIC,
both processes on this host). qemu, the anchor in the same run: two
qemu-system-i386 processes on the same kernel and initramfs (the program appended to the initramfs), the
destination started with ``-incoming``, the source's monitor told ``migrate``; its default downtime limit
(300 ms); figures from ``info migrate`` (its downtime ends when the source has sent the last of it, before the
destination runs).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from common import Row, Target

REPO = common.BENCH_DIR.parent
PROGRAM = REPO / "tests" / "vm" / "migration" / "dirtier.c"
MEM_MIB = 128
# name -> (the job's arguments, seconds into the job the move starts)
JOBS = {"cpu": (["cpu", "10"], 2.5), "dirty": (["rate", "20", "12", "64"], 3.5)}
DOWNTIME_CPU = Target.at_most("≤ 0.1 s median", 0.1)
TOTAL_CPU = Target.at_most("≤ 2 s", 2.0)
DOWNTIME_DIRTY = Target.at_most("≤ 0.3 s p95", 0.3)


def build_program(work: Path) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise common.BenchmarkError("needs gcc with 32-bit support (Debian: gcc-multilib)")
    out = work / "dirtier"
    result = subprocess.run([gcc, "-m32", "-static", "-O1", "-o", str(out), str(PROGRAM)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise common.BenchmarkError(f"cannot build static i386 programs (gcc-multilib): {result.stderr[-300:]}")
    return out


def conode_once(engine: str, job: str, program: Path, work: Path) -> dict:
    """One move on *engine*: the source's report (JSON), checked."""
    args, after = JOBS[job]
    sock = work / f"{engine}-{job}.sock"
    sock.unlink(missing_ok=True)
    env = common.engine_env(engine)
    harness = [sys.executable, "-m", "conode.testing.migration", "--mem", str(MEM_MIB)]
    destination = subprocess.Popen([*harness, "destination", str(sock), str(work / "after")], cwd=REPO, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert destination.stdout is not None
        if b"listening" not in destination.stdout.readline():
            raise common.BenchmarkError(f"conode {engine}: the destination did not start")
        source = subprocess.run([*harness, "source", str(sock), str(work / "before"), str(program), str(after),
                                 *args], cwd=REPO, env=env, capture_output=True, timeout=900)
        sent = json.loads(source.stdout.decode().splitlines()[-1])
        received = json.loads(destination.communicate(timeout=900)[0].decode().splitlines()[-1])
    finally:
        if destination.poll() is None:
            destination.kill()
            destination.wait()
    if not sent.get("migrated") or not received.get("arrived") or received.get("status") != 0:
        raise common.BenchmarkError(f"conode {engine}, {job}: the move failed: {sent} / {received}")
    return sent


class QemuMonitor:
    """The human monitor of a qemu process, on a Unix socket."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.sock.connect(str(path))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise common.BenchmarkError("qemu's monitor socket never appeared") from None
                time.sleep(0.05)
        self.sock.settimeout(0.2)
        self.command("")

    def command(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\n")
        out = b""
        while not out.rstrip().endswith(b"(qemu)"):
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                break
            out += data
        return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", out.decode(errors="replace"))

    def close(self) -> None:
        self.sock.close()


def qemu_once(qemu: str, job: str, initrd: Path, work: Path) -> dict:
    """One qemu migration of the same job: info migrate's figures."""
    args, after = JOBS[job]
    monitor_path, incoming = work / "qemu-monitor.sock", work / "qemu-incoming.sock"
    for path in (monitor_path, incoming):
        path.unlink(missing_ok=True)
    source = common.QemuGuest(qemu, MEM_MIB, initrd, extra_args=["-monitor", f"unix:{monitor_path},server,nowait"])
    destination = common.QemuGuest(qemu, MEM_MIB, initrd, extra_args=["-incoming", f"unix:{incoming}"])
    monitor = None
    try:
        source.launch()
        source.wait_prompt(300)
        destination.launch()
        source.send(f"/bin/dirtier {' '.join(args)} &")
        time.sleep(after)
        monitor = QemuMonitor(monitor_path)
        monitor.command(f"migrate -d unix:{incoming}")
        deadline = time.monotonic() + 300
        while True:
            info = monitor.command("info migrate")
            status = re.search(r"Migration status: (\S+)", info)
            if status and status.group(1) in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() > deadline:
                raise common.BenchmarkError("qemu: the migration did not end within 300 s")
            time.sleep(0.2)
        if status.group(1) != "completed":
            raise common.BenchmarkError(f"qemu: the migration {status.group(1)}: {info[-500:]}")

        def number(name: str) -> float:
            found = re.search(rf"^{name}: (\d+)", info, re.MULTILINE)
            if found is None:
                raise common.BenchmarkError(f"qemu's info migrate has no {name!r}: {info[-500:]}")
            return float(found.group(1))

        return {"downtime_s": number("downtime") / 1000, "total_s": number("total time") / 1000,
                "bytes_sent": number("transferred ram") * 1024, "rounds": number("dirty sync count")}
    finally:
        if monitor is not None:
            monitor.close()
        source.close()
        destination.close()


def initrd_with(program: Path, work: Path) -> Path:
    """The packaged initramfs with /bin/dirtier appended (the kernel reads concatenated archives)."""
    _, packaged = common.image_paths()
    staging = work / "extra"
    (staging / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(program, staging / "bin" / "dirtier")
    archive = subprocess.run(["cpio", "-o", "-H", "newc", "-R", "0:0"], input=b"bin\nbin/dirtier\n", cwd=staging,
                             capture_output=True, check=True).stdout
    out = work / "initrd-dirtier.cpio.gz"
    out.write_bytes(packaged.read_bytes() + gzip.compress(archive, 1))
    return out


def main(argv: list[str] | None = None) -> int:
    args = common.parser(__doc__).parse_args(argv)
    refs = common.References.find()
    reps = 1 if args.quick else 5
    engines = common.conode_engines()
    samples: dict[str, dict[str, list[dict]]] = {job: {place: [] for place in (*engines, "qemu")} for job in JOBS}
    with tempfile.TemporaryDirectory(prefix="conode-migration-") as tmp:
        work = Path(tmp)
        program = build_program(work)
        initrd = initrd_with(program, work) if refs.qemu and shutil.which("cpio") else None
        for rep in range(reps):  # the places alternate, so a slow spell of the host does not fall on one only
            for job in JOBS:
                for engine in engines:
                    figures = conode_once(engine, job, program, work)
                    samples[job][engine].append(figures)
                    common.progress(f"conode {engine}, {job} {rep + 1}/{reps}: downtime {figures['downtime_s']:.3f} s, "
                                    f"total {figures['total_s']:.2f} s, {figures['bytes_sent'] / 2**20:.1f} MiB, "
                                    f"{figures['rounds']} rounds, CPU cap {figures['cpu_cap']:g}")
                if initrd is not None:
                    figures = qemu_once(refs.qemu, job, initrd, work)
                    samples[job]["qemu"].append(figures)
                    common.progress(f"qemu, {job} {rep + 1}/{reps}: downtime {figures['downtime_s']:.3f} s, "
                                    f"total {figures['total_s']:.2f} s, {figures['bytes_sent'] / 2**20:.1f} MiB")

    def cells(job: str, key: str, stat: str, scale: float = 1.0) -> tuple[dict[str, common.Value], common.Value]:
        def figure(values: list[dict]) -> common.Value:
            numbers = [v[key] * scale for v in values if v.get(key) is not None]
            if not numbers:
                return None
            return common.median(numbers) if stat == "median" else common.percentile(numbers, 0.95)

        conode = common.by_engine(lambda engine: figure(samples[job][engine]))
        return conode, figure(samples[job]["qemu"]) if samples[job]["qemu"] else common.place_cell("qemu")

    rows = []
    for job, title, downtime_stat, downtime_target, total_target in (
            ("cpu", "(a) CPU-bound", "median", DOWNTIME_CPU, TOTAL_CPU),
            ("dirty", "(b) dirtying 20 MiB/s", "p95", DOWNTIME_DIRTY, "")):
        rows += [
            Row(f"{title}: downtime, {downtime_stat}", "s", *cells(job, "downtime_s", downtime_stat),
                "n/a", downtime_target),
            Row(f"{title}: downtime, {'p95' if downtime_stat == 'median' else 'median'}", "s",
                *cells(job, "downtime_s", "p95" if downtime_stat == "median" else "median"), "n/a", ""),
            Row(f"{title}: total time, median", "s", *cells(job, "total_s", "median"), "n/a", total_target),
            Row(f"{title}: bytes sent, median", "MiB", *cells(job, "bytes_sent", "median", 2 ** -20), "n/a", ""),
            Row(f"{title}: rounds (qemu: dirty syncs), median", "", *cells(job, "rounds", "median"), "n/a", ""),
        ]
    notes = [
        f"{reps} moves per job and place, {MEM_MIB} MiB guests; conode's downtime ends at the guest's first "
        "instruction on the destination, qemu's (from info migrate) when the source has sent the last state",
        "conode's downtime includes the checksum of the pages the last round sent; all RAM is checked after the "
        "hand-over (the default policy)",
    ]
    title = f"Live migration ({'quick' if args.quick else 'full'})"
    return common.report("migration", title, args, rows, notes, refs, extra={"samples": samples})


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
