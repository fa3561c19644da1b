#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""CPU-bound guest work: conode vs qemu-system-i386 vs the same busybox run natively.

Each workload is one shell command, timed between markers that the guest shell prints, inside one guest
session (boot excluded): a busybox sh loop, sha256sum and gzip over a data file, fork+exec of /bin/true, and
a syscall-heavy dd with bs=1. The data file is the busybox binary repeated, cut to size: the same bytes in the
guest and on the host, so the checksum and compressed size must agree everywhere (checked and reported).
"""

from __future__ import annotations

import math

import common
from common import Row

ENGINES = ("conode", "qemu", "native")
CPU_BOUND = ("loop", "sha256", "gzip")
TARGET_CPU = "ratio ≤ 1.25 (throughput ≥ 0.8× qemu)"


def main(argv: list[str] | None = None) -> int:
    args = common.parser(__doc__).parse_args(argv)
    refs = common.References.find()
    sizes = common.Sizes.for_run(args.quick)
    reps = 1 if args.quick else 3
    chosen = common.workloads(sizes)

    def make_steps(tmp: str, true: str, busybox: str) -> list[tuple[str, str]]:
        return common.workload_steps(chosen, sizes, reps, tmp, true, busybox)

    available = {"conode": True, "qemu": refs.qemu is not None, "native": refs.busybox is not None}
    streams: dict[str, common.MarkerStream] = {}
    for engine in ENGINES:  # conode first: its figures are printed even if a reference is missing
        if not available[engine]:
            continue
        common.progress(f"{engine}: running {len(chosen)} workloads x {reps}")
        streams[engine] = common.run_on(engine, make_steps, refs)

    def figure(engine: str, work: common.Workload) -> common.Value:
        if engine not in streams:
            return "missing"
        seconds = common.median([streams[engine].span(f"{work.name}.{rep}") for rep in range(reps)])
        return work.figure(seconds)

    rows = [
        Row(work.metric, work.unit, figure("conode", work), figure("qemu", work), figure("native", work),
            TARGET_CPU if work.name in CPU_BOUND else "")
        for work in chosen
    ]

    notes = [f"median of {reps} run(s) per workload, host wall time between markers; boot excluded"]
    ratios = [row.ratio for row, work in zip(rows, chosen) if work.name in CPU_BOUND]
    if all(r is not None for r in ratios):
        geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))  # type: ignore[arg-type]
        notes.append(f"CPU-bound (loop, sha256sum, gzip) geometric mean of conode/qemu time: {geo:.2f} "
                     f"(target ≤ 1.25; the fast engine later: ≤ 1.25 as well)")
    checks = {engine: common.normalise_check(stream.between("check")) for engine, stream in streams.items()}
    if len(set(checks.values())) == 1:
        where = "agrees on " + ", ".join(checks) if len(checks) > 1 else "(conode only)"
        notes.append(f"data check {where}: {next(iter(checks.values()))} "
                     f"(sha256 of the {sizes.data}-byte file, gzip'd size)")
    else:
        for engine, text in checks.items():
            notes.append(f"DATA CHECK DIFFERS — {engine}: {text}")

    title = f"Guest workloads ({'quick' if args.quick else 'full'} sizes)"
    return common.report("workloads", title, args, rows, notes, refs,
                         extra={"sizes": vars(sizes), "repetitions": reps, "checks": checks})


if __name__ == "__main__":
    common.run_main(main)
