# SPDX-License-Identifier: GPL-2.0-or-later
"""A real pool spread over test hosts: the coordinator on one, each agent on its own, talking over the test
network (tests/multihost/testnet.py) and nothing else. Root only; skipped elsewhere with the reason."""

from __future__ import annotations

import time

import pytest

from conode.cluster.protocol import HEARTBEAT_INTERVAL_S, HEARTBEAT_LIVENESS, RECONNECT_MAX_S

pytestmark = pytest.mark.guest

SILENCE_LIMIT_S = HEARTBEAT_INTERVAL_S * HEARTBEAT_LIVENESS  # the coordinator's patience with a silent node
SLACK_S = 2.0  # housekeeping's period, a status round trip and a busy machine


def peers_of(host) -> set[str]:
    """The addresses *host* has established TCP connections with."""
    lines = host.run(["ss", "-Htn", "state", "established"], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1].rsplit(":", 1)[0] for line in lines.splitlines() if line.strip()}


def node_names(pool) -> list[str]:
    return [n["name"] for n in pool.status()["nodes"]]


def test_two_agents_on_two_hosts_join_and_run_jobs(pool_on_hosts, network):
    pool = pool_on_hosts
    coord, a1, a2 = network.hosts["coord"], network.hosts["a1"], network.hosts["a2"]
    assert len({coord.address, a1.address, a2.address}) == 3
    assert pool.endpoint.startswith(f"tcp://{coord.address}:")
    assert {a1.address, a2.address} <= peers_of(coord)  # the agents came over the test network
    table = pool.cli("status").stdout.decode()
    assert "a1" in table and "a2" in table and "pool: 2 nodes" in table

    jobs = {i: pool.submit("sh", "-c", f"sleep 1; echo job-{i} says $(( {i} * 7 ))") for i in range(2)}
    for i, job in jobs.items():
        assert pool.cli("wait", str(job), "--timeout", "60", check=False, timeout=90).returncode == 0
        assert pool.cli("logs", str(job)).stdout == f"job-{i} says {i * 7}\n".encode()
    assert {pool.jobs()[job]["node"] for job in jobs.values()} == {"a1", "a2"}  # one core each: both ran one


def test_a_cut_link_loses_the_node_requeues_its_job_and_the_node_comes_back(pool_on_hosts, network):
    pool = pool_on_hosts
    a1 = network.hosts["a1"]
    pool.cli("drain", "a2")  # the job must start on a1, the host about to be cut off
    job = pool.submit("sh", "-c", "sleep 5; echo finished")
    pool.wait_until("the job to run on a1", lambda: pool.jobs()[job]["state"] == "running", timeout=30)
    assert pool.jobs()[job]["node"] == "a1"
    pool.cli("drain", "a2", "--undo")

    network.cut(a1)
    cut_at = time.monotonic()
    pool.wait_until("a1 to be lost", lambda: "a1" not in node_names(pool), timeout=SILENCE_LIMIT_S + SLACK_S,
                    interval=0.1)
    lost_after = time.monotonic() - cut_at
    assert lost_after <= SILENCE_LIMIT_S + SLACK_S
    assert "node a1 lost: missed its heartbeats" in pool.log("coordinator")

    # Per the coordinator's policy a lost node's job is queued again and placed on a node that is there.
    assert pool.cli("wait", str(job), "--timeout", "60", check=False, timeout=90).returncode == 0
    final = pool.jobs()[job]
    assert final["node"] == "a2" and final["attempts"] == 2
    assert pool.cli("logs", str(job)).stdout == b"finished\n"

    network.restore(a1)
    restored_at = time.monotonic()
    pool.wait_until("a1 to come back", lambda: "a1" in pool.ready_nodes(), timeout=RECONNECT_MAX_S + 20)
    print(f"node lost {lost_after:.1f} s after the cut; back {time.monotonic() - restored_at:.1f} s after restore")
    assert pool.coordinator.poll() is None
    assert all(p.poll() is None for p in pool.agents.values())
    assert "Traceback" not in pool.log("coordinator") + pool.log("a1") + pool.log("a2")
    # The job a1 still held when it came back was cancelled there, not reported twice.
    assert pool.jobs()[job]["attempts"] == 2 and pool.cli("logs", str(job)).stdout == b"finished\n"
