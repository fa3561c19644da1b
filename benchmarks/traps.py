#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""The cost of one trap in conode's passage, by kind: syscall (int 0x80), page fault (#PF), IRQ.

Measured on the host, in this process, while the real guest runs a workload that makes many of each kind
(dd with bs=1 for syscalls, fork+exec for page faults, a shell loop under the 100 Hz timer for IRQs): the
passage's entry points, UnicornCpu._on_exception (Unicorn's interrupt hook: exceptions and int 0x80) and
UnicornCpu.deliver_interrupt (external interrupts from the PIC, between slices), are wrapped — in this
process only — with time.perf_counter_ns accounting. Only traps taken while the workload runs are counted.

The hook's own entry and exit (Unicorn's C code calling into Python through ctypes) are outside the wrapper;
their cost is measured separately with an empty hook on a bare Unicorn. For qemu and natively, the per-syscall
figure is the dd workload's wall time divided by its 2 x count syscalls (the same figure for conode is shown).
"""

from __future__ import annotations

import time
from collections import defaultdict

import common
from common import Row

SYSCALL, PAGE_FAULT, IRQ, OTHER = "syscall (int 0x80)", "page fault (#PF)", "IRQ (PIC)", "other exceptions"
KINDS = (SYSCALL, PAGE_FAULT, IRQ, OTHER)
TARGET = "≤ 20 µs py / ≤ 5 µs native"


class TrapClock:
    """Wraps the passage's entry points and keeps per-kind durations (ns) while recording is on."""

    def __init__(self) -> None:
        self.samples: dict[str, list[int]] = defaultdict(list)
        self.recording = False

    def install(self) -> None:
        from conode.vm.cpu import UnicornCpu

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


def main(argv: list[str] | None = None) -> int:
    args = common.parser(__doc__).parse_args(argv)
    refs = common.References.find()
    sizes = common.Sizes.for_run(args.quick)
    by_name = {work.name: work for work in common.workloads(sizes)}
    chosen = [by_name["dd"], by_name["fork"], by_name["loop"]]
    dd = by_name["dd"]

    def make_steps(tmp: str, true: str, busybox: str) -> list[tuple[str, str]]:
        return common.workload_steps(chosen, sizes, 1, tmp, true, busybox, with_data=False)

    clock = TrapClock()
    clock.install()
    common.progress("conode: running dd, fork+exec and a shell loop with the passage timed")
    stream = common.run_on("conode", make_steps, refs, on_marker=clock.on_marker)
    workload_s = sum(stream.span(f"{work.name}.0") for work in chosen)
    common.progress("conode: measuring an empty Unicorn -> Python hook")
    loops = 20000 if args.quick else 200000
    round_trip_us = common.median([hook_round_trip_ns(loops) for _ in range(3)]) / 1e3

    def dd_only(tmp: str, true: str, busybox: str) -> list[tuple[str, str]]:
        return common.workload_steps([dd], sizes, 1, tmp, true, busybox, with_data=False)

    per_syscall: dict[str, common.Value] = {"conode": dd.figure(stream.span("dd.0"))}
    for engine, path in (("qemu", refs.qemu), ("native", refs.busybox)):
        if path is None:
            per_syscall[engine] = "missing"
            continue
        common.progress(f"{engine}: dd bs=1 for the per-syscall estimate")
        per_syscall[engine] = dd.figure(common.run_on(engine, dd_only, refs).span("dd.0"))

    rows = []
    total_ns = 0
    for kind in KINDS:
        values = clock.samples.get(kind, [])
        total_ns += sum(values)
        if not values:
            if kind != OTHER:
                rows.append(Row(f"{kind}: count", "", 0, "n/a", "n/a", ""))
            continue
        target = TARGET if kind != OTHER else ""
        rows += [
            Row(f"{kind}: median", "µs", common.median(values) / 1e3, "n/a", "n/a", target),
            Row(f"{kind}: p90", "µs", common.percentile(values, 0.9) / 1e3, "n/a", "n/a", ""),
            Row(f"{kind}: count", "", len(values), "n/a", "n/a", ""),
        ]
    rows += [
        Row("share of workload wall time spent in the passage", "%", 100 * total_ns / 1e9 / workload_s,
            "n/a", "n/a", ""),
        Row("Unicorn → Python hook round trip (empty hook; not in the above)", "µs", round_trip_us,
            "n/a", "n/a", ""),
        Row(f"per syscall, whole dd bs=1 count={sizes.dd} (wall / {2 * sizes.dd})", "µs",
            per_syscall["conode"], per_syscall["qemu"], per_syscall["native"], ""),
    ]
    notes = [
        "passage = conode's code from the entry of UnicornCpu._on_exception (syscalls, faults) or "
        "UnicornCpu.deliver_interrupt (IRQs) to its return",
        f"traps counted during the workload only ({workload_s:.2f} s of wall time: dd, fork+exec, sh loop)",
        "targets: ≤ 20 µs median for the pure-Python passage, ≤ 5 µs for a native one",
    ]
    title = f"Trap cost in conode's passage ({'quick' if args.quick else 'full'})"
    return common.report("traps", title, args, rows, notes, refs,
                         extra={"counts": {k: len(v) for k, v in clock.samples.items()}})


if __name__ == "__main__":
    common.run_main(main)
