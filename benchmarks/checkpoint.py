"""Checkpoints of a running guest: how long each stalls it, how large and how long to take.

A real guest worker (``python -m conode.agent.worker``) runs a 128 MiB guest with checkpoints every
``--interval`` seconds, exactly as under an agent; each checkpoint message reports the guest's stall (from its
last instruction before the final copy to the end of that copy), the piece's size and how long the piece took.
Two jobs, the migration benchmark's static i386 program (tests/vm/migration/dirtier.c) given as the job's input:
(a) CPU-bound arithmetic, (b) writing 20 MiB/s of distinct pages of a 64 MiB buffer. Then the chain up to the
middle piece is restored in a second worker, which must go on with the job and finish it: the pieces are real.
``CONODE_ENGINE=stock`` measures the stock engine (its dirty pages found by comparison).

Target (issue 13): a checkpoint of a running 128 MiB guest stalls it ≤ 50 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from conode.agent.pipe import Unpacker, pack
from migration import build_program
from conode.vm.cpu.dirty import engine_logs_dirty_pages

JOBS = {"cpu-bound": "chmod +x dirtier && ./dirtier cpu 12",
        "memory-dirtying 20 MiB/s": "chmod +x dirtier && ./dirtier rate 20 12 64"}


class Worker:
    """A guest worker process, spoken to over its pipe."""

    def __init__(self, boot_snapshot: Path, mem_mib: int) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "conode.agent.worker", "--mem", str(mem_mib),
                                      "--boot-snapshot", str(boot_snapshot)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=sys.stderr)
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


def run_case(name: str, command: str, program: bytes, directory: Path, boot: Path, interval_s: float,
             mem_mib: int) -> dict:
    worker = Worker(boot, mem_mib)
    worker.wait_for("ready")
    worker.send({"type": "run", "job": 1, "argv": ["sh", "-c", command], "inputs": {"dirtier": program},
                 "outputs": [],
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
        deltas = pieces[1:] or pieces
        result.update({
            "stall_ms_median": round(statistics.median(stalls), 1),
            "stall_ms_p95": round(stalls[min(len(stalls) - 1, int(0.95 * len(stalls)))], 1),
            "stall_ms_max": round(stalls[-1], 1),
            "full_piece_mib": round(pieces[0]["size"] / (1 << 20), 2),
            "full_piece_s": round(pieces[0]["took_s"], 2),
            "delta_piece_mib_median": round(statistics.median(p["size"] for p in deltas) / (1 << 20), 2),
            "delta_pages_median": statistics.median(p["pages"] for p in deltas),
            "final_pages_median": statistics.median(p["final_pages"] for p in pieces),
            "delta_piece_s_median": round(statistics.median(p["took_s"] for p in deltas), 2),
        })
    result["restored"] = restore_check(directory, pieces, boot, mem_mib, command) if pieces else None
    return result


def restore_check(directory: Path, pieces: list[dict[str, Any]], boot: Path, mem_mib: int, command: str) -> str:
    """Go on from the chain up to the middle piece in a new worker: the job must finish there."""
    chain: list[str] = []
    for piece in pieces[:max(1, len(pieces) // 2)]:
        if piece["base"] == -1:
            chain = []
        chain.append(piece["path"])
    worker = Worker(boot, mem_mib)
    worker.wait_for("ready")
    worker.send({"type": "restore", "job": 1, "pieces": chain})
    while True:
        message = worker.next()
        if message["type"] in ("finished", "failed"):
            break
    worker.send({"type": "quit"})
    worker.proc.wait()
    return f"{message['type']} from piece {len(chain) - 1}" + (f": {message['reason']}"
                                                               if message["type"] == "failed" else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between checkpoints")
    parser.add_argument("--mem", type=int, default=128, help="guest MiB")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="conode-ckpt-bench-") as tmp:
        root = Path(tmp)
        boot = root / "boot.snap"
        results = []
        program = build_program(root).read_bytes()
        for index, (name, command) in enumerate(JOBS.items()):
            directory = root / str(index)
            directory.mkdir()
            results.append(run_case(name, command, program, directory, boot, args.interval, args.mem))
    report = {"engine": "conode engine (dirty-page log)" if engine_logs_dirty_pages() else "stock Unicorn (comparison)",
              "guest_mib": args.mem, "interval_s": args.interval, "target_stall_ms": 50, "cases": results}
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"checkpoints of a running {args.mem} MiB guest every {args.interval:g} s ({report['engine']})")
    for case in results:
        print(json.dumps(case))


if __name__ == "__main__":
    main()
