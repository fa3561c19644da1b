#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Cold boot to a ready guest: conode (fast and stock engines) vs qemu-system-i386, same kernel and initrd.

conode: each boot in a fresh Python process, on each engine (CONODE_ENGINE set for the child); measured from
the start of the boot inside the process (image load, machine construction, kernel load, run) to the in-guest
agent's READY frame, and from the process's launch (interpreter start and imports included). qemu: from the
launch of qemu-system-i386 to the first shell prompt on the serial port. Under qemu the agent finds no host
channel and keeps retrying /dev/hvc0 before it starts that shell; the wait is measured inside the guest and
also shown subtracted, which is the point comparable to conode's READY. Median of several boots.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import common
from common import Row, Target

TARGET = Target.at_most("≤ 1.5 s", 1.5)
USER_HZ = 100  # the unit of start times in /proc/PID/stat on i386
# In the qemu guest, at the prompt: wall clock, uptime, the shell's start (ticks since boot), and when /init
# mounted /run (its last mount before it execs the agent: the tmpfs root's ctime).
GUEST_STARTS = ("echo $EPOCHREALTIME $(cut -d' ' -f1 /proc/uptime) $(cut -d' ' -f22 /proc/$$/stat) "
                "$(stat -c %z /run)")


def agent_wait(report: str) -> float:
    """Seconds from /init's last mount to the shell's start, from GUEST_STARTS's output.

    Under qemu there is no /dev/hvc0: the agent retries opening it before it starts the serial shell, so
    this is the part of qemu's time to the prompt that conode's READY does not contain.
    """
    wall, uptime, shell_ticks, day, clock, _zone = report.split()
    booted_at = float(wall) - float(uptime)
    seconds, _, fraction = clock.partition(".")
    mounted = datetime.strptime(f"{day} {seconds}", "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
    mounted_at = mounted.timestamp() + float(f"0.{fraction or 0}")
    return int(shell_ticks) / USER_HZ - (mounted_at - booted_at)


def child() -> int:
    """One conode cold boot in this (fresh) process; prints the times as JSON on stdout."""
    started = time.monotonic()
    cpu_started = time.process_time()
    cpu_at_ready: list[float] = []
    output = common.MarkerStream()

    def on_progress(line: str) -> None:
        if line.startswith("guest ready"):
            cpu_at_ready.append(time.process_time() - cpu_started)

    session = common.conode_boot(output, on_progress=on_progress)
    session.start(["true"])  # type: ignore[attr-defined]
    status = session.run()  # type: ignore[attr-defined]
    return common.child_emit({"started": started, "ready_at": session.ready_at,  # type: ignore[attr-defined]
                              "status": status, "cpu_s": cpu_at_ready[0] if cpu_at_ready else None})


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--child"]:
        return child()
    args = common.parser(__doc__).parse_args(argv)
    refs = common.References.find()
    reps = 2 if args.quick else 5

    engines = common.conode_engines()
    in_process: dict[str, list[float]] = {engine: [] for engine in engines}
    from_launch: dict[str, list[float]] = {engine: [] for engine in engines}
    cpu: dict[str, list[float]] = {engine: [] for engine in engines}
    for rep in range(reps):  # the engines alternate, so a slow spell of the host does not fall on one only
        for engine in engines:
            common.progress(f"conode {engine}: cold boot {rep + 1}/{reps} (fresh process)")
            launched, times = common.run_child(Path(__file__), [], engine=engine)
            if times["ready_at"] is None or times["status"] != 0:
                raise common.BenchmarkError(f"conode {engine} boot {rep + 1} did not reach READY: {times}")
            in_process[engine].append(times["ready_at"] - times["started"])
            from_launch[engine].append(times["ready_at"] - launched)
            cpu[engine].append(times["cpu_s"])
            common.progress(f"conode {engine}: READY {in_process[engine][-1]:.3f} s after boot start, "
                            f"{from_launch[engine][-1]:.3f} s after process launch")

    def conode(samples: dict[str, list[float]]) -> dict[str, common.Value]:
        return common.by_engine(lambda engine: common.median(samples[engine]))

    prompt, agent, hvc_wait = [], [], []
    if refs.qemu is not None:
        for rep in range(reps):
            common.progress(f"qemu: cold boot {rep + 1}/{reps}")
            guest = common.QemuGuest(refs.qemu)
            try:
                launched = guest.launch()
                agent_at, _ = guest.wait_for_bytes(common.QEMU_AGENT_LINE, 300)
                prompt_at = guest.wait_prompt(300)
                guest.run_marked("starts", GUEST_STARTS)
                hvc_wait.append(agent_wait(guest.out.between("starts")))
            finally:
                guest.close()
            agent.append(agent_at - launched)
            prompt.append(prompt_at - launched)
            common.progress(f"qemu: agent up {agent[-1]:.3f} s, prompt {prompt[-1]:.3f} s after launch; "
                            f"/init's last mount → shell start {hvc_wait[-1]:.2f} s in the guest")

    qemu_prompt = common.median(prompt) if prompt else common.place_cell("qemu")
    qemu_ready = (common.median([p - w for p, w in zip(prompt, hvc_wait)]) if prompt
                  else common.place_cell("qemu"))
    rows = [
        Row("boot → ready, as measured (conode: READY; qemu: shell prompt)", "s", conode(in_process),
            qemu_prompt, "n/a", ""),
        Row("boot → ready, qemu less the agent's wait for /dev/hvc0 (*)", "s", conode(in_process),
            qemu_ready, "n/a", TARGET),
        Row("process launch → ready (conode: + Python start, imports; qemu: as (*))", "s",
            conode(from_launch), qemu_ready, "n/a", ""),
        Row("conode: process CPU time, boot start → READY", "s", conode(cpu), None, "n/a", ""),
    ]
    ranges = [f"conode {engine} {min(values):.2f}–{max(values):.2f} s"
              for engine, values in in_process.items()]
    if prompt:
        ranges.append(f"qemu (as measured) {min(prompt):.2f}–{max(prompt):.2f} s")
    notes = [
        f"median of {reps} cold boots each; conode boots in a fresh process every time, the engines in turn; "
        f"range of the boot → ready times: {', '.join(ranges)}",
        "conode's boot start = just before the image is loaded (after imports); qemu's = its launch "
        "(SeaBIOS included)",
        "(*) under qemu there is no host channel: the agent retries opening /dev/hvc0 before it starts the "
        "shell; that wait is measured in the guest (from /init's mount of /run to the shell's start in "
        "/proc/PID/stat, 10 ms ticks) and subtracted: "
        + (", ".join(f"{w:.2f} s" for w in hvc_wait) if hvc_wait else "not measured"),
    ]
    title = f"Cold boot ({'quick' if args.quick else 'full'})"
    samples = {"conode_in_process": in_process, "conode_from_launch": from_launch, "conode_cpu": cpu,
               "qemu_prompt": prompt, "qemu_agent": agent, "qemu_hvc0_wait": hvc_wait}  # conode: per engine
    return common.report("boot", title, args, rows, notes, refs, extra={"samples": samples})


if __name__ == "__main__":
    common.run_main(main)
