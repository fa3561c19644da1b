#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Run every benchmark, one after the other, each in its own process (--only picks some).

boot, resume, workloads, real_software, traps and owner_yield measure conode on both engines (each engine in
child processes) beside qemu-system-i386 and natively (busybox, or Debian's programs) where they apply;
coordinator_scale measures the coordinator (no guest, no engine). The tables go to stdout as each benchmark finishes; --json collects all
their figures in one file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

BENCHMARKS = ("boot", "resume", "fresh_guest", "workloads", "real_software", "traps", "owner_yield",
              "coordinator_scale", "disk", "conet", "migration", "checkpoint", "gang_checkpoint")


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, metavar="NAME",
                   help=f"run only these benchmarks (of: {', '.join(BENCHMARKS)})")
    args = p.parse_args(argv)
    chosen = args.only or list(BENCHMARKS)
    results: dict[str, object] = {}
    failed: dict[str, int] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="conode-bench-") as scratch:
        for name in chosen:
            common.progress(f"=== {name} ===")
            out = Path(scratch) / f"{name}.json"
            argv_child = [sys.executable, str(common.BENCH_DIR / f"{name}.py"), "--json", str(out)]
            if args.quick:
                argv_child.append("--quick")
            began = time.monotonic()
            status = subprocess.run(argv_child, check=False).returncode
            sys.stdout.flush()
            common.progress(f"=== {name}: {time.monotonic() - began:.0f} s, exit status {status} ===")
            if status != 0:
                failed[name] = status
            if out.exists():
                results[name] = json.loads(out.read_text())
    common.progress(f"all benchmarks done in {time.monotonic() - started:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps({"quick": bool(args.quick), "benchmarks": results}, indent=2,
                                        ensure_ascii=False) + "\n")
        common.progress(f"figures written to {args.json}")
    if failed:
        listing = ", ".join(f"{name} (status {status})" for name, status in failed.items())
        print(f"run_all: failed: {listing}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    common.run_main(main)
