# SPDX-License-Identifier: GPL-2.0-or-later
"""Running guests moving between agents on separate test hosts, orchestrated by the coordinator: on command, when
the workstation's owner returns, when the owner's own CPU load stays high, and through faults (either agent
killed, the link cut, the coordinator restarted in the middle of a move). In every case the job's output is
exactly what an uninterrupted run prints. Root only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import testnet
from hostpool import COORDINATOR_HOST, READY_TIMEOUT_S, coordinator_settings, slow_transfer, transfer_size

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))  # pool.py, test_owner_cycle.py

from conode.tomlfile import write_toml
from pool import Pool
from test_owner_cycle import Owner

pytest_plugins = ["hostpool"]
pytestmark = [pytest.mark.guest,
              pytest.mark.skipif(testnet.unavailable() is not None, reason=str(testnet.unavailable()))]

AGENTS = ("a1", "a2", "a3")
# Owner-aware agents (each with its own idle file); the owner left an hour ago.
OWNER_POLICY = {"start_idle_s": 1.0, "continue_idle_s": 1.0, "active_input_s": 0.5, "vacate_after_s": 2.0,
                "start_max_load": 1000.0, "suspend_load": 1000.0}  # the other test processes are not the owner
SLOW_LINK_MIB_S = 4.0  # the fault tests' agents send a guest (about 12 MB) in about three seconds: time to strike


def job_of(steps: int, pause_s: float) -> str:
    """A known value computed over *steps* x *pause_s* seconds of guest time, one line per step."""
    return ("s=0; i=1; while [ $i -le %d ]; do s=$(( (s * 31 + i * i) %% 1000003 )); echo \"step $i $s\"; "
            "i=$((i+1)); sleep %g; done; echo \"total $s\"" % (steps, pause_s))


def expected_output(steps: int) -> bytes:
    lines, s = [], 0
    for i in range(1, steps + 1):
        s = (s * 31 + i * i) % 1000003
        lines.append(f"step {i} {s}\n")
    return "".join(lines).encode() + f"total {s}\n".encode()


def start_pool(network, root: Path, **agent_settings) -> tuple[Pool, dict[str, Owner]]:
    """A coordinator and three owner-aware agents, each on its own test host, every owner away."""
    pool = Pool(root, host=network.host(COORDINATOR_HOST))
    # The agents measure the owner's load machine-wide, where it is every test host's and other tests' load:
    # the owner-load policy would read noise (it has a test of its own, with loads of the hosts' own).
    coordinator_settings(pool, migrate_owner_load=0)
    pool.start_coordinator()
    owners = {}
    for name in AGENTS:
        config = root / f"{name}.toml"
        config.write_text("".join(f"{key} = {value}\n" for key, value in {**OWNER_POLICY, **agent_settings}.items()))
        owners[name] = Owner(root / f"{name}.activity")
        owners[name].left()
        pool.add_agent(name, "--idle-source", f"file:{owners[name].path}", "--config", str(config),
                       host=network.host(name))
    pool.wait_until("3 ready nodes", lambda: sorted(pool.ready_nodes()) == list(AGENTS), timeout=READY_TIMEOUT_S)
    return pool, owners


@pytest.fixture
def pool_and_owners(network, tmp_path):
    pool, owners = start_pool(network, tmp_path)
    try:
        yield pool, owners
    finally:
        pool.close()


@pytest.fixture
def slow_pool(network, tmp_path):
    pool, _ = start_pool(network, tmp_path, migrate_max_mib_s=SLOW_LINK_MIB_S)
    try:
        yield pool
    finally:
        pool.close()


def steps_printed(pool, job: int) -> int:
    return pool.cli("logs", str(job)).stdout.count(b"step ")


def job_row(pool, job: int) -> dict:
    return pool.jobs()[job]


def finish(pool, job: int, steps: int) -> dict:
    assert pool.cli("wait", str(job), "--timeout", "120", check=False, timeout=150).returncode == 0, \
        pool.log("coordinator")[-3000:]
    row = job_row(pool, job)
    assert pool.cli("logs", str(job)).stdout == expected_output(steps)
    for name in (COORDINATOR_HOST, *AGENTS):
        assert "Traceback" not in pool.log(name if name != COORDINATOR_HOST else "coordinator"), name
    return row


def moved(pool, job: int, count: int, to: str | None = None) -> dict | None:
    row = job_row(pool, job)
    done = row.get("moves") == count and "moving_to" not in row and row["state"] == "running"
    return row if done and (to is None or row["node"] == to) else None


def runs_on(pool, guest: int) -> str | None:
    """The node running *guest* (a job or a gang's rank) by `status`, unless it is moving."""
    for node in pool.status()["nodes"]:
        if guest in node["jobs"] and guest not in node["moving_out"] + node["moving_in"]:
            return node["name"]
    return None


def start_moving(pool, job: int, to: str) -> None:
    assert f"moving to {to}" in pool.cli("migrate", str(job), "--to", to).stdout.decode()


def running_with_output(pool, job: int, at_least: int) -> None:
    pool.wait_until(f"job {job} to print {at_least} steps", lambda: steps_printed(pool, job) >= at_least, 90,
                    interval=0.2)


def test_a_job_moved_three_times_then_away_from_its_returning_owner_prints_what_an_uninterrupted_run_prints(
        pool_and_owners):
    pool, owners = pool_and_owners
    steps = 60
    job = pool.submit("sh", "-c", job_of(steps, 0.5))
    running_with_output(pool, job, 3)
    visited = [job_row(pool, job)["node"]]
    for move in range(1, 4):  # round the three hosts: the next one each time
        target = AGENTS[(AGENTS.index(visited[-1]) + 1) % len(AGENTS)]
        start_moving(pool, job, target)
        pool.wait_until(f"move {move} to {target}", lambda: moved(pool, job, move, target), 60, interval=0.2)
        visited.append(target)
        running_with_output(pool, job, steps_printed(pool, job) + 2)  # it goes on there

    # Its workstation's owner comes back: the guest stops at once, then moves to an idle workstation.
    owner = owners[visited[-1]]
    row = pool.wait_until("the move away from the owner", lambda: (owner.types(), moved(pool, job, 4))[1], 60,
                          interval=0.2)
    assert row["node"] != visited[-1]
    visited.append(row["node"])
    running_with_output(pool, job, steps_printed(pool, job) + 2)
    assert f"job {job} moving from {visited[-2]} to {visited[-1]} (its owner is back)" in pool.log("coordinator")

    # Its owner comes back again, with every other workstation busy: it is paused, then vacated to disk there;
    # it moves as soon as another workstation frees up, while the owner still works.
    fillers = [pool.submit("sh", "-c", "sleep 6") for _ in range(2)]
    pool.wait_until("the other workstations busy", lambda: all(job_row(pool, f)["state"] == "running"
                                                               for f in fillers), 60, interval=0.2)
    owner = owners[visited[-1]]
    pool.wait_until("the job to be vacated", lambda: (owner.types(), job_row(pool, job)["state"])[1] == "vacated",
                    60, interval=0.2)
    row = pool.wait_until("the vacated guest to move", lambda: (owner.types(), moved(pool, job, 5))[1], 60,
                          interval=0.2)
    assert row["node"] != visited[-1]
    visited.append(row["node"])
    row = finish(pool, job, steps)
    assert row["attempts"] == 1 and row["moves"] == 5 and row["ran_on"] == visited
    assert f"5: {'>'.join(visited)}" in pool.cli("jobs").stdout.decode()
    logs = "".join(pool.log(name) for name in AGENTS)
    assert logs.count(f"job {job} moved out: downtime") == 5 and logs.count(f"job {job} moved in:") == 5
    assert f"job {job}, vacated on {visited[-2]}, is loaded there to move" in pool.log("coordinator")
    print(f"moves {visited}: last downtime {row['last_downtime_s'] * 1000:.0f} ms")


def strike_mid_transfer(pool, job: int, to: str, fault) -> None:
    """Start moving *job* to *to* and, while its guest is on the way, cause *fault*."""
    start_moving(pool, job, to)
    time.sleep(1.0)  # a third of the way at SLOW_LINK_MIB_S
    assert job_row(pool, job).get("moving_to") == to, "the move ended before the fault"
    fault()


def still_on(pool, job: int, source: str) -> dict | None:
    row = job_row(pool, job)
    return row if "moving_to" not in row and row["node"] == source and row["state"] == "running" else None


def test_faults_before_the_hand_over_leave_the_job_running_on_its_source(slow_pool, network):
    """The destination killed, the link between the agents cut, the coordinator restarted, each in the middle
    of a move: the guest goes on where it was, and the job ends once, with one attempt and the right output."""
    pool = slow_pool
    steps = 100
    job = pool.submit("sh", "-c", job_of(steps, 0.4))
    running_with_output(pool, job, 2)
    source = job_row(pool, job)["node"]
    first, second = [name for name in AGENTS if name != source]

    strike_mid_transfer(pool, job, first, lambda: pool.kill(pool.agents[first]))
    pool.wait_until("the move to the killed destination to be called off", lambda: "move of job %d from %s to %s "
                    "called off" % (job, source, first) in pool.log("coordinator"), 30, interval=0.2)
    running_with_output(pool, job, steps_printed(pool, job) + 2)

    a, b = network.hosts[source], network.hosts[second]
    strike_mid_transfer(pool, job, second, lambda: network.block(a, b))
    pool.wait_until("the move over the cut link to be called off", lambda: "move of job %d from %s to %s called "
                    "off" % (job, source, second) in pool.log("coordinator"), 40, interval=0.2)
    network.unblock(a, b)
    running_with_output(pool, job, steps_printed(pool, job) + 2)

    def restart_coordinator() -> None:
        pool.kill(pool.coordinator)
        pool.start_coordinator()

    strike_mid_transfer(pool, job, second, restart_coordinator)
    pool.wait_until("the restarted coordinator to call the move off", lambda: "called off: the coordinator "
                    "restarted during the move" in pool.log("coordinator"), 30, interval=0.2)
    pool.wait_until("the job back on its source, not moving", lambda: still_on(pool, job, source), 40,
                    interval=0.3)
    running_with_output(pool, job, steps_printed(pool, job) + 2)

    row = finish(pool, job, steps)
    assert row["attempts"] == 1 and row["moves"] == 0 and row["node"] == source




def test_a_tcp_transfer_goes_on_across_a_move_then_a_source_killed_mid_move_runs_its_job_again_once(slow_pool):
    pool = slow_pool
    gang = int(pool.cli("submit", "--guests", "2", "--", "sh", "-c", slow_transfer(30)).stdout.strip())
    pool.wait_until("the transfer to start", lambda: b"linked" in pool.cli("logs", str(gang), "--rank", "1")
                    .stdout, 90, interval=0.3)
    where = {job: node["name"] for node in pool.status()["nodes"] for job in node["jobs"]}
    receiver = min(where)  # rank 0, the listening end
    free = next(name for name in AGENTS if name not in where.values())
    start_moving(pool, receiver, free)  # a rank moves by its own id, keeping its address
    pool.wait_until("the receiving rank to move", lambda: runs_on(pool, receiver) == free, 60, interval=0.3)
    assert pool.cli("wait", str(gang), "--timeout", "120", check=False, timeout=150).returncode == 0
    received = pool.cli("logs", str(gang), "--rank", "0").stdout.split()
    assert received[-1] == transfer_size(30).encode()
    assert job_row(pool, gang)["attempts"] == 1

    steps = 16
    job = pool.submit("sh", "-c", job_of(steps, 0.3))
    running_with_output(pool, job, 2)
    source = job_row(pool, job)["node"]
    target = next(name for name in AGENTS if name != source)
    strike_mid_transfer(pool, job, target, lambda: pool.kill(pool.agents[source]))
    row = finish(pool, job, steps)  # from the start, elsewhere: its output is that of one whole run
    assert row["attempts"] == 2 and row["node"] != source and row["moves"] == 0
    assert f"move of job {job} from {source} to {target} called off" in pool.log("coordinator")


def test_a_gangs_ranks_move_away_from_their_returning_owners_and_the_gang_runs_once(pool_and_owners):
    """A 2-rank gang streaming over TCP (conet): the owner of the receiving rank's workstation comes back while
    a workstation is idle, and the rank moves there at once; then the sending rank's owner comes back with none
    idle: that rank is paused, vacated to disk, and moves as soon as the first owner leaves. The gang runs once
    (one attempt), and rank 0 receives every byte."""
    pool, owners = pool_and_owners
    lines = 60
    gang = int(pool.cli("submit", "--guests", "2", "--", "sh", "-c", slow_transfer(lines)).stdout.strip())
    pool.wait_until("the transfer to start", lambda: b"linked" in pool.cli("logs", str(gang), "--rank", "1")
                    .stdout, 90, interval=0.3)
    where = {job: node["name"] for node in pool.status()["nodes"] for job in node["jobs"]}
    receiver, sender = sorted(where)  # rank 0, rank 1
    back, busy = where[receiver], where[sender]
    free = next(name for name in AGENTS if name not in where.values())
    pool.wait_until("the receiving rank to move away from its owner", lambda: (
        owners[back].types(), runs_on(pool, receiver))[1] == free, 60, interval=0.2)
    pool.wait_until("the sending rank, with no workstation idle, to be vacated", lambda: (
        owners[back].types(), owners[busy].types(), f"job {sender} vacated" in pool.log("coordinator"))[2], 60,
                    interval=0.2)
    owners[back].left()  # a workstation frees up
    pool.wait_until("the vacated rank to move there", lambda: (owners[busy].types(), runs_on(pool, sender))[1] == back,
                    60, interval=0.2)
    assert pool.cli("wait", str(gang), "--timeout", "120", check=False, timeout=150).returncode == 0, \
        pool.log("coordinator")[-3000:]
    assert pool.cli("logs", str(gang), "--rank", "0").stdout.split()[-1] == transfer_size(lines).encode()
    assert job_row(pool, gang)["attempts"] == 1
    log = pool.log("coordinator")
    assert f"job {receiver} moving from {back} to {free} (its owner is back)" in log
    assert f"job {sender}, vacated on {busy}, is loaded there to move" in log
    assert "restart" not in log and "requeued" not in log


OWNER_LOAD_POLICY = {"migrate_owner_load": 0.2, "migrate_owner_load_s": 2.0}  # a guest moves after 2 s of load
BURNERS = 2  # the owner's CPU-bound processes: on a shared machine one may get less than the threshold


@pytest.fixture
def owner_cgroups(network, tmp_path) -> Iterator[dict[str, Path]]:
    """Per agent host, a cgroup standing for its owner's desktop session (its CPU use is the owner's load), seen
    through a bind mount under *tmp_path* (`ip netns exec` mounts a /sys of its own, without the cgroups); the
    mounts and cgroups are removed once the processes in them are gone."""
    root = testnet.cgroup2_root()
    if root is None:
        pytest.skip("no cgroup v2 hierarchy on this machine")
    groups = {name: root / f"{testnet.PREFIX}{os.getpid()}-{name}-owner" for name in AGENTS[:2]}
    seen = {name: tmp_path / f"{name}-owner-cgroup" for name in groups}
    try:
        for name, path in groups.items():
            path.mkdir()
            seen[name].mkdir()
            subprocess.run(["mount", "--bind", str(path), str(seen[name])], check=True, timeout=30)
        yield seen
    finally:
        for name, path in groups.items():
            if (path / "cgroup.procs").exists():
                for pid in (path / "cgroup.procs").read_text().split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            subprocess.run(["umount", str(seen[name])], check=False, capture_output=True, timeout=30)
            testnet.remove_cgroup(path.name)


def test_the_owners_own_cpu_load_moves_the_guest_to_a_quiet_workstation_once(network, tmp_path, owner_cgroups):
    """The owner starts CPU-bound work on the workstation running the guest (processes in its session's cgroup,
    which the agent measures): once the load has lasted, the coordinator moves the guest to the other,
    quiet workstation; it does not come back while the load goes on there; the output is intact."""
    pool = Pool(tmp_path, host=network.host(COORDINATOR_HOST))
    coordinator_settings(pool, **OWNER_LOAD_POLICY)
    pool.start_coordinator()
    for name, cgroup in owner_cgroups.items():
        config = tmp_path / f"{name}.toml"
        # The agent keeps its guest running under the owner's load (the coordinator moves it instead).
        write_toml(config, {"owner_cgroup": str(cgroup), "start_max_load": 1000.0, "suspend_load": 1000.0})
        pool.add_agent(name, "--owner", "away", "--config", str(config), host=network.host(name))
    try:
        pool.wait_until("2 ready nodes", lambda: sorted(pool.ready_nodes()) == sorted(owner_cgroups),
                        timeout=READY_TIMEOUT_S)
        steps = 40
        job = pool.submit("sh", "-c", job_of(steps, 0.3))
        running_with_output(pool, job, 2)
        source = job_row(pool, job)["node"]
        target = next(name for name in owner_cgroups if name != source)
        cgroup = owner_cgroups[source]
        for _ in range(BURNERS):
            network.hosts[source].spawn(["sh", "-c", f"echo $$ > {cgroup}/cgroup.procs && exec sh -c "
                                                     "'while :; do :; done'"])
        row = pool.wait_until("the move away from the owner's load", lambda: moved(pool, job, 1, target), 60,
                              interval=0.3)
        assert row["node"] == target
        assert f"job {job} moving from {source} to {target} (its owner uses " in pool.log("coordinator")
        load = next(n for n in pool.status()["nodes"] if n["name"] == source)["owner_load"]
        assert load is not None and load > OWNER_LOAD_POLICY["migrate_owner_load"]
        row = finish(pool, job, steps)  # the owner still works on the source: no move back
        assert row["moves"] == 1 and row["ran_on"] == [source, target] and row["attempts"] == 1
    finally:
        pool.close()
