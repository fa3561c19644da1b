# SPDX-License-Identifier: GPL-2.0-or-later
"""conet across workstations: the guests of one job, each on an agent on its own test host, talk to each other
through the agents' switches over the test network (ZeroMQ with CURVE between the agents). Root only."""

from __future__ import annotations

import json
import re
import time

import psutil
import pytest
import testnet
from hostpool import slow_transfer, transfer_size

pytest_plugins = ["hostpool"]  # the fixtures network and pool_on_hosts
pytestmark = [pytest.mark.guest,
              pytest.mark.skipif(testnet.unavailable() is not None, reason=str(testnet.unavailable()))]

TRANSFER_BLOCKS = 32  # of 64 KiB: 2 MiB from rank 1 to rank 0

# Every rank runs the same command; $CONODE_RANK says which part it plays, $CONODE_HOSTS names them all.
THREE_RANKS = f"""
set -e
set -- $CONODE_HOSTS
echo "rank $CONODE_RANK of $CONODE_SIZE is $(hostname)"
# The agents' link comes up as the job starts, and busybox's ping sends only -c packets: wait for the first reply.
reach() {{ i=0; until ping -c 1 -W 1 "$1" >/dev/null; do i=$((i+1)); [ $i -lt 60 ] || return 1; done; }}
for peer in "$@"; do [ "$peer" = "$(hostname)" ] || {{ reach "$peer" && ping -c 2 -w 60 "$peer" | grep -o '2 packets received'; }}; done
case $CONODE_RANK in
0)  mkdir -p /tmp/www && echo "served by $(hostname)" > /tmp/www/index.html
    httpd -p 8080 -h /tmp/www
    mkfifo /tmp/quiet
    nc -l -p 5000 <>/tmp/quiet > /tmp/data
    sha256sum < /tmp/data | cut -c1-64
    nc -l -p 5001 <>/tmp/quiet
    sleep 2 ;;  # stay on the network while the connection closes: a guest whose job ended is unplugged
1)  dd if=/dev/urandom of=/tmp/data bs=64k count={TRANSFER_BLOCKS} 2>/dev/null
    sha256sum < /tmp/data | cut -c1-64
    until nc "$1" 5000 < /tmp/data; do sleep 0.5; done ;;
2)  until wget -q -O - "http://$1:8080/"; do sleep 0.5; done
    until echo done | nc -w 10 "$1" 5001; do sleep 0.5; done ;;
esac
"""


def wait_done(pool, job: int, timeout: float = 240) -> dict:
    return pool.wait_until(f"job {job} to end", lambda: (j := pool.jobs()[job])["state"] in (
        "done", "failed", "cancelled") and j, timeout=timeout)


def rank_output(pool, job: int, rank: int) -> str:
    return pool.cli("logs", str(job), "--rank", str(rank)).stdout.decode()


@pytest.mark.parametrize("pool_on_hosts", [3], indirect=True)
def test_a_three_guest_job_pings_transfers_and_serves_across_three_hosts(pool_on_hosts):
    pool = pool_on_hosts
    job = int(pool.cli("submit", "--guests", "3", "--", "sh", "-c", THREE_RANKS).stdout.strip())
    waited = pool.cli("wait", str(job), "--rank", "2", "--timeout", "240", check=False, timeout=260)
    assert waited.returncode == 0, waited.stderr
    state = wait_done(pool, job)
    outputs = [rank_output(pool, job, rank) for rank in range(3)]
    logs = "\n".join(line for a in ("a1", "a2", "a3") for line in pool.log(a).splitlines() if "conet" in line)
    assert state["state"] == "done" and state["exit_status"] == 0, (outputs, state["reason"], logs[-3000:])
    for rank, out in enumerate(outputs):
        assert f"rank {rank} of 3 is job{job}-{rank}" in out, out
        assert out.count("2 packets received") == 2, out  # it reached both other guests
    *_, received, word = outputs[0].split()
    sent = outputs[1].split()[-1]
    assert word == "done"  # rank 2 told it over nc
    assert re.fullmatch(r"[0-9a-f]{64}", sent) and received == sent, (outputs[0], outputs[1])
    assert f"served by job{job}-0" in outputs[2]
    nodes = {a: json.loads((pool.root / a / "status.json").read_text())["conet"] for a in ("a1", "a2", "a3")}
    assert all(n["endpoint"] for n in nodes.values()), nodes


def test_a_cut_link_during_a_transfer_restarts_the_job_and_it_completes(pool_on_hosts, network):
    pool = pool_on_hosts
    slow = """
set -e
set -- $CONODE_HOSTS
if [ $CONODE_RANK = 0 ]; then
  mkfifo /tmp/quiet; nc -l -p 5000 <>/tmp/quiet | wc -c
else
  i=0; until ping -c 1 -W 1 "$1" >/dev/null; do i=$((i+1)); [ $i -lt 60 ]; done  # the link comes up as the job starts
  until (i=0; while [ $i -lt 20 ]; do echo "line $i"; i=$((i+1)); sleep 0.5; done) | nc "$1" 5000; do sleep 0.5; done
fi
"""
    job = int(pool.cli("submit", "--guests", "2", "--", "sh", "-c", slow).stdout.strip())
    pool.wait_until("the transfer to start", lambda: pool.jobs()[job]["state"] == "running", timeout=120)
    time.sleep(4)
    network.cut(network.host("a1"))
    pool.wait_until("the coordinator to see a1 gone", lambda: "a1" not in pool.ready_nodes(), timeout=30)
    network.restore(network.host("a1"))
    state = wait_done(pool, job, timeout=300)
    assert state["state"] == "done" and state["exit_status"] == 0 and state["attempts"] >= 2, state
    assert rank_output(pool, job, 0).split()[-1] == str(sum(len(f"line {i}\n") for i in range(20)))
    for agent in ("a1", "a2"):
        assert pool.agents[agent].poll() is None, pool.log(agent)[-2000:]  # nothing crashed


RELAYED = f"""
set -e
set -- $CONODE_HOSTS
if [ $CONODE_RANK = 0 ]; then
  mkfifo /tmp/quiet; nc -l -p 5000 <>/tmp/quiet > /tmp/data
  sha256sum < /tmp/data | cut -c1-64
else
  i=0; until ping -c 1 -W 1 "$1" >/dev/null; do i=$((i+1)); [ $i -lt 60 ]; done  # the relay takes a moment
  ping -c 3 -w 30 "$1" | grep -o '3 packets received'
  dd if=/dev/urandom of=/tmp/data bs=64k count={TRANSFER_BLOCKS} 2>/dev/null
  sha256sum < /tmp/data | cut -c1-64
  until nc "$1" 5000 < /tmp/data; do sleep 0.5; done
fi
"""


def conet_status(pool, agent: str) -> dict:
    try:
        return json.loads((pool.root / agent / "status.json").read_text())["conet"]
    except (OSError, ValueError, KeyError):
        return {}


def test_agents_that_cannot_reach_each_other_talk_through_the_coordinators_relay(pool_on_hosts, network):
    pool = pool_on_hosts
    a1, a2 = network.host("a1"), network.host("a2")
    network.block(a1, a2)  # both still reach the coordinator's host
    job = int(pool.cli("submit", "--guests", "2", "--", "sh", "-c", RELAYED).stdout.strip())
    relayed: dict[str, dict] = {}

    def watch() -> dict | None:
        for agent, other in (("a1", "a2"), ("a2", "a1")):
            peer = conet_status(pool, agent).get("peers", {}).get(other)
            if peer and peer.get("relayed_tx_frames", 0) >= relayed.get(agent, {}).get("relayed_tx_frames", 0):
                relayed[agent] = peer
        state = pool.jobs()[job]
        return state if state["state"] in ("done", "failed", "cancelled") else None

    try:
        state = pool.wait_until(f"job {job} to end", watch, timeout=240)
    finally:
        outputs = [rank_output(pool, job, rank) for rank in range(2)]
        logs = "\n".join(line for a in ("a1", "a2") for line in pool.log(a).splitlines() if "conet" in line)
        print(outputs, logs[-5000:], relayed, sep="\n")
    assert state["state"] == "done" and state["exit_status"] == 0, (outputs, state["reason"])
    assert "3 packets received" in outputs[1]
    assert outputs[0].split()[-1] == outputs[1].split()[-1], outputs  # the data arrived whole
    for agent in ("a1", "a2"):  # each sent by the relay, and got the other's frames by it
        assert relayed[agent]["relayed"], relayed
        assert relayed[agent]["relayed_tx_frames"] > 0 and relayed[agent]["relayed_rx_frames"] > 0, relayed
    block_bytes = TRANSFER_BLOCKS * 64 * 1024
    counted = pool.status()["totals"]["conet_relay"]
    assert counted["frames"]["a1"] > 0 and counted["frames"]["a2"] > 0, counted
    assert sum(counted["bytes"].values()) >= block_bytes, counted  # the transfer went through the relay
    network.unblock(a1, a2)


# Both ranks meet on the network, then wait (in guest time) long enough for one of them to be vacated to disk and
# resumed; only then does rank 1 send rank 0 a word, which must cross the resumed guest's port.
AFTER_RESUME = """
set -- $CONODE_HOSTS
other=$1; [ $CONODE_RANK = 0 ] && other=$2
i=0; until ping -c 1 -W 1 "$other" >/dev/null; do i=$((i+1)); [ $i -lt 60 ] || exit 1; done
echo met
if [ $CONODE_RANK = 0 ]; then
  mkfifo /tmp/quiet; nc -l -p 5000 <>/tmp/quiet
else
  sleep 30
  i=0; until echo "word after resume" | nc "$other" 5000; do i=$((i+1)); [ $i -lt 120 ] || exit 1; sleep 1; done
fi
"""


def test_a_vacated_and_resumed_guest_is_on_the_network_again(network, tmp_path):
    # From the plugin (hostpool, which also puts tests/integration on the path): importable once pytest loaded it.
    from hostpool import COORDINATOR_HOST
    from pool import Pool
    from test_owner_cycle import agent_status, start_owner_aware_agent

    pool = Pool(tmp_path, host=network.host(COORDINATOR_HOST))
    try:
        pool.start_coordinator()
        owners = {name: start_owner_aware_agent(pool, name, host=network.host(name), vacate_after_s=1.5)
                  for name in ("a1", "a2")}
        for owner in owners.values():
            owner.left()
        pool.wait_until("2 ready nodes", lambda: sorted(pool.ready_nodes()) == ["a1", "a2"], timeout=120)
        job = int(pool.cli("submit", "--guests", "2", "--", "sh", "-c", AFTER_RESUME).stdout.strip())
        pool.wait_until("the ranks to meet", lambda: all("met" in rank_output(pool, job, r) for r in (0, 1)),
                        timeout=120)

        def still_working(condition):  # a1's owner is back and keeps typing while we wait
            owners["a1"].types()
            return condition()

        pool.wait_until("a1's guest to be vacated", lambda: still_working(
            lambda: agent_status(pool, "a1").get("vacated_jobs")), timeout=30, interval=0.2)
        owners["a1"].left()
        state = wait_done(pool, job, timeout=240)
        outputs = [rank_output(pool, job, rank) for rank in range(2)]
        assert state["state"] == "done" and state["exit_status"] == 0, (outputs, state["reason"])
        assert outputs[0].split()[-3:] == ["word", "after", "resume"], outputs
        assert state["attempts"] == 1  # resumed, not run again
        log = pool.log("a1")
        assert "resumes its vacated jobs" in log, log[-3000:]
    finally:
        pool.close()


FLOOD_S = 90  # how long the third guest floods (or, for the comparison, only keeps its CPU busy)
# Rank 0 floods its network's broadcast address from four pingers (frames of 8 KB as fast as they go; rank 1,
# on the other host, takes them all), or only spins; it says "started" first, and stops when cancelled.
LOAD = f"""
set -- $CONODE_HOSTS
if [ $CONODE_RANK = 0 ]; then
  eval $(ipcalc -b $(ip -4 -o addr show dev eth0 | awk '{{print $4}}'))
  echo started
  for i in 1 2 3 4; do
    if [ "$MODE" = flood ]; then ping -q -i 0.0001 -s 8000 -w {FLOOD_S} $BROADCAST >/dev/null 2>&1 &
    else timeout {FLOOD_S} sh -c 'while :; do :; done' & fi
  done
  wait
else
  sleep {FLOOD_S}
fi
"""
MEASURED_MIB = 8
MEASURE = f"""
set -- $CONODE_HOSTS
if [ $CONODE_RANK = 0 ]; then
  mkfifo /tmp/q; nc -l -p 5000 <>/tmp/q | wc -c
else
  dd if=/dev/zero of=/tmp/d bs=64k count={MEASURED_MIB * 16} 2>/dev/null
  i=0; until ping -c 1 -W 1 "$1" >/dev/null; do i=$((i+1)); [ $i -lt 60 ] || exit 1; done
  a=$(cut -d' ' -f1 /proc/uptime); until nc "$1" 5000 </tmp/d; do sleep 0.2; done
  b=$(cut -d' ' -f1 /proc/uptime); echo elapsed $a $b
fi
"""


def switch_process(pool, agent: str) -> psutil.Process:
    pid = re.findall(r"conet switch started \(pid (\d+)\)", pool.log(agent))[-1]
    return psutil.Process(int(pid))


def throughput_beside(pool, mode: str) -> tuple[float, dict]:
    """MiB/s between two guests on a1 and a2 while a third guest floods (or spins) to a fourth; and what the
    switches did meanwhile (CPU seconds and memory of each, and the busiest port's counters)."""
    load = int(pool.cli("submit", "--guests", "2", "--", "sh", "-c", f"MODE={mode}; {LOAD}").stdout.strip())
    pool.wait_until("the load to start", lambda: "started" in rank_output(pool, load, 0), timeout=120)
    switches = {agent: switch_process(pool, agent) for agent in ("a1", "a2")}
    cpu = {agent: sum(switch.cpu_times()[:2]) for agent, switch in switches.items()}
    job = int(pool.cli("submit", "--guests", "2", "--", "sh", "-c", MEASURE).stdout.strip())
    state = wait_done(pool, job, timeout=FLOOD_S)
    sender = rank_output(pool, job, 1)
    assert state["state"] == "done" and state["exit_status"] == 0, (sender, state["reason"])
    assert rank_output(pool, job, 0).split()[-1] == str(MEASURED_MIB << 20)
    assert pool.jobs()[load]["state"] == "running", "the load ended before the measurement did"
    start, end = map(float, re.search(r"elapsed ([\d.]+) ([\d.]+)", sender).groups())
    ports = [port for agent in ("a1", "a2") for port in conet_status(pool, agent).get("ports", {}).values()]
    seen = {"switch_cpu_s": {agent: sum(switch.cpu_times()[:2]) - cpu[agent] for agent, switch in switches.items()},
            "switch_rss_mib": {agent: switch.memory_info().rss / 2**20 for agent, switch in switches.items()},
            "busiest_port": max(ports, key=lambda port: port["rx_frames"], default={}), "seconds": end - start}
    pool.cli("cancel", str(load))
    wait_done(pool, load)
    return MEASURED_MIB / (end - start), seen


def test_a_flooding_guest_leaves_the_others_their_throughput_across_hosts(network, tmp_path):
    """The comparison is with a guest that only spins, so that both runs load the host's CPU alike and the
    difference is what the flood costs the switches and the link. (An emulated guest floods far below its
    port's limits; test_conet_switchd.py floods a switch at full speed to show the limits at work.)"""
    from hostpool import pool_across_hosts  # the plugin's: importable once pytest has loaded it

    pool = pool_across_hosts(network, tmp_path, ["a1", "a2"], "--cores", "2")
    try:
        spinning, calm = throughput_beside(pool, "spin")
        flooding, flood = throughput_beside(pool, "flood")
    finally:
        pool.close()
    print(f"beside a spinning guest {spinning:.2f} MiB/s ({calm}); beside a flooding one {flooding:.2f} MiB/s "
          f"({flood})")
    assert flooding >= 0.8 * spinning, (spinning, flooding, calm, flood)
    assert flood["busiest_port"]["rx_frames"] > calm["busiest_port"]["rx_frames"]  # it did flood
    for agent in ("a1", "a2"):  # what the flood cost each agent's switch stays bounded
        assert flood["switch_rss_mib"][agent] < 256, flood
        assert flood["switch_cpu_s"][agent] < flood["seconds"], flood


def test_a_link_that_goes_quiet_mid_transfer_moves_to_the_relay_and_the_transfer_completes(pool_on_hosts, network):
    pool = pool_on_hosts
    job = int(pool.cli("submit", "--guests", "2", "--", "sh", "-c", slow_transfer(40)).stdout.strip())
    pool.wait_until("the transfer to start", lambda: "linked" in rank_output(pool, job, 1), timeout=120)
    time.sleep(3)
    assert not conet_status(pool, "a1")["peers"]["a2"]["relayed"]  # straight, so far
    network.block(network.host("a1"), network.host("a2"))
    pool.wait_until("a1 to relay", lambda: conet_status(pool, "a1")["peers"]["a2"]["relayed"], timeout=30)
    state = wait_done(pool, job, timeout=120)
    assert state["state"] == "done" and state["attempts"] == 1, state  # the same guests: nothing restarted
    assert rank_output(pool, job, 0).split()[-1] == transfer_size(40)
