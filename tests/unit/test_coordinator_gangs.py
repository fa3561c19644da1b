# SPDX-License-Identifier: GPL-2.0-or-later
"""Jobs of several guests (gangs) and the guests' conet identities, decided by a real Coordinator in-process
(the Pool of test_coordinator_decisions: real store, fake clock, in-memory transport)."""

from __future__ import annotations

import ipaddress

import pytest

from conode.cluster import protocol
from coordinator.server import MAX_ATTEMPTS
from tests.unit.test_coordinator_decisions import Pool, run_jobs


@pytest.fixture
def pool(tmp_path):
    p = Pool(tmp_path)
    yield p
    p.close()


def hello(pool: Pool, name: str, cores: int = 1, conet: bool = True) -> None:
    fields = {"conet": f"tcp://{name}.test:7704"} if conet else {}
    pool.send(name, "hello", node=name, cores=cores, mem_mib=256, speed=1e6, state="Unclaimed", idle_s=60.0,
              running=[], software="test", **fields)


def submit(pool: Pool, guests: int, **extra) -> int:
    reply = pool.ask("submit", argv=["hostname"], inputs={"in": b"data"}, outputs=["out"], mem_mib=128,
                     guests=guests, **extra)
    assert reply["type"] == "submitted", reply
    return reply["job"]


def runs(pool: Pool, *names: str) -> dict[str, list[dict]]:
    return {name: [m for m in pool.take(name) if m["type"] == "run_job"] for name in names}


def finish(pool: Pool, node: str, rank_id: int, status: int = 0, outputs: dict | None = None) -> None:
    pool.send(node, "job_finished", job=rank_id, status=status, outputs=outputs or {}, missing=[], runtime_s=1.0)


def test_a_gang_waits_until_all_its_guests_fit_then_starts_at_once(pool):
    hello(pool, "n1")
    job = submit(pool, 3)
    assert runs(pool, "n1") == {"n1": []} and pool.job(job)["state"] == "queued"  # one slot: not enough
    hello(pool, "n2", cores=2)
    placed = runs(pool, "n1", "n2")
    assert len(placed["n1"]) == 1 and len(placed["n2"]) == 2
    nets = sorted((m["net"] for ms in placed.values() for m in ms), key=lambda n: n["rank"])
    assert [n["rank"] for n in nets] == [0, 1, 2] and {n["size"] for n in nets} == {3}
    assert len({n["ip"] for n in nets}) == 3 and len({n["mac"] for n in nets}) == 3
    assert {n["network"] for n in nets} == {f"job:{job}"}
    assert nets[0]["hosts"] == [[f"job{job}-{r}", nets[r]["ip"]] for r in range(3)]
    subnet = ipaddress.ip_network("10.213.0.0/16")
    assert all(ipaddress.ip_address(n["ip"]) in subnet and n["prefix"] == 16 for n in nets)
    assert all(m["inputs"] == {"in": b"data"} for ms in placed.values() for m in ms)
    summary = pool.job(job)
    assert summary["state"] == "running" and [r["rank"] for r in summary["ranks"]] == [0, 1, 2]


def test_agents_sharing_a_gang_are_told_each_other_before_the_ranks_start(pool):
    hello(pool, "n1")
    hello(pool, "n2")
    hello(pool, "n3", conet=False)
    submit(pool, 2)
    for me, other in (("n1", "n2"), ("n2", "n1")):
        messages = pool.take(me)
        kinds = [m["type"] for m in messages]
        assert kinds.index("conet_peers") < kinds.index("run_job")
        (peers,) = [m["peers"] for m in messages if m["type"] == "conet_peers"]
        (run,) = [m for m in messages if m["type"] == "run_job"]
        assert peers == [{"node": other, "endpoint": f"tcp://{other}.test:7704", "key": f"{other}-public-key",
                          "networks": [run["net"]["network"]]}]
    assert [m["type"] for m in pool.take("n3")] == ["welcome"]  # no share in the gang: told nothing


def test_a_gang_is_done_when_every_rank_is_with_outputs_and_logs_per_rank(pool):
    hello(pool, "n1")
    hello(pool, "n2")
    job = submit(pool, 2)
    placed = runs(pool, "n1", "n2")
    ranks = {m["net"]["rank"]: (node, m["job"]) for node, ms in placed.items() for m in ms}
    for rank, (node, ident) in ranks.items():
        pool.send(node, "job_output", job=ident, stream="stdout", data=f"hello from {rank}\n".encode())
    finish(pool, *ranks[1], status=3, outputs={"out": b"one"})
    assert pool.job(job)["state"] == "running"  # rank 0 still runs
    finish(pool, *ranks[0], outputs={"out": b"zero"})
    summary = pool.job(job)
    assert summary["state"] == "done" and summary["exit_status"] == 3
    assert [r["exit_status"] for r in summary["ranks"]] == [0, 3]
    logs = pool.ask("logs", job=job)
    assert logs["stdout"] == b"==> rank 0 <==\nhello from 0\n==> rank 1 <==\nhello from 1\n"
    assert pool.ask("logs", job=job, rank=1)["stdout"] == b"hello from 1\n"
    assert pool.ask("fetch", job=job)["outputs"] == {"rank0/out": b"zero", "rank1/out": b"one"}
    assert pool.ask("fetch", job=job, rank=0)["outputs"] == {"out": b"zero"}
    missing = pool.ask("logs", job=job, rank=5)
    assert missing["type"] == "error" and "no rank 5" in missing["message"]
    assert [j["id"] for j in pool.ask("jobs")["jobs"]] == [job]  # ranks are not listed as jobs


def test_a_failing_rank_fails_the_gang_and_stops_the_others(pool):
    hello(pool, "n1")
    hello(pool, "n2")
    job = submit(pool, 2)
    placed = runs(pool, "n1", "n2")
    (r1,), (r2,) = placed["n1"], placed["n2"]
    pool.send("n1", "job_failed", job=r1["job"], reason="guest crashed", retry=False)
    summary = pool.job(job)
    assert summary["state"] == "failed" and "guest crashed" in summary["reason"]
    assert [m["job"] for m in pool.take("n2") if m["type"] == "cancel_job"] == [r2["job"]]
    assert pool.coordinator.nodes["n2"].running == set()


def test_a_lost_node_restarts_the_whole_gang_with_new_guests(pool):
    hello(pool, "n1")
    hello(pool, "n2")
    job = submit(pool, 2)
    first = runs(pool, "n1", "n2")
    pool.clock.advance(protocol.HEARTBEAT_INTERVAL_S * protocol.HEARTBEAT_LIVENESS + 1)
    pool.beat("n2")
    pool.housekeeping()  # n1 is silent: lost
    assert [m["job"] for m in pool.take("n2") if m["type"] == "cancel_job"] == [first["n2"][0]["job"]]
    assert pool.job(job)["state"] == "queued" and "rank" in pool.job(job)["reason"]
    hello(pool, "n3")
    second = runs(pool, "n2", "n3")
    assert len(second["n2"]) == 1 and len(second["n3"]) == 1 and pool.job(job)["attempts"] == 2
    old = {m["job"] for ms in first.values() for m in ms}
    assert not old & {m["job"] for ms in second.values() for m in ms}


def test_cancelling_a_gang_cancels_its_ranks(pool):
    hello(pool, "n1", cores=2)
    job = submit(pool, 2)
    placed = runs(pool, "n1")["n1"]
    assert pool.ask("cancel", job=job)["type"] == "ok"
    assert sorted(m["job"] for m in pool.take("n1") if m["type"] == "cancel_job") == sorted(
        m["job"] for m in placed)
    assert pool.job(job)["state"] == "cancelled" and pool.coordinator.nodes["n1"].running == set()


def test_a_gang_bigger_than_the_pool_waits_without_blocking_smaller_jobs(pool):
    hello(pool, "n1")
    big = submit(pool, 4)
    small = pool.submit()
    assert run_jobs(pool.take("n1")) == [small] and pool.job(big)["state"] == "queued"


def test_a_shared_network_is_named_by_the_admin_and_checked(pool):
    hello(pool, "n1", cores=2)
    job = submit(pool, 1, network="lab")
    (run,) = runs(pool, "n1")["n1"]
    assert run["net"]["network"] == "net:lab" and run["net"]["hostname"] == f"job{job}"
    bad = pool.ask("submit", argv=["true"], inputs={}, outputs=[], mem_mib=128, network="no spaces")
    assert bad["type"] == "error" and "network name" in bad["message"]


def test_a_gang_that_keeps_losing_ranks_fails_after_max_attempts(pool):
    job = submit(pool, 2)
    for _ in range(MAX_ATTEMPTS):
        hello(pool, "n1", cores=2)
        assert len(runs(pool, "n1")["n1"]) == 2
        pool.clock.advance(protocol.HEARTBEAT_INTERVAL_S * protocol.HEARTBEAT_LIVENESS + 1)
        pool.housekeeping()
    state = pool.job(job)
    assert state["state"] == "failed" and f"gave up after {MAX_ATTEMPTS} attempts" in state["reason"]


# --- a gang's ranks moved by the policies, each keeping its place (identity) in its gang -------------------------
def gang_on_two_of_three(pool: Pool) -> tuple[int, dict[str, dict]]:
    """A 2-rank gang on two of three one-slot nodes, n3 left idle; (gang, each rank's run_job by node)."""
    for name in ("n1", "n2"):
        hello(pool, name)
    job = submit(pool, 2)
    placed = runs(pool, "n1", "n2")
    hello(pool, "n3")
    return job, {name: ms[0] for name, ms in placed.items()}


def moved_in(pool: Pool, name: str) -> list[dict]:
    return [m for m in pool.take(name) if m["type"] == "move_in"]


def test_a_ranks_owner_coming_back_moves_the_rank_with_its_identity_not_the_gang_from_scratch(pool):
    job, placed = gang_on_two_of_three(pool)
    pool.beat("n1", "Suspended")  # rank 0's owner is back
    (move_in,) = moved_in(pool, "n3")
    assert move_in["job"] == placed["n1"]["job"] and move_in["net"] == placed["n1"]["net"]
    assert not [m for m in pool.take("n2") if m["type"] == "cancel_job"]
    assert pool.job(job)["state"] == "running" and pool.job(job)["attempts"] == 1


def test_drain_migrate_moves_a_rank_away(pool):
    job, placed = gang_on_two_of_three(pool)
    reply = pool.ask("drain", node="n2", migrate=True)
    assert reply["type"] == "ok" and "moving 1 of its 1 jobs" in reply["detail"], reply
    assert [m["job"] for m in moved_in(pool, "n3")] == [placed["n2"]["job"]]


def test_a_vacated_rank_is_loaded_and_moved_when_a_node_frees_up_instead_of_restarting_its_gang(pool):
    for name in ("n1", "n2"):
        hello(pool, name)
    job = submit(pool, 2)
    placed = {name: ms[0]["job"] for name, ms in runs(pool, "n1", "n2").items()}
    pool.beat("n1", "Suspended")
    pool.send("n1", "job_vacated", job=placed["n1"])
    pool.beat("n1", "Owner")
    hello(pool, "n3")
    pool.clock.advance(1.5)
    pool.housekeeping()
    assert [m["job"] for m in pool.take("n1") if m["type"] == "load_vacated"] == [placed["n1"]]
    pool.send("n1", "job_resumed", job=placed["n1"])  # loaded, paused: it moves at once
    assert [m["job"] for m in moved_in(pool, "n3")] == [placed["n1"]]
    assert pool.job(job)["attempts"] == 1


def configured(root, settings: str) -> Pool:
    root.mkdir()
    (root / "coordinator.toml").write_text(settings)
    return Pool(root)


def test_the_speed_policy_moves_a_rank_like_any_guest(tmp_path):
    pool = configured(tmp_path / "speed", "migrate_speedup = 1.5\n")
    try:
        job, placed = gang_on_two_of_three(pool)
        pool.send("n3", "hello", node="n3", cores=1, mem_mib=256, speed=5e6, state="Unclaimed", idle_s=60.0,
                  running=[], software="test")  # five times as fast as the gang's nodes
        pool.clock.advance(1.5)
        pool.housekeeping()
        (move_in,) = moved_in(pool, "n3")
        assert move_in["job"] in {m["job"] for m in placed.values()} and pool.job(job)["attempts"] == 1
    finally:
        pool.close()


def test_the_owner_load_policy_moves_a_rank_like_any_guest(tmp_path):
    pool = configured(tmp_path / "load", "migrate_owner_load = 0.3\nmigrate_owner_load_s = 2\n")
    try:
        job, placed = gang_on_two_of_three(pool)
        for _ in range(3):  # n2's owner stays busy past migrate_owner_load_s; n3's is quiet
            pool.send("n2", "heartbeat", node="n2", state="Claimed", idle_s=60.0, running=[], owner_load=0.9)
            pool.send("n3", "heartbeat", node="n3", state="Unclaimed", idle_s=60.0, running=[], owner_load=0.0)
            pool.beat("n1")
            pool.clock.advance(1.5)
            pool.housekeeping()
        assert [m["job"] for m in moved_in(pool, "n3")] == [placed["n2"]["job"]]
        assert pool.job(job)["attempts"] == 1
    finally:
        pool.close()
