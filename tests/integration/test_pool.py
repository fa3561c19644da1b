"""The pool end to end: a coordinator and three agents as separate processes, each booting a real guest.

The tests share one pool and run in order: normal work first, then the coordinator is killed and restarted,
then an agent is killed in the middle of a job.
"""

import hashlib
import json
import os
import signal

import pytest
from pool import Pool

pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    with Pool.running(tmp_path_factory.mktemp("pool"), ("node-a", "node-b", "node-c")) as pool:
        yield pool


def test_status_shows_the_nodes_capacity(pool):
    status = pool.status()
    assert sorted(n["name"] for n in status["nodes"]) == ["node-a", "node-b", "node-c"]
    assert all(n["state"] == "Unclaimed" and n["cores"] == 1 and n["mem_mib"] == 128 for n in status["nodes"])
    assert status["totals"]["cores"] == 3
    table = pool.cli("status").stdout.decode()
    assert "node-b" in table and "pool: 3 nodes" in table


def test_ten_jobs_complete_with_outputs(pool, tmp_path):
    jobs = {}
    for i in range(10):
        data = tmp_path / f"in{i}.txt"
        data.write_text(f"payload {i}\n" * (i + 1))
        script = (f"sha256sum in{i}.txt | cut -d' ' -f1 > sum.txt; wc -l < in{i}.txt > lines.txt; "
                  f"echo job-{i} says $(( {i} * {i} )); echo to-stderr-{i} >&2; exit {i % 3}")
        jobs[i] = pool.submit("sh", "-c", script, inputs=(data,), outputs=("sum.txt", "lines.txt"))
    for i, job in jobs.items():
        result = pool.cli("wait", str(job), "--timeout", "240", check=False, timeout=300)
        assert result.returncode == i % 3, result.stderr.decode()
        logs = pool.cli("logs", str(job))
        assert logs.stdout == f"job-{i} says {i * i}\n".encode()
        assert logs.stderr == f"to-stderr-{i}\n".encode()
        out = tmp_path / f"out{job}"
        pool.cli("fetch", str(job), str(out))
        expected = hashlib.sha256((f"payload {i}\n" * (i + 1)).encode()).hexdigest()
        assert (out / "sum.txt").read_text().strip() == expected
        assert (out / "lines.txt").read_text().strip() == str(i + 1)
    used = {pool.jobs()[job]["node"] for job in jobs.values()}
    assert len(used) >= 2  # the work was spread over the pool


def test_coordinator_killed_and_restarted_loses_nothing(pool):
    running = pool.submit("sh", "-c", "sleep 4; echo survived")
    queued = [pool.submit("sh", "-c", f"echo later-{i}") for i in range(4)]
    pool.wait_until("the long job to start", lambda: pool.jobs()[running]["state"] == "running", timeout=60)
    pool.kill(pool.coordinator)
    pool.start_coordinator()
    pool.wait_until("agents to reconnect", lambda: len(pool.status()["nodes"]) == 3, timeout=60)
    for job in [running, *queued]:
        assert pool.cli("wait", str(job), "--timeout", "120", check=False, timeout=150).returncode == 0
    assert pool.cli("logs", str(running)).stdout == b"survived\n"
    assert pool.jobs()[running]["attempts"] == 1  # it kept running through the outage
    assert [pool.cli("logs", str(j)).stdout for j in queued] == [f"later-{i}\n".encode() for i in range(4)]


def test_a_crashed_guest_is_restarted_and_its_job_requeued(pool):
    job = pool.submit("sh", "-c", "sleep 4; echo after-the-crash")
    state = pool.wait_until("the job to start", lambda: (j := pool.jobs()[job])["state"] == "running" and j, 60)
    node = state["node"]
    guest_pid = pool.wait_until("the agent to report the job's guest", lambda: next(
        (g["pid"] for g in json.loads((pool.root / node / "status.json").read_text())["guests"] if g["job"] == job),
        None), 10, interval=0.2)
    os.kill(guest_pid, signal.SIGKILL)  # the guest's process dies; the agent must survive it
    assert pool.cli("wait", str(job), "--timeout", "120", check=False, timeout=150).returncode == 0
    final = pool.jobs()[job]
    assert final["attempts"] == 2 and pool.cli("logs", str(job)).stdout == b"after-the-crash\n"
    assert "guest 0 crashed" in pool.log(node)
    pool.wait_until("the crashed node's guest to be back", lambda: node in pool.ready_nodes(), 60)


def test_agent_killed_mid_job_is_requeued_and_completes_elsewhere(pool):
    job = pool.submit("sh", "-c", "sleep 3; echo finished-somewhere")
    state = pool.wait_until("the job to start", lambda: (j := pool.jobs()[job])["state"] == "running" and j,
                            timeout=60)
    victim = state["node"]
    pool.kill(pool.agents[victim])
    assert pool.cli("wait", str(job), "--timeout", "120", check=False, timeout=150).returncode == 0
    final = pool.jobs()[job]
    assert final["node"] != victim and final["attempts"] == 2
    assert pool.cli("logs", str(job)).stdout == b"finished-somewhere\n"
    pool.wait_until("the dead node to leave the pool", lambda: victim not in pool.ready_nodes(), timeout=30)


def test_unenrolled_agent_is_refused_with_a_clear_error(pool):
    intruder = pool.add_agent("intruder", enrol=False)
    assert intruder.wait(timeout=60) == 125
    log = pool.log("intruder")
    assert "refused this agent's key" in log and "--role agent -- intruder" in log
    assert "Traceback" not in log
    assert "intruder" not in [n["name"] for n in pool.status()["nodes"]]

