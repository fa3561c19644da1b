#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""What a gang's coordinated checkpoint costs its guests, beside a one-guest job's checkpoint, on test hosts.

conode only, through the real pool: a coordinator (``checkpoint_interval_s`` 2) and two agents as processes, each
agent on a test host of its own (network namespaces made by tests/multihost/testnet.py; root only). In turn, a
one-guest job computing a value every 0.3 s, and a 2-rank gang in which rank 1 computes the same values and
streams them to rank 0 over conet (TCP), each for about 15 s. The figures are those the agents and the coordinator
log: a one-guest piece's stall (its final copy: ``checkpoint N sent (... the guest stalled X ms``); a rank's
stand-still in a cut, its final copy plus the time it then stood still until every rank's final copy was made
(``stood still X ms after its piece of cut N``); the coordinator's time from a cut's beginning (``checkpoint_cut``)
to every rank's piece taken, and to the set kept. Full pieces (the first of each job or rank) and deltas apart.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path

import common
from common import Row, Target
from migration import why_no_hosts

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests" / "integration"), str(HERE.parent / "tests" / "multihost")]

HOSTS = ("a1", "a2")
CHECKPOINT_S = 2.0
STEPS = 50  # 0.3 s a step: about 15 s of the job
STALL = Target.at_most("≤ 50 ms (one-guest target)", 50.0)
SENT = re.compile(r"job (\d+): checkpoint (\d+) sent \((full|delta), .*?the guest stalled ([\d.]+) ms")
STOOD = re.compile(r"job (\d+): its guest stood still ([\d.]+) ms after its piece of cut (\d+)")
TAKEN = re.compile(r"job (\d+): cut (\d+) taken by its (\d+) ranks, (\d+) ms after it began")
KEPT = re.compile(r"job (\d+): set (\d+) of its (\d+) ranks kept, ([\d.]+) s after its cut began")
JOB_TIMEOUT_S = 180


def one_guest(steps: int) -> str:
    return ("s=0; i=1; while [ $i -le %d ]; do s=$(( (s * 31 + i * i) %% 1000003 )); echo \"step $i $s\"; "
            "i=$((i+1)); sleep 0.3; done" % steps)


def run(pool, argv: list[str]) -> list[int]:
    """Run a job to its end; its guests' ids (the job's, or its ranks')."""
    job = int(pool.cli("submit", *argv).stdout.strip())
    if pool.cli("wait", str(job), "--timeout", str(JOB_TIMEOUT_S), check=False,
                timeout=JOB_TIMEOUT_S + 30).returncode != 0:
        raise common.BenchmarkError(f"job {job} did not end well: {pool.jobs()[job]}")
    ranks = [rank["id"] for rank in json.loads(pool.cli("job", str(job), "--json").stdout).get("ranks", [])]
    return ranks or [job]


def measure(reps: int) -> dict[str, list[float]]:
    from hostpool import pool_across_hosts, stream
    from testnet import TestNetwork

    samples: dict[str, list[float]] = {key: [] for key in (
        "job_full", "job_delta", "rank_full", "rank_delta", "taken", "kept")}
    with tempfile.TemporaryDirectory(prefix="conode-gang-checkpoint-") as tmp, TestNetwork() as net:
        common.progress(f"a coordinator and agents on test hosts {', '.join(HOSTS)}")
        pool = pool_across_hosts(net, Path(tmp), list(HOSTS), settings={"checkpoint_interval_s": CHECKPOINT_S})
        try:
            singles, gangs = [], []
            for rep in range(reps):
                singles += run(pool, ["--", "sh", "-c", one_guest(STEPS)])
                gangs.append(run(pool, ["--guests", "2", "--", "sh", "-c", stream(STEPS)]))
                common.progress(f"rep {rep + 1}/{reps}: load {os.getloadavg()[0]:.2f}")
            agents = "".join(pool.log(name) for name in HOSTS)
            coordinator = pool.log("coordinator")
        finally:
            pool.close()
    stalls: dict[int, list[tuple[str, float]]] = {}
    for found in SENT.finditer(agents):
        stalls.setdefault(int(found.group(1)), []).append((found.group(3), float(found.group(4))))
    stood: dict[int, list[float]] = {}
    for found in STOOD.finditer(agents):
        stood.setdefault(int(found.group(1)), []).append(float(found.group(2)))
    for job in singles:
        for kind, stall in stalls.get(job, []):
            samples[f"job_{kind}"].append(stall)
    for ranks in gangs:
        for rank in ranks:  # a rank's pieces are its cuts', one each, in order
            for (kind, stall), held in zip(stalls.get(rank, []), stood.get(rank, [])):
                samples[f"rank_{kind}"].append(stall + held)
    samples["taken"] = [float(found.group(4)) for found in TAKEN.finditer(coordinator)]
    samples["kept"] = [float(found.group(4)) * 1000 for found in KEPT.finditer(coordinator)]
    return samples


def main(argv: list[str] | None = None) -> int:
    args = common.parser(__doc__).parse_args(sys.argv[1:] if argv is None else argv)
    reps = 1 if args.quick else 3
    engine = common.pool_engine()
    no_hosts = why_no_hosts()
    if no_hosts is not None:
        print(f"gang_checkpoint: not measured: {no_hosts}", file=sys.stderr)
    loads = [os.getloadavg()[0]]
    samples = measure(reps) if no_hosts is None else {}
    loads.append(os.getloadavg()[0])

    def cell(key: str, stat: str) -> dict[str, common.Value]:
        values = samples.get(key, [])
        if not values:
            return {engine: "n/a"}
        return {engine: max(values) if stat == "max" else common.median(values) if stat == "median" else
                common.percentile(values, 0.95)}

    rows = []
    for title, key, target in (("one-guest job, its stall, full piece", "job_full", ""),
                               ("one-guest job, its stall, delta", "job_delta", STALL),
                               ("2-rank gang, a rank's stand-still, full piece", "rank_full", ""),
                               ("2-rank gang, a rank's stand-still, delta", "rank_delta", STALL)):
        rows += [Row(f"{title}, median", "ms", cell(key, "median"), None, None, ""),
                 Row(f"{title}, p95", "ms", cell(key, "p95"), None, None, target),
                 Row(f"{title}, max", "ms", cell(key, "max"), None, None, "")]
    rows += [Row("2-rank gang: cut begun to every piece taken, median", "ms", cell("taken", "median"), None, None, ""),
             Row("2-rank gang: cut begun to every piece taken, max", "ms", cell("taken", "max"), None, None, ""),
             Row("2-rank gang: cut begun to the set kept, median", "ms", cell("kept", "median"), None, None, "")]
    counts = ", ".join(f"{key} {len(values)}" for key, values in samples.items())
    notes = [f"{reps} one-guest job(s) and {reps} gang(s) of 2 ranks in turn, {STEPS} steps of 0.3 s each, "
             f"checkpoint_interval_s {CHECKPOINT_S:g}; samples: {counts or 'none'}",
             "a rank's stand-still: its final copy plus the time it then stood still until every rank's final "
             "copy was made (the agents' logs, paired piece by piece); a one-guest job stands still for its final "
             "copy only",
             f"host load average (1 min) {loads[0]:.2f} at the start, {loads[1]:.2f} at the end"]
    if no_hosts is not None:
        notes.append(f"not measured: {no_hosts}")
    status = common.report("gang_checkpoint", "A gang's coordinated checkpoints on test hosts", args, rows, notes,
                           None, extra={"samples": samples, "load_average": loads})
    return 2 if no_hosts is not None else status


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    common.run_main(main)
