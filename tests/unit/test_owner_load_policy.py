# SPDX-License-Identifier: GPL-2.0-or-later
"""The owner-load policy: a guest moves away from a workstation whose owner keeps its CPU busy, toward one whose
owner does not, with hysteresis (the load must persist, the destination must be well below the threshold, a
moved guest is held). The pure decision (coordinator/moves.py) case by case, the owner's load measured from a
cgroup, then the real Coordinator (in-memory transport, fake clock) acting on heartbeats."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import zmq
from test_coordinator_decisions import Pool, run_jobs
from test_coordinator_moves import listening, of_type

from conode.agent.settings import resolve_agent_config
from conode.errors import ConodeError
from conode.idle.sources import CgroupLoad
from conode.testing.clock import FakeClock
from coordinator.config import StateDir
from coordinator.moves import MOVE_HOLD_S, OwnerLoadPolicy, away_from_owner_load, loaded_since
from coordinator.placement import NodeView
from conode.tomlfile import write_toml

POLICY = OwnerLoadPolicy(threshold=0.3, persist_s=10.0, band=0.5)
NOW = 1000.0


def node(name: str, running: int = 0, state: str = "Claimed", mem_mib: int = 256, cores: int = 1,
         drained: bool = False) -> NodeView:
    return NodeView(name, state if running else "Unclaimed" if state == "Claimed" else state, cores, mem_mib,
                    running, 0.0, drained)


def decide(nodes, loads, since, jobs, held=lambda job: False, now=NOW, policy=POLICY):
    return away_from_owner_load(nodes, loads, since, jobs, now, policy, held)


# --- since when a node's owner has been busy ----------------------------------------------------------------
@pytest.mark.parametrize("previous, load, expected", [
    (None, 0.5, NOW),  # just went above: from now
    (NOW - 30, 0.5, NOW - 30),  # still above: from when it went
    (NOW - 30, 0.3, None),  # at the threshold is not above: the clock starts again
    (NOW - 30, 0.1, None),
    (NOW - 30, None, None),  # unknown never counts as busy
    (None, float("inf"), NOW),
])
def test_loaded_since_starts_when_the_load_goes_above_and_resets_when_it_drops(previous, load, expected):
    assert loaded_since(previous, load, NOW, POLICY) == expected


def test_loaded_since_is_none_when_the_policy_is_off():
    assert loaded_since(NOW - 30, 5.0, NOW, OwnerLoadPolicy(threshold=0.0)) is None


# --- the decision -------------------------------------------------------------------------------------------
def test_a_guest_on_a_persistently_busy_workstation_moves_to_a_quiet_idle_one():
    nodes = [node("busy", running=1), node("quiet")]
    assert decide(nodes, {"busy": 0.8, "quiet": 0.0}, {"busy": NOW - 10}, {"busy": [(7, 128)]}) == (7, "quiet")


@pytest.mark.parametrize("since", [None, NOW, NOW - 9.9])
def test_a_load_that_has_not_persisted_moves_nothing(since):
    nodes = [node("busy", running=1), node("quiet")]
    assert decide(nodes, {"busy": 0.8, "quiet": 0.0}, {"busy": since}, {"busy": [(7, 128)]}) is None


@pytest.mark.parametrize("quiet_load", [0.15, 0.2, 0.3, 0.9, None])
def test_a_destination_must_be_well_below_the_threshold_and_measured(quiet_load):
    """The band: a node at or above threshold × band (0.15), or whose load is unknown, is no refuge."""
    nodes = [node("busy", running=1), node("other")]
    assert decide(nodes, {"busy": 0.8, "other": quiet_load}, {"busy": NOW - 60}, {"busy": [(7, 128)]}) is None


def test_just_below_the_band_is_quiet_enough():
    nodes = [node("busy", running=1), node("other")]
    assert decide(nodes, {"busy": 0.8, "other": 0.149}, {"busy": NOW - 60}, {"busy": [(7, 128)]}) == (7, "other")


def test_a_held_guest_stays_and_the_next_one_goes():
    nodes = [node("busy", running=2, cores=2), node("quiet")]
    jobs = {"busy": [(7, 128), (8, 128)]}
    assert decide(nodes, {"busy": 0.8, "quiet": 0.0}, {"busy": NOW - 60}, jobs, held=lambda job: job == 7) == \
        (8, "quiet")
    assert decide(nodes, {"busy": 0.8, "quiet": 0.0}, {"busy": NOW - 60}, jobs, held=lambda job: True) is None


def test_the_busiest_owners_guest_goes_first_to_the_quietest_node():
    nodes = [node("b1", running=1), node("b2", running=1), node("q1"), node("q2")]
    loads = {"b1": 0.5, "b2": 0.9, "q1": 0.1, "q2": 0.02}
    since = {"b1": NOW - 60, "b2": NOW - 60}
    assert decide(nodes, loads, since, {"b1": [(1, 128)], "b2": [(2, 128)]}) == (2, "q2")


@pytest.mark.parametrize("target", [
    node("q", state="Owner"),  # its owner is there
    node("q", drained=True),
    node("q", running=1),  # not idle: its guest would only share the CPU
    node("q", mem_mib=64),  # too small
])
def test_only_an_idle_node_that_could_take_the_guest_is_a_destination(target):
    nodes = [node("busy", running=1), target]
    assert decide(nodes, {"busy": 0.8, "q": 0.0}, {"busy": NOW - 60}, {"busy": [(7, 128)]}) is None


def test_a_busy_node_without_movable_jobs_moves_nothing_and_a_quiet_one_with_jobs_is_left_alone():
    nodes = [node("busy", running=1), node("calm", running=1), node("quiet")]
    loads = {"busy": 0.8, "calm": 0.1, "quiet": 0.0}
    assert decide(nodes, loads, {"busy": NOW - 60}, {"calm": [(3, 128)]}) is None  # busy has none movable now
    assert decide(nodes, loads, {"busy": NOW - 60}, {"busy": [], "calm": [(3, 128)]}) is None


def test_off_moves_nothing():
    nodes = [node("busy", running=1), node("quiet")]
    assert decide(nodes, {"busy": 9.0, "quiet": 0.0}, {"busy": NOW - 600}, {"busy": [(7, 128)]},
                  policy=OwnerLoadPolicy(threshold=0.0)) is None


def test_no_ping_pong_between_two_busy_owners():
    """Both owners busy: neither node is a refuge, whichever holds the guest."""
    nodes = [node("a", running=1), node("b")]
    loads = {"a": 0.8, "b": 0.8}
    assert decide(nodes, loads, {"a": NOW - 60, "b": NOW - 60}, {"a": [(7, 128)]}) is None
    # b's owner just stopped: its load is low, but the node was busy a moment ago and is still recorded so
    assert decide(nodes, {"a": 0.8, "b": 0.1}, {"a": NOW - 60, "b": NOW - 60}, {"a": [(7, 128)]}) is None


def test_a_load_that_wavers_around_the_threshold_never_persists():
    """Readings alternately above and below the threshold: the clock starts again each time it drops."""
    since = None
    for second, load in enumerate([0.5, 0.2, 0.5, 0.29, 0.6, 0.1] * 5):
        since = loaded_since(since, load, NOW + second, POLICY)
        assert decide([node("busy", running=1), node("quiet")], {"busy": load, "quiet": 0.0}, {"busy": since},
                      {"busy": [(7, 128)]}, now=NOW + second) is None


# --- the owner's load from a cgroup ---------------------------------------------------------------------------
def test_a_cgroups_load_is_its_cpu_use_over_the_interval(tmp_path):
    clock = FakeClock()
    (tmp_path / "cpu.stat").write_text("usage_usec 5000000\nuser_usec 4000000\nsystem_usec 1000000\n")
    load = CgroupLoad(tmp_path, clock)
    assert load.read() is None  # no interval yet
    clock.advance(2.0)
    (tmp_path / "cpu.stat").write_text("usage_usec 6500000\nuser_usec 5000000\nsystem_usec 1500000\n")
    assert load.read() == pytest.approx(0.75)
    (tmp_path / "cpu.stat").unlink()
    clock.advance(1.0)
    assert load.read() is None  # unreadable: unknown, and the next reading starts afresh
    (tmp_path / "cpu.stat").write_text("usage_usec 7000000\n")
    assert load.read() is None


@pytest.mark.skipif(not os.path.isfile("/sys/fs/cgroup/cpu.stat") and
                    not os.path.isfile("/sys/fs/cgroup/unified/cpu.stat"), reason="no cgroup v2 here")
def test_a_real_cgroups_load_is_finite_and_not_negative():
    root = "/sys/fs/cgroup" if os.path.isfile("/sys/fs/cgroup/cpu.stat") else "/sys/fs/cgroup/unified"
    load = CgroupLoad(Path(root))
    load.read()
    sum(range(200_000))
    assert 0.0 <= load.read() < 1024


def test_the_agent_setting_must_name_a_cgroup(tmp_path):
    settings = {"name": "n", "coordinator": "tcp://127.0.0.1:1", "coordinator_key": zmq.curve_keypair()[0].decode()}
    write_toml(tmp_path / "agent.toml", {**settings, "owner_cgroup": str(tmp_path / "none")})
    with pytest.raises(ConodeError, match="owner_cgroup must be a cgroup v2 directory"):
        resolve_agent_config(tmp_path, None, {})
    (tmp_path / "cpu.stat").write_text("usage_usec 1\n")
    write_toml(tmp_path / "agent.toml", {**settings, "owner_cgroup": str(tmp_path)})
    assert resolve_agent_config(tmp_path, None, {}).owner_cgroup == tmp_path


# --- the coordinator acting on heartbeats -----------------------------------------------------------------------
def beat(pool: Pool, name: str, load: float | None, state: str = "Claimed") -> None:
    fields = {} if load is None else {"owner_load": load}
    pool.send(name, "heartbeat", node=name, state=state, idle_s=60.0, running=[], **fields)


def second(pool: Pool, loads: dict[str, float | None]) -> list[dict]:
    """A second of heartbeats with these owner loads, then the coordinator's sweep; the move_in sent."""
    for name, load in loads.items():
        beat(pool, name, load, "Claimed" if name == "n1" else "Unclaimed")
    pool.clock.advance(1.0)
    pool.housekeeping()
    return [m for name in loads for m in of_type(pool.take(name), "move_in")]


def test_the_coordinator_moves_a_guest_once_its_owners_load_persists_then_holds_it(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="coordinator")
    (tmp_path / "coordinator.toml").write_text("migrate_owner_load = 0.3\nmigrate_owner_load_s = 3\n")
    pool = Pool(tmp_path, FakeClock())
    pool.hello("n1")
    job = pool.submit()
    assert run_jobs(pool.take("n1")) == [job]
    pool.hello("n2")
    for _ in range(2):  # busy for 1 s, then 2 s: not yet for long enough (3 s)
        assert second(pool, {"n1": 0.9, "n2": 0.0}) == []
    (move_in,) = second(pool, {"n1": 0.9, "n2": 0.0})
    assert move_in["job"] == job
    assert f"job {job} moving from n1 to n2 (its owner uses 0.90 cores)" in caplog.text
    listening(pool, "n2", move_in)
    assert of_type(pool.send("n1", "move_ready", job=job, epoch=1), "move_go")
    pool.send("n2", "move_arrived", job=job, epoch=1)
    assert pool.job(job)["node"] == "n2"
    # Now n2's owner gets busy and n1's is quiet again: the guest is held where it is for MOVE_HOLD_S ...
    for _ in range(int(MOVE_HOLD_S) - 5):
        assert second(pool, {"n2": 0.9, "n1": 0.0}) == []
    # ... then moves back: n2's owner has been busy for a long while, which is a reason, not a ping-pong.
    moved = []
    for _ in range(10):
        moved += second(pool, {"n2": 0.9, "n1": 0.0})
    assert [m["job"] for m in moved] == [job]
    pool.close()


def test_heartbeats_without_a_load_or_with_the_policy_off_never_move_a_guest(tmp_path):
    for settings, loads in (("", {"n1": None, "n2": 0.0}), ("migrate_owner_load = 0\n", {"n1": 5.0, "n2": 0.0})):
        root = tmp_path / str(len(settings))
        root.mkdir()
        (root / "coordinator.toml").write_text(settings)
        pool = Pool(root, FakeClock())
        pool.hello("n1")
        job = pool.submit()
        assert run_jobs(pool.take("n1")) == [job]
        pool.hello("n2")
        for _ in range(30):
            assert second(pool, loads) == []
        pool.close()


@pytest.mark.parametrize("text", ["migrate_owner_load = -1\n", "migrate_owner_load = true\n",
                                  "migrate_owner_load_s = -3\n", "migrate_owner_load = \"high\"\n"])
def test_bad_owner_load_settings_are_refused_with_the_key_named(tmp_path, text):
    (tmp_path / "coordinator.toml").write_text(text)
    with pytest.raises(ConodeError, match="migrate_owner_load"):
        StateDir(tmp_path).owner_load_policy()


def test_the_policy_is_on_by_default_and_read_from_the_settings(tmp_path):
    assert StateDir(tmp_path).owner_load_policy() == OwnerLoadPolicy() and OwnerLoadPolicy().enabled
    (tmp_path / "coordinator.toml").write_text("migrate_owner_load = 1.5\nmigrate_owner_load_s = 30\n")
    assert StateDir(tmp_path).owner_load_policy() == OwnerLoadPolicy(threshold=1.5, persist_s=30.0)
