# SPDX-License-Identifier: GPL-2.0-or-later
"""A gang's coordinated checkpoints on separate test hosts: a 2-rank gang, one rank streaming the values it
computes to the other over conet (TCP), is checkpointed in complete sets; the agent running one rank is
SIGKILLed after a set is kept; the coordinator stops the other rank and resumes both from the set on the hosts
left, and each rank's output is exactly that of an uninterrupted run, no line missing or doubled. Root only."""

from __future__ import annotations

import re

import pytest
import testnet
from hostpool import COORDINATOR_HOST, READY_TIMEOUT_S, coordinator_settings, stream, stream_lines

from pool import Pool

pytest_plugins = ["hostpool"]
pytestmark = [pytest.mark.guest,
              pytest.mark.skipif(testnet.unavailable() is not None, reason=str(testnet.unavailable()))]

AGENTS = ("a1", "a2", "a3")
CHECKPOINT_S = 2.0
STEPS = 80


@pytest.fixture
def pool(network, tmp_path):
    p = Pool(tmp_path, host=network.host(COORDINATOR_HOST))
    coordinator_settings(p, checkpoint_interval_s=CHECKPOINT_S)
    p.start_coordinator()
    try:
        for name in AGENTS:
            p.add_agent(name, "--owner", "away", host=network.host(name))
        p.wait_until("3 ready nodes", lambda: sorted(p.ready_nodes()) == list(AGENTS), timeout=READY_TIMEOUT_S)
        yield p
    finally:
        p.close()


def rank_output(pool: Pool, gang: int, rank: int) -> list[str]:
    return pool.cli("logs", str(gang), "--rank", str(rank)).stdout.decode().splitlines()


def test_a_gang_whose_agent_is_killed_goes_on_from_its_last_set_with_every_line_once(pool):
    gang = int(pool.cli("submit", "--guests", "2", "--", "sh", "-c", stream(STEPS)).stdout.strip())
    pool.wait_until("a set kept while rank 1 streams", lambda: len(rank_output(pool, gang, 1)) >= 8 and re.search(
        rf"job {gang}: set \d+ of its 2 ranks kept", pool.log("coordinator")), 120, interval=0.3)
    where = {job: node["name"] for node in pool.status()["nodes"] for job in node["jobs"]}
    sender = max(where)  # rank 1
    pool.kill(pool.agents[where[sender]])
    assert pool.cli("wait", str(gang), "--timeout", "180", check=False, timeout=200).returncode == 0, \
        pool.log("coordinator")[-3000:]
    lines = stream_lines(STEPS)
    assert rank_output(pool, gang, 1) == lines
    assert rank_output(pool, gang, 0) == [f"got {line}" for line in lines]
    log = pool.log("coordinator")
    assert re.search(rf"job {gang} placed on .*, every rank to go on from set \d+", log), log[-3000:]
    assert pool.jobs()[gang]["attempts"] == 2
    for name in (COORDINATOR_HOST, *AGENTS):
        assert "Traceback" not in pool.log(name if name != COORDINATOR_HOST else "coordinator"), name
    taken = [int(ms) for ms in re.findall(rf"job {gang}: cut \d+ taken by its 2 ranks, (\d+) ms", log)]
    held = [float(ms) for name in AGENTS
            for ms in re.findall(r"stood still ([\d.]+) ms after its piece of cut", pool.log(name))]
    print(f"cuts taken in {taken} ms after they began; ranks stood still {held} ms")
