"""Checkpoints of a running guest: how long each stalls it, how large and how long to take.

A real guest worker (``python -m conode.agent.worker``, on each engine) runs a 128 MiB guest with checkpoints
every second, exactly as under an agent; each checkpoint message reports the guest's stall (from its last
instruction before the final copy to the end of that copy), the piece's size and how long the piece took.
Two jobs, the migration benchmark's static i386 program (tests/vm/migration/dirtier.c) given as the job's input:
(a) CPU-bound arithmetic, (b) writing 20 MiB/s of distinct pages of a 64 MiB buffer; and (c) a job on a pool
image (a small ext2 root, conode/testing/root_image.py) appending a line to a file on its disk every second:
each piece carries only the disk clusters written since the piece before. Then the chain up to the middle piece
is restored in a second worker, which must go on with the job and finish it: the pieces are real.
The stock engine finds changed pages by comparing all RAM with a copy, in the stall too; the fast engine logs them.

Target (issue 13): a checkpoint of a running 128 MiB guest stalls it ≤ 50 ms.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
from common import Row, Target
from migration import build_program

from conode.agent.pipe import Unpacker, pack
from conode.testing.root_image import root_image

MEM_MIB = 128
STALL = Target.at_most("≤ 50 ms", 50.0)



class Worker:
    """A guest worker process, spoken to over its pipe."""

    def __init__(self, boot_snapshot: Path, mem_mib: int, engine: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "conode.agent.worker", "--mem", str(mem_mib),
                                      "--boot-snapshot", str(boot_snapshot)], env=common.engine_env(engine),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self._unpacker = Unpacker()
        self._pending: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(pack(message))
        self.proc.stdin.flush()

    def next(self, timeout_s: float = 300.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while not self._pending:
            if time.monotonic() > deadline:
                raise TimeoutError("the worker said nothing")
            data = os.read(self.proc.stdout.fileno(), 1 << 20)  # type: ignore[union-attr]
            if not data:
                raise EOFError("the worker exited")
            self._pending += self._unpacker.feed(data)
        return self._pending.pop(0)

    def wait_for(self, kind: str) -> dict[str, Any]:
        while True:
            message = self.next()
            if message["type"] == kind:
                return message

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def disk_of(image: Path | None, overlay: Path) -> dict[str, Any]:
    """A run or restore message's disk: the job's guest boots from *image* (None: no disk)."""
    return {"disk": {"base": str(image), "overlay": str(overlay), "budget_mib": 64}} if image else {}


def run_case(name: str, command: str, program: bytes, directory: Path, boot: Path, interval_s: float,
             mem_mib: int, engine: str, image: Path | None = None) -> dict:
    worker = Worker(boot, mem_mib, engine)
    worker.wait_for("ready")
    worker.send({"type": "run", "job": 1, "argv": ["sh", "-c", command], "inputs": {"dirtier": program},
                 "outputs": [], **disk_of(image, directory / "overlay"),
                 "checkpoint": {"dir": str(directory), "interval_s": interval_s, "seq": 0}})
    pieces: list[dict[str, Any]] = []
    output = b""
    while True:
        message = worker.next()
        if message["type"] == "checkpoint":
            pieces.append(message)
        elif message["type"] == "output":
            output += message["data"]
        elif message["type"] in ("finished", "failed"):
            break
    worker.send({"type": "quit"})
    worker.proc.wait()
    result: dict[str, Any] = {"job": name, "checkpoints": len(pieces), "finished": message["type"],
                              "output": output.decode(errors="replace").strip()[-60:]}
    if pieces:
        stalls = sorted(p["stall_s"] * 1000 for p in pieces)
        cpu = sorted(p.get("stall_cpu_s", 0.0) * 1000 for p in pieces)
        deltas = pieces[1:] or pieces
        result.update({
            "stall_ms_median": round(statistics.median(stalls), 1),
            "stall_ms_p95": round(stalls[min(len(stalls) - 1, int(0.95 * len(stalls)))], 1),
            "stall_ms_max": round(stalls[-1], 1),
            "stall_cpu_ms_median": round(statistics.median(cpu), 1),
            "stall_cpu_ms_p95": round(cpu[min(len(cpu) - 1, int(0.95 * len(cpu)))], 1),
            "full_piece_mib": round(pieces[0]["size"] / (1 << 20), 2),
            "full_piece_s": round(pieces[0]["took_s"], 2),
            "delta_piece_mib_median": round(statistics.median(p["size"] for p in deltas) / (1 << 20), 2),
            "full_piece_kib": round(pieces[0]["size"] / 1024),
            "delta_piece_kib_median": round(statistics.median(p["size"] for p in deltas) / 1024),
            "delta_pages_median": statistics.median(p["pages"] for p in deltas),
            "final_pages_median": statistics.median(p["final_pages"] for p in pieces),
            "delta_piece_s_median": round(statistics.median(p["took_s"] for p in deltas), 2),
        })
    result["restored"] = restore_check(pieces, boot, mem_mib, engine, image, directory) if pieces else None
    return result


def restore_check(pieces: list[dict[str, Any]], boot: Path, mem_mib: int, engine: str, image: Path | None,
                  directory: Path) -> str:
    """Go on from the chain up to the middle piece in a new worker: the job must finish there."""
    chain: list[str] = []
    for piece in pieces[:max(1, len(pieces) // 2)]:
        if piece["base"] == -1:
            chain = []
        chain.append(piece["path"])
    worker = Worker(boot, mem_mib, engine)
    worker.wait_for("ready")
    worker.send({"type": "restore", "job": 1, "pieces": chain, **disk_of(image, directory / "restored-overlay")})
    while True:
        message = worker.next()
        if message["type"] in ("finished", "failed"):
            break
    worker.send({"type": "quit"})
    worker.proc.wait()
    return f"{message['type']} from piece {len(chain) - 1}" + (f": {message['reason']}"
                                                               if message["type"] == "failed" else "")


def main() -> int:
    args = common.parser(__doc__).parse_args()
    interval = 1.0
    seconds = 6 if args.quick else 12
    jobs = {"cpu": f"chmod +x dirtier && ./dirtier cpu {seconds}",
            "dirty": f"chmod +x dirtier && ./dirtier rate 20 {seconds} 64",
            "disk": f"i=0; while [ $i -lt {seconds} ]; do echo line $i >> /data.txt; sync; sleep 1; i=$((i+1)); done"}
    engines = common.conode_engines()
    cases: dict[str, dict[str, dict]] = {job: {} for job in jobs}
    with tempfile.TemporaryDirectory(prefix="conode-checkpoint-") as tmp:
        root = Path(tmp)
        program = build_program(root).read_bytes()
        image = root_image(root, {})
        for engine in engines:
            boot = root / f"boot-{engine}.snap"
            for job, command in jobs.items():
                directory = root / f"{engine}-{job}"
                directory.mkdir()
                case = run_case(job, command, program, directory, boot, interval, MEM_MIB, engine,
                                image if job == "disk" else None)
                cases[job][engine] = case
                common.progress(f"conode {engine}, {job}: {json.dumps(case)}")

    def cell(job: str, key: str) -> dict[str, common.Value]:
        return common.by_engine(lambda engine: cases[job].get(engine, {}).get(key))

    rows = []
    for job, title in (("cpu", "(a) CPU-bound"), ("dirty", "(b) dirtying 20 MiB/s")):
        rows += [
            Row(f"{title}: stall per checkpoint, median", "ms", cell(job, "stall_ms_median"), "n/a", "n/a", STALL),
            Row(f"{title}: stall per checkpoint, p95", "ms", cell(job, "stall_ms_p95"), "n/a", "n/a", STALL),
            Row(f"{title}: the stall's CPU time (machine thread), median", "ms", cell(job, "stall_cpu_ms_median"),
                "n/a", "n/a"),
            Row(f"{title}: the stall's CPU time (machine thread), p95", "ms", cell(job, "stall_cpu_ms_p95"),
                "n/a", "n/a"),
            Row(f"{title}: pages copied in the stall, median", "", cell(job, "final_pages_median"), "n/a", "n/a"),
            Row(f"{title}: first (full) piece", "MiB", cell(job, "full_piece_mib"), "n/a", "n/a"),
            Row(f"{title}: first (full) piece, time to take", "s", cell(job, "full_piece_s"), "n/a", "n/a"),
            Row(f"{title}: delta piece, median", "MiB", cell(job, "delta_piece_mib_median"), "n/a", "n/a"),
            Row(f"{title}: delta pages, median", "", cell(job, "delta_pages_median"), "n/a", "n/a"),
            Row(f"{title}: delta piece, time to take, median", "s", cell(job, "delta_piece_s_median"), "n/a", "n/a"),
            Row(f"{title}: checkpoints taken", "", cell(job, "checkpoints"), "n/a", "n/a"),
        ]
    title = "(c) a line to its disk each second"
    rows += [
        Row(f"{title}: stall per checkpoint, median", "ms", cell("disk", "stall_ms_median"), "n/a", "n/a", STALL),
        Row(f"{title}: first (full) piece", "KiB", cell("disk", "full_piece_kib"), "n/a", "n/a"),
        Row(f"{title}: delta piece, median", "KiB", cell("disk", "delta_piece_kib_median"), "n/a", "n/a"),
        Row(f"{title}: checkpoints taken", "", cell("disk", "checkpoints"), "n/a", "n/a"),
    ]
    notes = [(f"a {MEM_MIB} MiB guest checkpointed every {interval:g} s while its job runs {seconds} s; the stall is "
              "the guest's last instruction before the final copy to the end of that copy"),
             "every run's chain was restored in a new worker and its job finished there: "
             + "; ".join(f"{engine} {job}: {case['restored']}" for job in cases for engine, case in cases[job].items())]
    failed = [f"{engine} {job}" for job in cases for engine, case in cases[job].items()
              if case["finished"] != "finished" or not str(case["restored"]).startswith("finished")]
    status = common.report("checkpoint", f"Checkpoints of a running guest ({'quick' if args.quick else 'full'})",
                           args, rows, notes, None, extra={"cases": cases})
    if failed:
        print(f"checkpoint: error: the job or its restore failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    common.run_main(main)
