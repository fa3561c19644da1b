#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Resume from a post-boot snapshot: restore time and time to the first byte of a pending command's output.

The snapshot is taken once: boot, start ``echo RESUMED``, and pause the machine the moment the agent's READY
arrives, i.e. with the exec request just handed to the guest but not yet run; save with GuestSession.save.
Then, in fresh processes (what ``conode vm resume`` does), restore it — read and verify the file, decode it,
set the machine state — and run until the command's first output byte arrives. Each conode engine takes its
own snapshot and resumes it, every step in a child process on that engine (CONODE_ENGINE set). qemu is not
run here; the reference is Firecracker's published resume figure.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import common
from common import Row, Target

RESUME_ARGV = ["echo", "RESUMED"]
EXPECTED = b"RESUMED\n"
TARGET = Target.at_most("≤ 0.3 s", 0.3)
FIRECRACKER = ("Firecracker (reference, not run): snapshot resume latency baseline under 8 ms (p90 5 ms) "
               "for a 2 vCPU / 512 MiB microVM on m5d.metal (firecracker docs/snapshotting/"
               "snapshot-support.md, 'Performance'); it maps guest memory from the file (MAP_PRIVATE) and "
               "pages it in lazily")


def _timed(fn: Callable, into: dict, key: str) -> Callable:
    def wrapper(*args: object, **kwargs: object) -> object:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            into[key] = into.get(key, 0.0) + time.perf_counter() - started

    return wrapper


def resume_child(path: str) -> int:
    """Restore *path* in this fresh process, run to the end of the pending command; print times as JSON."""
    import conode.vm.guest as guest_module
    import conode.vm.machine as machine_module
    import conode.vm.session as session_module

    parts: dict[str, float] = {}
    guest_module.read_snapshot = _timed(guest_module.read_snapshot, parts, "read")  # type: ignore
    machine_module.decode_ram = _timed(machine_module.decode_ram, parts, "decode_ram")  # type: ignore
    output = common.MarkerStream()
    started = time.monotonic()
    label = common.conode_label()
    session = session_module.GuestSession.resume(Path(path), output, common.Discard(),
                                                 lambda line: common.progress(f"{label}: {line}"))
    restored = time.monotonic()
    status = session.run(timeout_s=300)
    return common.child_emit({"started": started, "restored": restored, "first_output": output.first_byte_at,
                              "status": status, "output": output.data.decode(errors="replace"), **parts})


def make_snapshot(path: Path) -> tuple[int, float]:
    """Boot, pause at READY with the command pending, save. Returns (file size, seconds pause → saved)."""
    holder: list = []
    paused_at: list[float] = []

    def on_progress(line: str) -> None:
        if line.startswith("guest ready"):
            paused_at.append(time.monotonic())
            holder[0].machine.pause()  # the exec request is queued right after this, then the slice ends

    output = common.MarkerStream()
    session = common.conode_boot(output, on_progress=on_progress)
    holder.append(session)
    session.start(RESUME_ARGV)  # type: ignore[attr-defined]
    session.run(snapshot_to=path)  # type: ignore[attr-defined]
    saved_at = time.monotonic()
    if not paused_at:
        raise common.BenchmarkError("the guest never reported READY")
    if output.data:
        raise common.BenchmarkError(f"the command ran before the snapshot: {bytes(output.data)!r}")
    return path.stat().st_size, saved_at - paused_at[0]


def snapshot_child(path: str) -> int:
    """Take the snapshot in this process (on the engine its parent chose); print its size and save time."""
    size, save_s = make_snapshot(Path(path))
    return common.child_emit({"size": size, "save_s": save_s})


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--child"]:
        return {"snapshot": snapshot_child, "resume": resume_child}[argv[1]](argv[2])
    args = common.parser(__doc__).parse_args(argv)
    refs = common.References.find()
    reps = 2 if args.quick else 5
    engines = common.conode_engines()

    keys = ("read", "decode_ram", "restore", "first_output", "in_process", "launch")
    samples: dict[str, dict[str, list[float]]] = {engine: {key: [] for key in keys} for engine in engines}
    sizes: dict[str, int] = {}
    save_s: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="conode-bench-") as scratch:
        paths = {engine: Path(scratch) / f"ready-{engine}.snap" for engine in engines}
        for engine in engines:
            common.progress(f"conode {engine}: booting once to take the post-boot snapshot (child process)")
            _, taken = common.run_child(Path(__file__), ["snapshot", str(paths[engine])], engine=engine)
            sizes[engine], save_s[engine] = taken["size"], taken["save_s"]
            common.progress(f"conode {engine}: snapshot {sizes[engine] / 1e6:.1f} MB written "
                            f"{save_s[engine]:.3f} s after the pause")
        for rep in range(reps):  # the engines alternate
            for engine in engines:
                common.progress(f"conode {engine}: resume {rep + 1}/{reps} (fresh process)")
                launched, t = common.run_child(Path(__file__), ["resume", str(paths[engine])], engine=engine)
                if t["status"] != 0 or t["first_output"] is None or t["output"].encode() != EXPECTED:
                    raise common.BenchmarkError(f"resumed guest misbehaved on the {engine} engine: {t}")
                mine = samples[engine]
                mine["read"].append(t["read"])
                mine["decode_ram"].append(t["decode_ram"])
                mine["restore"].append(t["restored"] - t["started"])
                mine["first_output"].append(t["first_output"] - t["restored"])
                mine["in_process"].append(t["first_output"] - t["started"])
                mine["launch"].append(t["first_output"] - launched)
                common.progress(f"conode {engine}: restored in {mine['restore'][-1]:.3f} s, first output "
                                f"{mine['first_output'][-1]:.3f} s later")

    def conode(key: str) -> dict[str, common.Value]:
        return common.by_engine(lambda engine: common.median(samples[engine][key]))

    na = "n/a"
    rows = [
        Row("snapshot file size (128 MiB guest, after boot)", "MB",
            common.by_engine(lambda engine: sizes[engine] / 1e6), na, na, ""),
        Row("save: pause → snapshot file written", "s", common.by_engine(save_s.__getitem__), na, na, ""),
        Row("restore: read + verify + unpack the file", "s", conode("read"), na, na, ""),
        Row("restore: decode RAM into guest memory", "s", conode("decode_ram"), na, na, ""),
        Row("restore total (read, decode, set_state)", "s", conode("restore"), na, na, ""),
        Row("restored → first output byte of the pending command", "s", conode("first_output"), na, na, ""),
        Row("resume → first output, in-process", "s", conode("in_process"), na, na, TARGET),
        Row("process launch → first output (+ Python start, imports)", "s", conode("launch"), na, na, ""),
    ]
    notes = [f"median of {reps} resumes per engine, each in a fresh process; each engine resumes its own "
             f"snapshot", FIRECRACKER]
    title = f"Resume from a post-boot snapshot ({'quick' if args.quick else 'full'})"
    return common.report("resume", title, args, rows, notes, refs,
                         extra={"samples": samples, "snapshot_bytes": sizes, "save_s": save_s})


if __name__ == "__main__":
    common.run_main(main)
