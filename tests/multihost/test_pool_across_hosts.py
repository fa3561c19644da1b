# SPDX-License-Identifier: GPL-2.0-or-later
"""A real pool spread over test hosts: the coordinator on one, each agent on its own, talking over the test
network (tests/multihost/testnet.py) and nothing else. Root only; skipped elsewhere with the reason."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import psutil
import pytest
import testnet

from conode.cluster.protocol import HEARTBEAT_INTERVAL_S, HEARTBEAT_LIVENESS, RECONNECT_MAX_S
from coordinator.server import HOUSEKEEPING_EVERY_S

pytest_plugins = ["hostpool"]  # the fixtures network and pool_on_hosts
pytestmark = [pytest.mark.guest,
              pytest.mark.skipif(testnet.unavailable() is not None, reason=str(testnet.unavailable()))]

SILENCE_LIMIT_S = HEARTBEAT_INTERVAL_S * HEARTBEAT_LIVENESS  # the coordinator's patience with a silent node
SLACK_S = 1.0  # the coordinator's loop on a busy machine


def peers_of(host) -> set[str]:
    """The addresses *host* has established TCP connections with."""
    lines = host.run(["ss", "-Htn", "state", "established"], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1].rsplit(":", 1)[0] for line in lines.splitlines() if line.strip()}


def still_running(pid: int, started: float) -> bool:
    """Whether the process *pid* that started at *started* still runs (not a later process with its pid)."""
    try:
        process = psutil.Process(pid)
        return process.create_time() == started and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def logged_at(log: str, text: str) -> float:
    """The time (seconds since the epoch) of the first log line containing *text*."""
    line = next(line for line in log.splitlines() if text in line)
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()  # logging's local-time stamp


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
    cut_at = time.time()
    pool.wait_until("a1 to be lost", lambda: "a1" not in node_names(pool), timeout=30, interval=0.2)
    # Its last beat came at most one interval before the cut; the coordinator gives up one limit after it.
    lost_after = logged_at(pool.log("coordinator"), "node a1 lost: missed its heartbeats") - cut_at
    assert SILENCE_LIMIT_S - HEARTBEAT_INTERVAL_S <= lost_after <= SILENCE_LIMIT_S + HOUSEKEEPING_EVERY_S + SLACK_S

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
    assert pool.log("a1").count("joined the pool") == 2 and "reconnecting" in pool.log("a1")
    # The job a1 still held when it came back was cancelled there, not reported twice.
    assert pool.jobs()[job]["attempts"] == 2 and pool.cli("logs", str(job)).stdout == b"finished\n"


FAILING_TEST = '''
import json

import psutil


def test_fails_half_way(pool_on_hosts, network):
    pool_on_hosts.submit("sh", "-c", "sleep 600")
    # A process that leaves its process group, as a daemon would: only the namespace still knows it.
    network.hosts["a1"].spawn(["sh", "-c", "setsid sleep 600 & sleep 600"])
    pool_on_hosts.wait_until("the job to run", lambda: pool_on_hosts.jobs()[1]["state"] == "running", 60)
    seen = {name: [(pid, psutil.Process(pid).create_time()) for pid in host.pids()]
            for name, host in network.hosts.items()}
    with open(RECORD, "w") as f:
        json.dump({"namespaces": [h.namespace for h in network.hosts.values()] + [network.switch],
                   "processes": seen}, f)
    assert False, "a test that fails half-way"
'''


def test_a_test_failing_half_way_leaves_no_namespace_and_no_process(tmp_path):
    """The fixtures clean up after a failing test: every namespace deleted, every process in them gone."""
    here = Path(__file__).resolve().parent
    record = tmp_path / "seen.json"
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "conftest.py").write_text(f"import sys\nsys.path.insert(0, {str(here)!r})\n"
                                       "from hostpool import network, pool_on_hosts  # noqa: F401\n")
    (inner / "test_inner.py").write_text(FAILING_TEST.replace("RECORD", repr(str(record))))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(inner)],
                          cwd=inner, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 1 and "a test that fails half-way" in done.stdout, done.stdout[-3000:]

    seen = json.loads(record.read_text())
    processes = [tuple(p) for host in seen["processes"].values() for p in host]
    assert len(seen["processes"]["a1"]) >= 4  # the agent, its guest worker, and the runaway sleeps
    assert len(processes) >= 7
    assert not set(seen["namespaces"]) & set(testnet.namespaces())
    assert not [pid for pid, started in processes if still_running(pid, started)]
