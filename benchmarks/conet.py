#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""conet: guest-to-guest TCP throughput and ping round trips, beside two qemu guests on a socket network.

conode, through the real pool (a coordinator and agents as separate processes, a job of two guests):
(a) both guests on one agent (its switch joins them), (b) each guest on an agent on its own test host (network
namespaces, root only; the switches talk CURVE over the test network). In each, rank 1 pings rank 0 and sends
it a file of zeros through busybox ``nc``; rank 0 writes what it receives to a file in its tmpfs and counts
the bytes once the transfer is over (counting them as they come, through a pipe into ``wc -c``, cost the
receiving guest more CPU in ``wc`` than in the whole network path: the figure measured busybox). The time is
taken in the sending guest (``/proc/uptime``), from the connection to the receiver's close after the last byte,
so it is the guests' own view. The agents' CPU per MiB carried (switches and workers, from /proc) is reported.
Reference: two qemu-system-i386 (TCG) guests on the same kernel and initramfs, each with a virtio-net-pci NIC,
joined by qemu's socket netdev, running the same commands, at the niceness conode's guest workers give
themselves (19: the owner's programs come first). At niceness 0 against workers at 19, a loaded host measured
its scheduler: every wake-up of a guest thread waited behind everything else, qemu's did not.

The host is shared, and its load moves every figure (qemu's by a factor of three between runs): the three
measurements alternate, round after round (``--rounds``, 3 by default), so that load falls on all alike, and
each figure is the median of its rounds; every round's figures and the host's load average are in the notes.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from pathlib import Path

import psutil

import common
from conode.agent.platform import POSIX_NICENESS
from conode.limits import CONET_MTU
from common import Row, Target

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests" / "integration"), str(HERE.parent / "tests" / "multihost")]

THROUGHPUT = Target.at_most("≥ qemu's", 1.0, relative=True)  # judged on seconds per MiB: lower is better
RTT = Target.at_most("≤ 2× qemu's", 2.0, relative=True)

# Rank 1 sends, rank 0 receives; the same lines run in qemu's guests at their shell prompt.
RECEIVE = "mkfifo /tmp/q; nc -l -p 5000 <>/tmp/q >/tmp/r; wc -c </tmp/r; rm /tmp/r"
SEND = ("dd if=/dev/zero of=/tmp/d bs=64k count={blocks} 2>/dev/null || echo 'no room for /tmp/d'; ping -c 5 -i 0.3 {peer} | tail -1; "
        "a=$(cut -d' ' -f1 /proc/uptime); until nc {peer} 5000 </tmp/d; do sleep 0.2; done; "
        "b=$(cut -d' ' -f1 /proc/uptime); echo elapsed $a $b")
GANG = "set -- $CONODE_HOSTS; if [ $CONODE_RANK = 0 ]; then {receive}; else {send}; fi"


def parse(output: str, mib: int) -> tuple[float, float]:
    """(seconds per MiB, average ping RTT in ms) from the sender's output."""
    rtt = re.search(r"min/avg/max = [\d.]+/([\d.]+)/", output)
    elapsed = re.search(r"elapsed ([\d.]+) ([\d.]+)", output)
    if "no room for /tmp/d" in output:  # tmpfs is the guest's memory: a short file would be sent as if whole
        raise common.BenchmarkError(f"the sender's guest could not hold the {mib} MiB to send; give it more memory")
    if rtt is None or elapsed is None:
        raise common.BenchmarkError(f"the sender did not report its figures: {output[-400:]!r}")
    return (float(elapsed.group(2)) - float(elapsed.group(1))) / mib, float(rtt.group(1))


def agent_cpu_s(pool) -> float:
    """CPU seconds used so far by the agents and everything they started (switches, workers)."""
    total = 0.0
    for process in pool.agents.values():
        try:
            parent = psutil.Process(process.pid)
            for p in [parent, *parent.children(recursive=True)]:
                times = p.cpu_times()
                total += times.user + times.system
        except psutil.Error:
            pass
    return total


def conode_pair(pool, mib: int) -> dict[str, float]:
    command = GANG.format(receive=RECEIVE, send=SEND.format(blocks=mib * 16, peer="$1"))
    before = agent_cpu_s(pool)
    job = int(pool.cli("submit", "--guests", "2", "--", "sh", "-c", command).stdout.strip())
    state = pool.wait_until(f"job {job}", lambda: (j := pool.jobs()[job])["state"] in ("done", "failed") and j,
                            timeout=600)
    received = pool.cli("logs", str(job), "--rank", "0").stdout.decode()
    sent = pool.cli("logs", str(job), "--rank", "1").stdout.decode()
    if state["state"] != "done" or received.split()[-1:] != [str(mib << 20)]:
        raise common.BenchmarkError(f"the transfer failed: {state['reason']}; received {received[-200:]!r}")
    s_per_mib, rtt = parse(sent, mib)
    return {"s_per_mib": s_per_mib, "rtt_ms": rtt, "cpu_ms_per_mib": (agent_cpu_s(pool) - before) * 1000 / mib}


def one_agent(mib: int) -> dict[str, float]:
    from pool import Pool, free_port

    with tempfile.TemporaryDirectory(prefix="conode-bench-conet-") as root:
        pool = Pool(Path(root))
        try:
            pool.start_coordinator()
            pool.add_agent("w1", "--owner", "away", "--cores", "2", "--conet-listen",
                           f"tcp://127.0.0.1:{free_port()}")
            pool.wait_until("the agent's guests", lambda: pool.ready_nodes() == ["w1"], timeout=300)
            return conode_pair(pool, mib)
        finally:
            pool.close()


def two_hosts(mib: int) -> dict[str, float] | str:
    from hostpool import pool_across_hosts
    from testnet import TestNetwork, unavailable

    reason = unavailable()
    if reason is not None:
        return reason
    with TestNetwork() as net, tempfile.TemporaryDirectory(prefix="conode-bench-conet-") as root:
        pool = pool_across_hosts(net, Path(root), ["a1", "a2"])
        try:
            return conode_pair(pool, mib)
        finally:
            pool.close()


def qemu_pair(qemu: str, mib: int) -> dict[str, float]:
    port = common.free_port()
    guests = []
    try:
        for n, role in enumerate((f"listen=127.0.0.1:{port}", f"connect=127.0.0.1:{port}")):
            guest = common.QemuGuest(qemu, extra_args=[
                "-netdev", f"socket,id=n0,{role}", "-device",
                f"virtio-net-pci,netdev=n0,disable-legacy=on,mac=02:c0:de:00:00:0{n + 1}"], append="pci=conf1",
                niceness=POSIX_NICENESS)
            guest.launch()
            guests.append(guest)
            time.sleep(0.5)  # the listening side first
        for n, guest in enumerate(guests):
            guest.wait_prompt()
            guest.run_marked(f"net{n}", f"ip addr add 10.213.0.{n + 1}/16 dev eth0 && ip link set eth0 up")
        receiver, sender = guests
        receiver.send(RECEIVE)
        sender.run_marked("send", SEND.format(blocks=mib * 16, peer="10.213.0.1"), timeout=600)
        s_per_mib, rtt = parse(sender.out.between("send"), mib)
        return {"s_per_mib": s_per_mib, "rtt_ms": rtt}
    finally:
        for guest in guests:
            guest.close()


def medians(rounds: list[dict[str, float] | str]) -> dict[str, float] | str:
    """Each figure's median over the measured rounds, or why none was measured."""
    measured = [figures for figures in rounds if isinstance(figures, dict)]
    if not measured:
        return rounds[0] if rounds else "not measured"
    return {key: common.median([figures[key] for figures in measured]) for key in measured[0]}


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the three measurements")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    refs = common.References.find()
    mib = 4 if args.quick else 32
    rounds = 1 if args.quick else max(1, args.rounds)
    engine = os.environ.get("CONODE_ENGINE") or ("fast" if common.engine_runs("fast") else "stock")
    runs: dict[str, list] = {"one agent": [], "two hosts": [], "qemu": []}
    loads: list[str] = []
    for n in range(rounds):
        loads.append(" ".join(f"{load:.1f}" for load in os.getloadavg()))
        common.progress(f"round {n + 1}/{rounds} (load {loads[-1]})")
        common.progress(f"conode ({engine} engine): two guests on one agent, {mib} MiB")
        runs["one agent"].append(one_agent(mib))
        common.progress(f"conode: two guests on two agents on two test hosts, {mib} MiB")
        runs["two hosts"].append(two_hosts(mib))
        if refs.qemu is not None:
            common.progress(f"qemu: two guests joined by a socket netdev, {mib} MiB")
            runs["qemu"].append(qemu_pair(refs.qemu, mib))
    same, across = medians(runs["one agent"]), medians(runs["two hosts"])
    reference = medians(runs["qemu"]) if runs["qemu"] else None

    def row(metric: str, unit: str, figures: dict | str, key: str, target: Target | str = "") -> Row:
        value = figures[key] if isinstance(figures, dict) else "n/a"
        ref = reference.get(key) if isinstance(reference, dict) else None
        return Row(metric, unit, {engine: value}, ref, None, target)

    rows = [
        row("TCP, two guests on one agent: time per MiB", "s", same, "s_per_mib", THROUGHPUT),
        row("ping RTT, two guests on one agent", "ms", same, "rtt_ms", RTT),
        row("agent CPU per MiB carried, one agent", "ms", same, "cpu_ms_per_mib"),
        row("TCP, guests on two agents on two hosts: time per MiB", "s", across, "s_per_mib", THROUGHPUT),
        row("ping RTT, guests on two agents on two hosts", "ms", across, "rtt_ms", RTT),
        row("agents' CPU per MiB carried, two agents", "ms", across, "cpu_ms_per_mib"),
    ]
    notes = [f"{mib} MiB through busybox nc, conet MTU {CONET_MTU} (qemu 1500); throughput is 1 / (time per MiB); "
             f"medians of {rounds} alternating rounds; qemu at niceness {POSIX_NICENESS}, as conode's guest workers"]
    if isinstance(across, str):
        notes.append(f"two hosts: not measured ({across})")
    for label, figures in runs.items():
        each = [f"{1 / f['s_per_mib']:.1f}" for f in figures if isinstance(f, dict)]
        rtts = [f"{f['rtt_ms']:.1f}" for f in figures if isinstance(f, dict)]
        if each:
            notes.append(f"{label}: MiB/s by round {' '.join(each)}; RTT ms {' '.join(rtts)}")
    notes.append(f"host load average (1, 5, 15 min) at each round's start: {'; '.join(loads)}")
    return common.report("conet", "conet: guest-to-guest network", args, rows, notes, refs,
                         extra={"one_agent": runs["one agent"], "two_hosts": runs["two hosts"], "qemu": runs["qemu"],
                                "loads": loads})


if __name__ == "__main__":
    common.run_main(main)
