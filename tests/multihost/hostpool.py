# SPDX-License-Identifier: GPL-2.0-or-later
"""Fixtures for tests on several test hosts: the network itself, and a real pool spread over it.

A test module loads them with ``pytest_plugins = ["hostpool"]`` (there is no conftest.py in this directory: a
second module named ``conftest`` would shadow tests/conftest.py, which other tests import from).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))  # pool.py

from conode.tomlfile import read_toml, write_toml
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


# Rank 0 listens and prints every line it receives (a second listener tells rank 1 it is ready); rank 1 computes
# a value a step, sends it over one TCP connection and prints it.
STREAM = """
set -- $CONODE_HOSTS
if [ $CONODE_RANK = 0 ]; then
  mkfifo /tmp/quiet
  nc -l -p 5000 <>/tmp/quiet | while read line; do echo "got $line"; done &
  nc -l -p 5001 </dev/null >/dev/null
  wait
else
  until echo | nc "$1" 5001 >/dev/null 2>&1; do sleep 0.5; done
  sleep 1
  exec 3>&1
  s=0; i=1
  while [ $i -le STEPS ]; do
    s=$(( (s * 31 + i * i) % 1000003 )); echo "step $i $s"; echo "step $i $s" >&3; i=$((i+1)); sleep 0.3
  done | nc "$1" 5000
fi
"""


def stream(steps: int) -> str:
    """A job of two guests exchanging computed values over conet: rank 1 prints stream_lines(*steps*) and sends
    them to rank 0, which prints each as "got LINE"."""
    return STREAM.replace("STEPS", str(steps))


def stream_lines(steps: int) -> list[str]:
    lines, s = [], 0
    for i in range(1, steps + 1):
        s = (s * 31 + i * i) % 1000003
        lines.append(f"step {i} {s}")
    return lines


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


def coordinator_settings(pool: Pool, **settings: Any) -> None:
    """Add *settings* to the pool's coordinator.toml (before the coordinator starts)."""
    path = pool.state / "coordinator.toml"
    write_toml(path, {**(read_toml(path) if path.exists() else {}), **settings})


def pool_across_hosts(net: TestNetwork, root: Path, agents: list[str], *extra: str,
                      settings: dict[str, Any] | None = None) -> Pool:
    """A coordinator on host "coord", listening on its address (with *settings* added to its coordinator.toml),
    and one agent (owner away, and flags *extra*) per host in *agents*; returns once every agent's guest is
    ready."""
    pool = Pool(root, host=net.host(COORDINATOR_HOST))
    coordinator_settings(pool, **(settings or {}))
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

