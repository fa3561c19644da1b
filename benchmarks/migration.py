#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Live migration of a running 128 MiB guest between agents on two test hosts: downtime, total time, bytes sent.

conode, through the real pool: a coordinator and two agents as processes, each agent on a test host of its own
(a network namespace made by tests/multihost/testnet.py; root only), the guest streamed agent to agent over
CURVE on the test network. Each move is one job, a static i386 program (tests/vm/migration/dirtier.c) sent as
the job's input: (a) CPU-bound arithmetic, (b) writing 20 MiB/s of distinct pages of a 64 MiB buffer; a few
seconds after the job starts, ``coordinator migrate JOB --to NODE`` moves it to the other host, and once it runs
there the job is cancelled. The figures are those the source agent reports to the coordinator, which logs them
(``job N moved from NODE: ... downtime, ... s, ... bytes in ... rounds``): downtime = the guest's last
instruction on the source to its first on the destination (host CLOCK_MONOTONIC: the test hosts share this
machine's clock), total = the start of the stream to GO, bytes = all that went on the stream.

qemu, the anchor in the same run (the places alternate, move by move): two qemu-system-i386 processes on the
same kernel and initramfs (the program appended to it), 128 MiB, the destination started with ``-incoming``
on a TCP port on loopback, the source's monitor told ``migrate``; its default downtime limit (300 ms); figures
from ``info migrate`` (its downtime ends when the source has sent the last of it, before the destination runs).
"""

from __future__ import annotations

import gzip
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

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests" / "integration"), str(HERE.parent / "tests" / "multihost")]

REPO = common.BENCH_DIR.parent
PROGRAM = REPO / "tests" / "vm" / "migration" / "dirtier.c"
MEM_MIB = 128
HOSTS = ("a1", "a2")
# name -> (the job's arguments, seconds into the job the move starts); the jobs outlast their move
JOBS = {"cpu": (["cpu", "60"], 2.5), "dirty": (["rate", "20", "60", "64"], 3.5)}
DOWNTIME_CPU = Target.at_most("≤ 0.1 s median", 0.1)
TOTAL_CPU = Target.at_most("≤ 2 s", 2.0)
STOP_AND_COPY = (("pages in the last copy", "final_pages", "", 1.0),
                 ("last pages sent", "sent_s", "ms", 1000.0), ("the destination ready", "ready_s", "ms", 1000.0),
                 ("hand-over done", "handed_s", "ms", 1000.0), ("GO sent", "paused_s", "ms", 1000.0))
DOWNTIME_DIRTY = Target.at_most("≤ 0.3 s p95", 0.3)
MOVED = re.compile(r"job (\d+) moved from (\S+): (\d+|unknown)(?: ms)? downtime, ([\d.]+) s, (\d+) bytes in (\d+) "
                   r"rounds")
# The source agent's own line on the move: the stop-and-copy phase, from the guest's last instruction there.
PHASES = re.compile(r"job (\d+) moved out: downtime \S+(?: ms)?, paused (\d+) ms \(last (\d+) pages sent at (\d+) ms, "
                    r"the destination ready at (\d+), handed over at (\d+)\)")
MOVE_TIMEOUT_S = 120


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


def why_no_hosts() -> str | None:
    """Why the test hosts cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "needs root: the agents run on test hosts made of network namespaces (run it with sudo)"
    from testnet import unavailable

    return unavailable()


class HostPool:
    """A coordinator and an agent per test host (owner away), ready for jobs."""

    def __init__(self, net, root: Path) -> None:
        from hostpool import pool_across_hosts

        self.pool = pool_across_hosts(net, root, list(HOSTS))

    def move_once(self, job_kind: str, program: Path) -> dict:
        """Run one job, move its guest to the other host a few seconds in; the source's figures."""
        pool = self.pool
        args, after = JOBS[job_kind]
        job = pool.submit("sh", "-c", f"chmod +x dirtier && exec ./dirtier {' '.join(args)}", inputs=(program,))
        try:
            row = pool.wait_until(f"job {job} running", lambda: (j := pool.jobs()[job])["state"] == "running" and j,
                                  timeout=MOVE_TIMEOUT_S, interval=0.1)
            time.sleep(after)
            target = next(name for name in HOSTS if name != row["node"])
            out = pool.cli("migrate", str(job), "--to", target).stdout.decode()
            if f"moving to {target}" not in out:
                raise common.BenchmarkError(f"coordinator migrate {job} --to {target}: {out.strip()}")
            figures = pool.wait_until(f"job {job}'s move to be reported", lambda: self._reported(job, row["node"]),
                                      timeout=MOVE_TIMEOUT_S, interval=0.2)
            moved = pool.wait_until(f"job {job} running on {target}", lambda: (j := pool.jobs()[job]).get(
                "moves") == 1 and "moving_to" not in j and j, timeout=MOVE_TIMEOUT_S, interval=0.2)
            if moved["state"] != "running" or moved["node"] != target:
                raise common.BenchmarkError(f"job {job} did not go on at {target}: {moved}")
            return figures
        finally:
            pool.cli("cancel", str(job), check=False)
            pool.wait_until(f"job {job} to end", lambda: pool.jobs()[job]["state"] not in ("running", "queued"),
                            timeout=MOVE_TIMEOUT_S, interval=0.2)

    def _reported(self, job: int, source: str) -> dict | None:
        """The move's figures as the coordinator logged them, with the stop-and-copy phase from the source's log."""
        figures = None
        for found in MOVED.finditer(self.pool.log("coordinator")):
            if int(found.group(1)) == job:
                downtime = found.group(3)
                figures = {"downtime_s": None if downtime == "unknown" else int(downtime) / 1000,
                           "total_s": float(found.group(4)), "bytes_sent": float(found.group(5)),
                           "rounds": float(found.group(6))}
        phases = [found for found in PHASES.finditer(self.pool.log(source)) if int(found.group(1)) == job]
        if figures is None or not phases:
            return None
        paused, pages, sent, ready, handed = (int(value) for value in phases[-1].groups()[1:])
        return {**figures, "paused_s": paused / 1000, "final_pages": pages, "sent_s": sent / 1000,
                "ready_s": ready / 1000, "handed_s": handed / 1000}

    def close(self) -> None:
        self.pool.close()


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
    """One qemu migration of the same job over TCP on loopback: info migrate's figures."""
    args, after = JOBS[job]
    monitor_path = work / "qemu-monitor.sock"
    monitor_path.unlink(missing_ok=True)
    port = common.free_port()
    source = common.QemuGuest(qemu, MEM_MIB, initrd, extra_args=["-monitor", f"unix:{monitor_path},server,nowait"])
    destination = common.QemuGuest(qemu, MEM_MIB, initrd, extra_args=["-incoming", f"tcp:127.0.0.1:{port}"])
    monitor = None
    try:
        source.launch()
        source.wait_prompt(300)
        destination.launch()
        source.send(f"/bin/dirtier {' '.join(args)} &")
        time.sleep(after)
        monitor = QemuMonitor(monitor_path)
        monitor.command(f"migrate -d tcp:127.0.0.1:{port}")
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


def measure(engine: str, reps: int, refs: common.References, no_hosts: str | None
            ) -> dict[str, dict[str, list[dict]]]:
    """Every move, by job and place; conode and qemu alternate, so a slow spell of the host falls on both."""
    from testnet import TestNetwork

    samples: dict[str, dict[str, list[dict]]] = {job: {engine: [], "qemu": []} for job in JOBS}
    with tempfile.TemporaryDirectory(prefix="conode-migration-") as tmp:
        work = Path(tmp)
        program = build_program(work)
        initrd = initrd_with(program, work) if refs.qemu and shutil.which("cpio") else None
        net = TestNetwork() if no_hosts is None else None
        pool = None
        try:
            if net is not None:
                common.progress(f"conode ({engine} engine): a coordinator and agents on test hosts {', '.join(HOSTS)}")
                pool = HostPool(net, work / "pool")
            for rep in range(reps):
                for job in JOBS:
                    if pool is not None:
                        figures = pool.move_once(job, program)
                        samples[job][engine].append(figures)
                        common.progress(f"conode, {job} {rep + 1}/{reps}: downtime {figures['downtime_s']} s, total "
                                        f"{figures['total_s']:.2f} s, {figures['bytes_sent'] / 2**20:.1f} MiB, "
                                        f"{figures['rounds']:.0f} rounds; load {os.getloadavg()[0]:.2f}")
                    if initrd is not None:
                        figures = qemu_once(refs.qemu, job, initrd, work)
                        samples[job]["qemu"].append(figures)
                        common.progress(f"qemu, {job} {rep + 1}/{reps}: downtime {figures['downtime_s']:.3f} s, "
                                        f"total {figures['total_s']:.2f} s, {figures['bytes_sent'] / 2**20:.1f} MiB; "
                                        f"load {os.getloadavg()[0]:.2f}")
        finally:
            if pool is not None:
                pool.close()
            if net is not None:
                net.close()
    return samples


def main(argv: list[str] | None = None) -> int:
    args = common.parser(__doc__).parse_args(sys.argv[1:] if argv is None else argv)
    refs = common.References.find()
    reps = 2 if args.quick else 7
    engine = common.pool_engine()
    no_hosts = why_no_hosts()
    if no_hosts is not None:
        print(f"migration: conode not measured: {no_hosts}", file=sys.stderr)
    loads = [os.getloadavg()[0]]
    samples = measure(engine, reps, refs, no_hosts)
    loads.append(os.getloadavg()[0])

    def cells(job: str, key: str, stat: str, scale: float = 1.0) -> tuple[dict[str, common.Value], common.Value]:
        def figure(values: list[dict]) -> common.Value:
            numbers = [v[key] * scale for v in values if v.get(key) is not None]
            if not numbers:
                return None
            if stat == "max":
                return max(numbers)
            return common.median(numbers) if stat == "median" else common.percentile(numbers, 0.95)

        conode = figure(samples[job][engine]) if no_hosts is None else "n/a"
        return {engine: conode}, figure(samples[job]["qemu"]) if samples[job]["qemu"] else common.place_cell("qemu")

    rows = []
    for job, title, downtime_stat, downtime_target, total_target in (
            ("cpu", "(a) CPU-bound", "median", DOWNTIME_CPU, TOTAL_CPU),
            ("dirty", "(b) dirtying 20 MiB/s", "p95", DOWNTIME_DIRTY, "")):
        other = "p95" if downtime_stat == "median" else "median"
        rows += [
            Row(f"{title}: downtime, {downtime_stat}", "s", *cells(job, "downtime_s", downtime_stat), "n/a",
                downtime_target),
            Row(f"{title}: downtime, {other}", "s", *cells(job, "downtime_s", other), "n/a", ""),
            Row(f"{title}: downtime, max", "s", *cells(job, "downtime_s", "max"), "n/a", ""),
            Row(f"{title}: total time, median", "s", *cells(job, "total_s", "median"), "n/a", total_target),
            Row(f"{title}: bytes sent, median", "MiB", *cells(job, "bytes_sent", "median", 2 ** -20), "n/a", ""),
            Row(f"{title}: rounds (qemu: dirty syncs), median", "", *cells(job, "rounds", "median"), "n/a", ""),
            *(Row(f"{title}: stop and copy, {what}, median", unit, cells(job, key, "median", scale)[0], None, None,
                  "") for what, key, unit, scale in STOP_AND_COPY),
        ]
    verdicts = [f"{row.metric}: {'met' if all(ok.values()) else 'MISSED'}" for row in rows
                if isinstance(row.target, Target) and (ok := row.target.met(row))]
    notes = [
        f"{reps} moves per job and place, {MEM_MIB} MiB guests; conode: agents on two test hosts (network "
        "namespaces), the move by `coordinator migrate`, the figures the source agent reported; qemu: TCP on "
        "loopback, qemu at niceness 0 (conode's workers at 19, but for the stop-and-copy), info migrate's figures "
        "(its downtime ends when the source has sent the last state, before the destination runs; conode's at the "
        "guest's first instruction on the destination)",
        "conode's downtime includes the checksum of the pages the last round sent; all RAM is checked after the "
        "hand-over (the default policy)",
        "stop and copy (conode only, from the guest's last instruction on the source, as the source agent logs it): "
        "the last pages, device state and digest sent; the destination's READY (guest built and checked); the "
        "hand-over done (the coordinator recorded it: move_ready, its store, move_go); GO sent; the downtime ends "
        "when the guest's first instruction on the destination follows",
        f"host load average (1 min) {loads[0]:.2f} at the start, {loads[1]:.2f} at the end",
        *(["targets: " + "; ".join(verdicts)] if verdicts else []),
    ]
    if no_hosts is not None:
        notes.append(f"conode not measured: {no_hosts}")
    title = f"Live migration between agents on two test hosts ({'quick' if args.quick else 'full'})"
    status = common.report("migration", title, args, rows, notes, refs, extra={"samples": samples,
                                                                               "load_average": loads})
    return 2 if no_hosts is not None else status


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    common.run_main(main)
