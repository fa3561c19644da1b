# SPDX-License-Identifier: GPL-2.0-or-later
"""A gang's coordinated checkpoints as the coordinator runs them (coordinator/gang_checkpointing.py): a real
Coordinator on a real store with a fake clock, real pieces of a real machine's state, the agents played by the
test. The ranks stand still until every rank's piece is taken; pieces join their chains only as a complete set;
a gang that loses a rank goes on, every rank under its own id, from its newest set, once the nodes that ran the
stopped ranks have let them go."""

from __future__ import annotations

import logging
import random

import pytest
from test_checkpoint_pieces import machine_envelope, make_piece, put_piece, random_ram
from test_coordinator_decisions import Pool
from test_metrics import scrape, value

from conode.cluster import protocol
from conode.vm.checkpoint import FULL
from coordinator.gang_checkpointing import FENCE_MAX_S
from coordinator.gang_cuts import CUT_TIMEOUT_S, keep_timeout
from coordinator.metrics import CoordinatorCollector

INTERVAL_S = 5.0


@pytest.fixture
def pool(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "coordinator.toml").write_text(f"checkpoint_interval_s = {INTERVAL_S}\n")
    p = Pool(state)
    yield p
    p.close()


@pytest.fixture(scope="module")
def envelope():
    return machine_envelope()


def of_type(messages: list[dict], kind: str) -> list[dict]:
    return [m for m in messages if m["type"] == kind]


def gang_of_two(pool: Pool) -> tuple[int, dict[str, int]]:
    """A 2-rank gang on n1 and n2; (gang, rank id by node)."""
    for name in ("n1", "n2"):
        pool.hello(name)
    reply = pool.ask("submit", argv=["true"], inputs={}, outputs=[], mem_mib=128, guests=2)
    ranks = {}
    for name in ("n1", "n2"):
        (run,) = of_type(pool.take(name), "run_job")
        assert run["cuts"] is True and "checkpoint_s" not in run  # checkpointed in its gang's cuts only
        ranks[name] = run["job"]
    return reply["job"], ranks


def sweep(pool: Pool, seconds: float) -> None:
    pool.clock.advance(seconds)
    for name in ("n1", "n2", "n3"):
        if name in pool.coordinator.nodes:
            pool.beat(name, "Unclaimed")
    pool.housekeeping()


def begin_cut(pool: Pool, ranks: dict[str, int]) -> int:
    sweep(pool, INTERVAL_S + 0.5)
    cuts = {name: of_type(pool.take(name), "checkpoint_cut") for name in ranks}
    assert {name: [m["job"] for m in ms] for name, ms in cuts.items()} == {n: [r] for n, r in ranks.items()}
    (number,) = {ms[0]["cut"] for ms in cuts.values()}
    return number


def take_set(pool: Pool, tmp_path, envelope, ranks: dict[str, int], seq: int, outputs: int) -> int:
    """A cut whose pieces are all taken and kept: every rank's piece *seq* (full), each having written *outputs*
    bytes of stdout; the cut's number."""
    number = begin_cut(pool, ranks)
    for name, rank in ranks.items():
        pool.send(name, "cut_taken", job=rank, cut=number, seq=seq)
    for name, rank in ranks.items():
        assert of_type(pool.take(name), "cut_resume") == [
            {"v": protocol.PROTOCOL_VERSION, "type": "cut_resume", "job": rank, "cut": number}]
        piece = make_piece(tmp_path / f"r{rank}-{seq}", envelope, random_ram(random.Random(rank)), None, seq, FULL,
                           job=rank, outputs={"stdout": outputs, "stderr": 0})
        put_piece(pool, name, rank, piece, seq, FULL)
    return number


def test_the_ranks_go_on_once_every_piece_is_taken_and_the_pieces_join_their_chains_as_one_set(
        pool, tmp_path, envelope):
    gang, ranks = gang_of_two(pool)
    number = begin_cut(pool, ranks)
    pool.send("n1", "cut_ready", job=ranks["n1"], cut=number)  # pre-copied: it runs on until n2 is too
    assert not any(of_type(pool.take(name), "cut_final") for name in ranks)
    pool.send("n2", "cut_ready", job=ranks["n2"], cut=number)
    assert [[m["job"] for m in of_type(pool.take(name), "cut_final")] for name in ranks] == [[ranks["n1"]],
                                                                                             [ranks["n2"]]]
    assert pool.send("n1", "cut_taken", job=ranks["n1"], cut=number, seq=0) == []  # n1 stands still
    assert not of_type(pool.take("n2"), "cut_resume")
    pool.send("n2", "cut_taken", job=ranks["n2"], cut=number, seq=0)
    assert [len(of_type(pool.take(name), "cut_resume")) for name in ranks] == [1, 1]
    first = make_piece(tmp_path / "a", envelope, random_ram(random.Random(1)), None, 0, FULL, job=ranks["n1"])
    assert not of_type(put_piece(pool, "n1", ranks["n1"], first, 0, FULL), "checkpoint_reply")  # kept aside
    assert pool.coordinator.checkpoints.chain(ranks["n1"]) == []
    second = make_piece(tmp_path / "b", envelope, random_ram(random.Random(2)), None, 0, FULL, job=ranks["n2"])
    assert [m["ok"] for m in of_type(put_piece(pool, "n2", ranks["n2"], second, 0, FULL), "checkpoint_reply")] == [
        True]
    assert [m["ok"] for m in of_type(pool.take("n1"), "checkpoint_reply")] == [True]
    assert [[link.seq for link in pool.coordinator.checkpoints.chain(r)] for r in ranks.values()] == [[0], [0]]
    assert [(g, n, p) for g, n, p, _ in pool.coordinator.store.cut_sets()] == [
        (gang, number, [(ranks["n1"], 0), (ranks["n2"], 0)])]


def test_a_cut_not_taken_in_time_is_discarded_its_ranks_go_on_and_the_set_before_stays(pool, tmp_path, envelope):
    gang, ranks = gang_of_two(pool)
    kept = take_set(pool, tmp_path, envelope, ranks, 0, 4)
    number = begin_cut(pool, ranks)
    pool.send("n1", "cut_taken", job=ranks["n1"], cut=number, seq=1)  # n2's never comes
    sweep(pool, CUT_TIMEOUT_S + 1)
    n1, n2 = pool.take("n1"), pool.take("n2")
    assert [m["cut"] for m in of_type(n1, "cut_resume")] == [number] and not of_type(n2, "cut_resume")
    assert [m["ok"] for m in of_type(n1, "checkpoint_reply") + of_type(n2, "checkpoint_reply")] == [False, False]
    late = make_piece(tmp_path / "late", envelope, random_ram(random.Random(3)), None, 1, FULL, job=ranks["n1"])
    refused = of_type(put_piece(pool, "n1", ranks["n1"], late, 1, FULL), "checkpoint_reply")
    assert [m["ok"] for m in refused] == [False] and "no cut" in refused[0]["reason"]
    assert [link.seq for link in pool.coordinator.checkpoints.chain(ranks["n1"])] == [0]
    assert [n for _, n, _, _ in pool.coordinator.store.cut_sets()] == [kept]
    # a word of a cut given up lets the rank go on
    assert of_type(pool.send("n2", "cut_taken", job=ranks["n2"], cut=number, seq=1), "cut_resume")


def test_a_piece_its_agent_could_not_take_or_send_discards_the_cut_at_once_and_the_next_begins_on_schedule(
        pool, tmp_path, envelope):
    gang, ranks = gang_of_two(pool)
    kept = take_set(pool, tmp_path, envelope, ranks, 0, 4)
    number = begin_cut(pool, ranks)
    pool.send("n1", "cut_taken", job=ranks["n1"], cut=number, seq=1)  # n1 stands still
    pool.send("n2", "cut_failed", job=ranks["n2"], cut=number + 1, reason="x")  # not the cut under way
    pool.send("n1", "cut_failed", job=ranks["n2"], cut=number, reason="x")  # not n2's rank's node
    assert not pool.take("n1") and not pool.take("n2") and gang in pool.coordinator.cuts.open
    pool.send("n2", "cut_failed", job=ranks["n2"], cut=number, reason="piece 1 not taken: disk full")
    n1, n2 = pool.take("n1"), pool.take("n2")
    assert [m["cut"] for m in of_type(n1, "cut_resume")] == [number] and not of_type(n2, "cut_resume")
    replies = of_type(n1, "checkpoint_reply") + of_type(n2, "checkpoint_reply")
    assert [m["ok"] for m in replies] == [False, False] and "disk full" in replies[0]["reason"]
    assert gang not in pool.coordinator.cuts.open
    assert [n for _, n, _, _ in pool.coordinator.store.cut_sets()] == [kept]
    # after its final copy, its piece not sent (the link busy): the next cut comes an interval after this one
    assert begin_cut(pool, ranks) == number + 1
    for name, rank in ranks.items():
        pool.send(name, "cut_taken", job=rank, cut=number + 1, seq=2)
    pool.send("n1", "cut_failed", job=ranks["n1"], cut=number + 1, reason="piece 2 not sent: the link is busy")
    assert [m["ok"] for name in ranks for m in of_type(pool.take(name), "checkpoint_reply")] == [False, False]
    assert begin_cut(pool, ranks) == number + 2


def test_the_pieces_may_take_what_their_largest_size_takes_and_no_longer(pool):
    gang, ranks = gang_of_two(pool)  # two guests of 128 MiB, no disk
    number = begin_cut(pool, ranks)
    cut = pool.coordinator.cuts.open[gang]
    assert cut.keep_s == keep_timeout(2 * (128 << 20)) < 300.0
    for name, rank in ranks.items():
        pool.send(name, "cut_taken", job=rank, cut=number, seq=0)
        pool.take(name)
    sweep(pool, cut.keep_s - 1)
    assert gang in pool.coordinator.cuts.open
    sweep(pool, 1.5)
    messages = {name: pool.take(name) for name in ranks}
    assert [m["ok"] for name in ranks for m in of_type(messages[name], "checkpoint_reply")] == [False, False]
    assert {m["cut"] for name in ranks for m in of_type(messages[name], "checkpoint_cut")} == {number + 1}


def test_a_gang_that_loses_a_rank_goes_on_from_its_set_under_its_ranks_own_ids(pool, tmp_path, envelope, caplog):
    caplog.set_level(logging.INFO, logger="coordinator")
    gang, ranks = gang_of_two(pool)
    for name, rank in ranks.items():
        pool.send(name, "job_output", job=rank, stream="stdout", data=b"one\n")
    number = take_set(pool, tmp_path, envelope, ranks, 0, 4)
    for name, rank in ranks.items():
        pool.send(name, "job_output", job=rank, stream="stdout", data=b"two\n")  # after the set: said again
    pool.hello("n3")
    pool.clock.advance(protocol.HEARTBEAT_INTERVAL_S * protocol.HEARTBEAT_LIVENESS + 1)
    pool.beat("n2", "Unclaimed")
    pool.beat("n3", "Unclaimed")
    pool.housekeeping()  # n1 is silent: lost; n2 is told to stop its rank
    assert [m["job"] for m in of_type(pool.take("n2"), "cancel_job")] == [ranks["n2"]]
    assert pool.job(gang)["state"] == "queued"
    pool.beat("n2", "Unclaimed")  # n2 lets the rank go (running=[]): one heartbeat is not enough yet
    assert not of_type(pool.take("n3"), "run_job")
    pool.beat("n2", "Unclaimed")
    placed = {name: of_type(messages, "run_job") for name in ("n2", "n3") if (messages := pool.take(name))}
    runs = sorted((m for ms in placed.values() for m in ms), key=lambda m: m["net"]["rank"])
    assert [m["job"] for m in runs] == [ranks["n1"], ranks["n2"]]  # the same guests, the same identities
    for run in runs:
        chain = pool.coordinator.checkpoints.chain(run["job"])
        assert run["resume"] == [link.wire() for link in chain] and run["cuts"] is True
    assert pool.job(gang)["state"] == "running" and pool.job(gang)["attempts"] == 2
    for rank in ranks.values():
        assert pool.coordinator.store.job(rank).state == "running"
        assert pool.ask("logs", job=gang, rank=list(ranks.values()).index(rank))["stdout"] == b"one\n"
    assert f"every rank to go on from set {number}" in caplog.text


def test_a_rank_that_cannot_go_on_from_the_set_drops_it_and_the_gang_starts_afresh(pool, tmp_path, envelope):
    gang, ranks = gang_of_two(pool)
    take_set(pool, tmp_path, envelope, ranks, 0, 0)
    pool.send("n1", "job_failed", job=ranks["n1"], reason="guest crashed", retry=True)  # restarts the gang
    for _ in range(2):
        pool.beat("n1", "Unclaimed")
        pool.beat("n2", "Unclaimed")
    runs = [m for name in ("n1", "n2") for m in of_type(pool.take(name), "run_job")]
    assert sorted(m["job"] for m in runs) == sorted(ranks.values()) and all("resume" in m for m in runs)
    pool.send("n1", "job_failed", job=ranks["n1"], reason="the job could not go on from its checkpoint: x",
              retry=True)
    assert pool.coordinator.cuts.newest(gang) is None and pool.coordinator.store.cut_sets() == []
    assert all(pool.coordinator.checkpoints.chain(rank) == [] for rank in ranks.values())
    for _ in range(2):
        pool.beat("n1", "Unclaimed")
        pool.beat("n2", "Unclaimed")
    runs = [m for name in ("n1", "n2") for m in of_type(pool.take(name), "run_job")]
    assert len(runs) == 2 and not set(m["job"] for m in runs) & set(ranks.values())  # afresh: new ranks
    assert all("resume" not in m for m in runs) and pool.job(gang)["attempts"] == 3


def lose_n1(pool: Pool) -> None:
    pool.hello("n3")
    pool.clock.advance(protocol.HEARTBEAT_INTERVAL_S * protocol.HEARTBEAT_LIVENESS + 1)
    pool.beat("n2", "Unclaimed")
    pool.beat("n3", "Unclaimed")
    pool.housekeeping()


def test_a_restarted_coordinator_fences_a_gang_stopped_before_it_and_gives_up_on_a_node_that_never_lets_go(
        tmp_path, envelope):
    state = tmp_path / "state"
    state.mkdir()
    (state / "coordinator.toml").write_text(f"checkpoint_interval_s = {INTERVAL_S}\n")
    pool = Pool(state)
    gang, ranks = gang_of_two(pool)
    take_set(pool, tmp_path, envelope, ranks, 0, 0)
    lose_n1(pool)  # requeued to go on from its set, n2 fenced
    pool.close()
    pool = Pool(state)  # a new coordinator on the same store, before n2 let its rank go
    try:
        pool.hello("n2", running=(ranks["n2"],))  # still listed: the fence holds
        pool.hello("n3")
        for _ in range(3):
            pool.send("n2", "heartbeat", node="n2", state="Unclaimed", idle_s=60.0, running=[ranks["n2"]])
        assert not [m for name in ("n2", "n3") for m in of_type(pool.take(name), "run_job")]
        pool.clock.advance(FENCE_MAX_S + 1)
        pool.send("n2", "heartbeat", node="n2", state="Unclaimed", idle_s=60.0, running=[ranks["n2"]])
        pool.beat("n3", "Unclaimed")
        pool.housekeeping()  # it waited long enough: placed anyway, from its set
        runs = [m for name in ("n2", "n3") for m in of_type(pool.take(name), "run_job")]
        assert sorted(m["job"] for m in runs) == sorted(ranks.values()) and all("resume" in m for m in runs)
    finally:
        pool.close()


def test_the_metrics_count_cuts_begun_sets_kept_and_cuts_discarded_by_why(pool, tmp_path, envelope):
    collector = CoordinatorCollector(pool.coordinator)
    before = scrape(collector)
    assert value(before, "conode_coordinator_gang_cuts_total") == 0
    assert value(before, "conode_coordinator_gang_cuts_discarded_total", reason="late") == 0
    gang, ranks = gang_of_two(pool)
    number = begin_cut(pool, ranks)  # kept 0.3 s after it began
    for name, rank in ranks.items():
        pool.send(name, "cut_taken", job=rank, cut=number, seq=0)
    pool.clock.advance(0.3)
    for name, rank in ranks.items():
        piece = make_piece(tmp_path / f"r{rank}", envelope, random_ram(random.Random(rank)), None, 0, FULL, job=rank)
        put_piece(pool, name, rank, piece, 0, FULL)
    number = begin_cut(pool, ranks)  # a piece its agent could not send
    pool.send("n1", "cut_failed", job=ranks["n1"], cut=number, reason="piece 1 not sent: the link is busy")
    number = begin_cut(pool, ranks)  # a piece refused on arrival
    for name, rank in ranks.items():
        pool.send(name, "cut_taken", job=rank, cut=number, seq=2)
    pool.send("n1", "checkpoint_put", job=ranks["n1"], seq=2, index=1, data=b"x")  # out of order
    begin_cut(pool, ranks)  # not taken in time, by a sweep that begins the next, which a rank lost ends
    sweep(pool, CUT_TIMEOUT_S + 0.5)
    lose_n1(pool)
    after = scrape(collector)
    assert value(after, "conode_coordinator_gang_cuts_total") == 5
    assert value(after, "conode_coordinator_gang_sets_total") == 1
    assert {reason: value(after, "conode_coordinator_gang_cuts_discarded_total", reason=reason)
            for reason in ("late", "refused", "rank_lost", "piece_failed")} == {
        "late": 1, "refused": 1, "rank_lost": 1, "piece_failed": 1}
    assert value(after, "conode_coordinator_gang_set_seconds_count") == 1
    assert value(after, "conode_coordinator_gang_set_seconds_sum") == pytest.approx(0.3)
    assert value(after, "conode_coordinator_gang_set_seconds_bucket", le="0.25") == 0
    assert value(after, "conode_coordinator_gang_set_seconds_bucket", le="0.5") == 1
