#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""A fresh guest for every job: what one job's start costs on a worker.

A worker keeps the pristine post-boot snapshot decoded in memory; for each job it restores a new guest from
it, renews the guest's clock and entropy, stages one small input, starts the command and discards the guest
when the job has finished. Measured per job, in one process per engine (after one boot): restore (new machine
+ set_state), renew (host → guest → acknowledged), staging, job start → first output byte, the whole job, and
the discard (freeing the machine). Reference: Firecracker's snapshot restore (not run here).
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

import common
from common import Row, Target

TARGET = Target.at_most("≤ 0.3 s", 0.3)


class _Sink:
    def __init__(self) -> None:
        self.first_output: float | None = None
        self.status: int | None = None
        self.data = b""

    def output(self, job: int, stream: str, data: bytes) -> None:
        if self.first_output is None:
            self.first_output = time.monotonic()
        self.data += data

    def finished(self, job: int, status: int, outputs: dict[str, bytes], missing: list[str],
                 runtime_s: float) -> None:
        self.status = status

    def failed(self, job: int, reason: str) -> None:
        raise common.BenchmarkError(f"the job failed: {reason}")


def jobs_child(count: str) -> int:
    """Boot once, then run *count* jobs each in a fresh guest; print per-step times as JSON."""
    from conode.vm.guest import Guest, JobSpec
    from conode.vm.guest_image import load_guest_image
    from conode.vm.machine import MachineConfig

    booted = Guest.boot(load_guest_image(), MachineConfig(mem_mib=common.DEFAULT_MEM_MIB))
    booted.on_ready = lambda name: booted.machine.pause()
    booted.run()
    pristine = booted.snapshot()
    booted.machine.close()  # the boot guest is done with: only its snapshot is used
    ram_image = pristine.ram_image()  # what a worker keeps: each fresh guest maps it copy-on-write
    steps: dict[str, list[float]] = {"restore": [], "renew_stage": [], "first_output": [], "job": [],
                                     "discard": []}
    for n in range(int(count)):
        began = time.monotonic()
        guest = Guest.restore(pristine, new_identity=True, ram_image=ram_image)
        restored = time.monotonic()
        sink = _Sink()
        started: list[float] = []
        guest.on_job_started = lambda: started.append(time.monotonic())
        guest.start_job(JobSpec.in_job_directory(n + 1, ["cat", "in.txt"], {"in.txt": b"job %d\n" % n}, []),
                        sink)  # type: ignore[arg-type]
        guest.run()
        ended = time.monotonic()
        if sink.status != 0 or sink.data != b"job %d\n" % n or not started or sink.first_output is None:
            raise common.BenchmarkError(f"job {n} misbehaved: status {sink.status}, output {sink.data!r}")
        guest.machine.close()
        del guest
        gc.collect()
        steps["restore"].append(restored - began)
        steps["renew_stage"].append(started[0] - restored)
        steps["first_output"].append(sink.first_output - started[0])
        steps["job"].append(ended - began)
        steps["discard"].append(time.monotonic() - ended)
    import resource
    return common.child_emit({"steps": steps, "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--child"]:
        return jobs_child(argv[2])
    args = common.parser(__doc__).parse_args(argv)
    refs = common.References.find()
    count = 5 if args.quick else 30
    results = {}
    for engine in common.conode_engines():
        common.progress(f"conode {engine}: one boot, then {count} jobs in fresh guests (child process)")
        _, results[engine] = common.run_child(Path(__file__), ["jobs", str(count)], engine=engine)

    def step(key: str) -> dict[str, common.Value]:
        return common.by_engine(lambda engine: common.median(results[engine]["steps"][key]))

    def p95(key: str) -> dict[str, common.Value]:
        return common.by_engine(lambda engine: common.percentile(results[engine]["steps"][key], 0.95))

    na = "n/a"
    rows = [
        Row("restore a fresh guest from the pristine snapshot (in memory)", "s", step("restore"), na, na, ""),
        Row("renew clock + entropy, stage one input", "s", step("renew_stage"), na, na, ""),
        Row("job start → first output byte", "s", step("first_output"), na, na, ""),
        Row("fresh guest → job finished (median)", "s", step("job"), na, na, TARGET),
        Row("fresh guest → job finished (p95)", "s", p95("job"), na, na, ""),
        Row("discard the guest", "s", step("discard"), na, na, ""),
        Row("worker peak RSS after all jobs", "MB",
            common.by_engine(lambda engine: results[engine]["max_rss_mb"]), na, na, ""),
    ]
    notes = [f"{count} jobs per engine in one process, each in its own guest; 128 MiB guests",
             "reference: Firecracker restores a snapshot in under 8 ms (p90 5 ms) by mapping the memory file"]
    title = f"Fresh guest per job ({'quick' if args.quick else 'full'})"
    return common.report("fresh_guest", title, args, rows, notes, refs, extra={"results": results})


if __name__ == "__main__":
    common.run_main(main)
