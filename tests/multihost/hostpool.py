# SPDX-License-Identifier: GPL-2.0-or-later
"""Fixtures for tests on several test hosts: the network itself, and a real pool spread over it.

A test module loads them with ``pytest_plugins = ["hostpool"]`` (there is no conftest.py in this directory: a
second module named ``conftest`` would shadow tests/conftest.py, which other tests import from).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))  # pool.py

from pool import Pool
from testnet import TestNetwork, unavailable

COORDINATOR_HOST = "coord"
READY_TIMEOUT_S = 120
SLOW_TRANSFER = """
set -- $CONODE_HOSTS
if [ $CONODE_RANK = 0 ]; then
  mkfifo /tmp/quiet; nc -l -p 5000 <>/tmp/quiet | wc -c
else
  i=0; until ping -c 1 -W 1 "$1" >/dev/null; do i=$((i+1)); [ $i -lt 60 ] || exit 1; done
  echo linked
  until (i=0; while [ $i -lt %d ]; do echo "line $i"; i=$((i+1)); sleep 0.5; done) | nc "$1" 5000; do sleep 0.5; done
fi
"""


def slow_transfer(lines: int) -> str:
    """A job of two guests: once rank 0 answers pings, rank 1 says "linked" and sends it *lines* lines over TCP, two
    a second (a refused connection is tried again: nothing went); rank 0 prints how many bytes it received."""
    return SLOW_TRANSFER % lines


def transfer_size(lines: int) -> str:
    """What rank 0 of slow_transfer(*lines*) prints last."""
    return str(sum(len(f"line {i}\n") for i in range(lines)))


@pytest.fixture
def network() -> Iterator[TestNetwork]:
    """An empty test network; every host made on it is deleted, with its processes, after the test."""
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    with TestNetwork() as net:
        yield net


def pool_across_hosts(net: TestNetwork, root: Path, agents: list[str], *extra: str) -> Pool:
    """A coordinator on host "coord", listening on its address, and one agent (owner away, and flags *extra*)
    per host in *agents*; returns once every agent's guest is ready."""
    pool = Pool(root, host=net.host(COORDINATOR_HOST))
    pool.start_coordinator()
    for name in agents:
        pool.add_agent(name, "--owner", "away", *extra, host=net.host(name))
    pool.wait_until(f"{len(agents)} ready nodes", lambda: sorted(pool.ready_nodes()) == sorted(agents),
                    timeout=READY_TIMEOUT_S)
    return pool


@pytest.fixture
def pool_on_hosts(request: pytest.FixtureRequest, network: TestNetwork, tmp_path: Path) -> Iterator[Pool]:
    """A ready pool: the coordinator on "coord" and agents a1..aN each on its own host (N = 2, or the
    fixture's parameter: ``@pytest.mark.parametrize("pool_on_hosts", [3], indirect=True)``)."""
    count = getattr(request, "param", 2)
    pool = pool_across_hosts(network, tmp_path, [f"a{i}" for i in range(1, count + 1)])
    try:
        yield pool
    finally:
        pool.close()  # the network's cleanup would kill them too; this reaps them first

