#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""The cost of a trap (syscall, page fault, IRQ) on each engine, qemu and natively; conode's Python passage.

Two measurements:

* **Per syscall and per fork+exec**, everywhere (conode fast, conode stock, qemu, native): the wall time of a
  syscall-heavy ``dd if=/dev/zero of=/dev/null bs=1 count=N`` divided by its 2N syscalls, and of a loop of
  fork+exec of /bin/true divided by its count. Under the fast engine exceptions and interrupts are delivered
  in C inside the engine (QEMU's own code), so the Python passage is never called and cannot be timed from
  Python: these whole-workload figures are its measure (an upper bound on delivery: they include the guest
  kernel's work and dd's own loop).
* **The Python passage by kind**, on the stock engine only, in a child process (CONODE_ENGINE=stock): while
  the real guest runs dd (syscalls), fork+exec (page faults) and a shell loop under the 100 Hz timer (IRQs),
  the passage's entry points, UnicornCpu._on_exception (Unicorn's interrupt hook: exceptions and int 0x80)
  and UnicornCpu.deliver_interrupt (external interrupts from the PIC, between slices), are wrapped — in that
  process only — with time.perf_counter_ns accounting. Only traps taken while the workload runs are counted.
  The hook's own entry and exit (Unicorn's C code calling into Python through ctypes) are outside the
  wrapper; their cost is measured separately with an empty hook on a bare Unicorn.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path

import common
from common import Row, Target

SYSCALL, PAGE_FAULT, IRQ, OTHER = "syscall (int 0x80)", "page fault (#PF)", "IRQ (PIC)", "other exceptions"
KINDS = (SYSCALL, PAGE_FAULT, IRQ, OTHER)
TARGET_PYTHON = Target.at_most("≤ 20 µs (Python passage)", 20.0, engines=("stock",))
TARGET_NATIVE = Target.at_most("≤ 5 µs (native delivery)", 5.0, engines=("fast",))
TARGET_FORK = Target.at_most("≤ 2 × qemu", 2.0, relative=True)


class TrapClock:
    """Wraps the passage's entry points and keeps per-kind durations (ns) while recording is on."""

    def __init__(self) -> None:
        self.samples: dict[str, list[int]] = defaultdict(list)
        self.recording = False

    def install(self) -> None:
        from conode.vm.cpu.unicorn_cpu import UnicornCpu

        clock = self
        on_exception = UnicornCpu._on_exception
        deliver_interrupt = UnicornCpu.deliver_interrupt
        now = time.perf_counter_ns

        def timed_exception(self: UnicornCpu, uc: object, vector: int, user_data: object) -> None:
            started = now()
            on_exception(self, uc, vector, user_data)
            if clock.recording:
                kind = SYSCALL if vector == 0x80 else PAGE_FAULT if vector == 14 else OTHER
                clock.samples[kind].append(now() - started)

        def timed_interrupt(self: UnicornCpu, vector: int) -> None:
            started = now()
            deliver_interrupt(self, vector)
            if clock.recording:
                clock.samples[IRQ].append(now() - started)

        # Unicorn's hook is bound when the CPU is built, so this must happen before the machine exists.
        UnicornCpu._on_exception = timed_exception  # type: ignore[method-assign]
        UnicornCpu.deliver_interrupt = timed_interrupt  # type: ignore[method-assign]

    def on_marker(self, name: str) -> None:
        if name.endswith(".start"):
            self.recording = True
        elif name.endswith(".end"):
            self.recording = False


def hook_round_trip_ns(count: int) -> float:
    """ns per Unicorn -> Python interrupt hook round trip (empty hook), over a loop of int 0x80."""
    import unicorn
    from unicorn import unicorn_const as uc_const

    def run(body: bytes, hooked: bool) -> int:
        # mov ecx, count; L: <body>; loop L
        code = b"\xb9" + count.to_bytes(4, "little") + body + bytes([0xE2, 0x100 - (len(body) + 2)])
        uc = unicorn.Uc(uc_const.UC_ARCH_X86, uc_const.UC_MODE_32)
        uc.mem_map(0x1000, 0x1000)
        uc.mem_write(0x1000, code)
        if hooked:
            uc.hook_add(uc_const.UC_HOOK_INTR, lambda uc, vector, user_data: None)
        started = time.perf_counter_ns()
        uc.emu_start(0x1000, 0x1000 + len(code))
        return time.perf_counter_ns() - started

    return (run(b"\xcd\x80", True) - run(b"\x90\x90", False)) / count


def passage_steps(sizes: common.Sizes) -> list[tuple[str, str]]:
    """dd (syscalls), fork+exec (page faults), a shell loop (timer IRQs): once each, in the guest."""
    by_name = {work.name: work for work in common.workloads(sizes)}
    chosen = [by_name["dd"], by_name["fork"], by_name["loop"]]
    return common.workload_steps(chosen, sizes, 1, common.GUEST_TMP, "/bin/true", common.GUEST_BUSYBOX,
                                 with_data=False)


def child(quick: bool) -> int:
    """The Python passage timed by kind, in this process (its parent chose the stock engine)."""
    sizes = common.Sizes.for_run(quick)
    steps = passage_steps(sizes)
    clock = TrapClock()
    clock.install()
    common.progress(f"{common.conode_label()}: running dd, fork+exec and a shell loop with the passage timed")
    stream, _ = common.conode_run_script(common.as_script(steps), on_marker=clock.on_marker)
    if not clock.samples.get(SYSCALL):
        raise common.BenchmarkError("no syscall went through the Python passage: is this the stock engine?")
    common.progress(f"{common.conode_label()}: measuring an empty Unicorn -> Python hook")
    loops = 20000 if quick else 200000
    round_trip_ns = common.median([hook_round_trip_ns(loops) for _ in range(3)])
    return common.child_emit({"samples": clock.samples, "round_trip_ns": round_trip_ns,
                              "workload_s": sum(stream.span(name) for name, _ in steps)})


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--child"]:
        return child(argv[1:2] == ["--quick"])
    args = common.parser(__doc__).parse_args(argv)
    refs = common.References.find()
    sizes = common.Sizes.for_run(args.quick)
    reps = 1 if args.quick else 3
    by_name = {work.name: work for work in common.workloads(sizes)}
    dd, fork = by_name["dd"], by_name["fork"]

    def make_steps(tmp: str, true: str, busybox: str) -> list[tuple[str, str]]:
        return common.workload_steps([dd, fork], sizes, reps, tmp, true, busybox, with_data=False)

    streams: dict[str, common.MarkerStream] = {}
    for place in common.available_places(refs):
        common.progress(f"{common.place_label(place)}: dd bs=1 and fork+exec x {reps}, per-trap estimates")
        streams[place] = common.run_on(place, make_steps, refs)

    rows = [
        Row.across(f"per syscall: dd bs=1 count={sizes.dd}, wall / {2 * sizes.dd}", dd.unit,
                   common.place_figures(streams, dd, reps), TARGET_NATIVE),
        Row.across(f"per fork+exec of /bin/true: {sizes.forks} in a shell loop, wall / {sizes.forks}",
                   fork.unit, common.place_figures(streams, fork, reps), TARGET_FORK),
    ]

    common.progress("conode stock: the Python passage, timed by kind (child process)")
    _, passage = common.run_child(Path(__file__), ["--quick"] if args.quick else [], engine="stock",
                                  timeout_s=3600)
    samples: dict[str, list[int]] = passage["samples"]

    def stock_only(value: common.Value) -> dict[str, common.Value]:
        return common.by_engine(lambda engine: value if engine == "stock" else "n/a (native)")

    total_ns = 0
    for kind in KINDS:
        values = samples.get(kind, [])
        total_ns += sum(values)
        if not values:
            if kind != OTHER:
                rows.append(Row(f"Python passage, {kind}: count", "", stock_only(0), "n/a", "n/a", ""))
            continue
        target = TARGET_PYTHON if kind != OTHER else ""
        rows += [
            Row(f"Python passage, {kind}: median", "µs", stock_only(common.median(values) / 1e3), "n/a",
                "n/a", target),
            Row(f"Python passage, {kind}: p90", "µs", stock_only(common.percentile(values, 0.9) / 1e3),
                "n/a", "n/a", ""),
            Row(f"Python passage, {kind}: count", "", stock_only(len(values)), "n/a", "n/a", ""),
        ]
    rows += [
        Row("share of the workload's wall time spent in the Python passage", "%",
            stock_only(100 * total_ns / 1e9 / passage["workload_s"]), "n/a", "n/a", ""),
        Row("Unicorn → Python hook round trip (empty hook; not in the above)", "µs",
            stock_only(passage["round_trip_ns"] / 1e3), "n/a", "n/a", ""),
    ]
    notes = [
        f"per-syscall and per-fork+exec rows: median of {reps} run(s), host wall time between markers, "
        f"each conode engine in its own process; they include the guest kernel's work, the shell loop "
        f"around them and, for dd, starting dd itself",
        "under the fast engine exceptions and IRQs are delivered in C inside the engine: the Python "
        "passage is not used (n/a (native)); the per-syscall row (a mean over dd's syscalls, kernel work "
        "included) is the measure of its trap delivery, an upper bound",
        "Python passage = conode's code from the entry of UnicornCpu._on_exception (syscalls, faults) or "
        "UnicornCpu.deliver_interrupt (IRQs) to its return, timed in a stock-engine process",
        f"Python passage: traps counted during the workload only ({passage['workload_s']:.2f} s of wall "
        f"time: dd, fork+exec, sh loop; the timing wrappers slow it)",
        "targets: trap delivery ≤ 5 µs median with native delivery (fast engine), ≤ 20 µs with the "
        "Python passage (stock engine); fork+exec of /bin/true ≤ 2 × qemu",
    ]
    title = (f"Trap cost: per syscall and fork+exec on each engine; the Python passage by kind "
             f"({'quick' if args.quick else 'full'})")
    return common.report("traps", title, args, rows, notes, refs,
                         extra={"counts": {k: len(v) for k, v in samples.items()}, "repetitions": reps})


if __name__ == "__main__":
    common.run_main(main)
