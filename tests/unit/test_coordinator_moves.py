# SPDX-License-Identifier: GPL-2.0-or-later
"""Moves of running guests as the coordinator decides them (coordinator/moves.py, moving.py): a real Coordinator
on a real store with a fake clock and an in-memory transport (test_coordinator_decisions.Pool), the agents played
by the test. What is checked: ownership changes hands only on move_ready, in the store first; stale epochs are
refused; every failure before the hand-over leaves the job on its source; a restart resolves from the store."""

from __future__ import annotations

import pytest
from test_coordinator_decisions import Pool, run_jobs

from conode.cluster.protocol import PROTOCOL_VERSION
from coordinator.moves import MOVE_HOLD_S, MOVE_TIMEOUT_S, ActiveMove, MoveBook, toward_speed
from coordinator.placement import NodeView
from coordinator.server import HOUSEKEEPING_EVERY_S
from coordinator.store import Store


@pytest.fixture
def pool(tmp_path):
    p = Pool(tmp_path)
    yield p
    p.close()


def running_job(pool: Pool) -> tuple[int, str]:
    """Three idle nodes and one job running on one of them; (job, its node)."""
    for name in ("n1", "n2", "n3"):
        pool.hello(name)
    job = pool.submit()
    node = next(name for name in ("n1", "n2", "n3") if job in run_jobs(pool.take(name)))
    return job, node


def of_type(messages: list[dict], kind: str) -> list[dict]:
    return [m for m in messages if m["type"] == kind]


def start(pool: Pool, job: int, to: str) -> dict:
    reply = pool.ask("migrate", job=job, to=to)
    assert reply["type"] == "ok" and f"moving to {to}" in reply["detail"], reply
    (move_in,) = of_type(pool.take(to), "move_in")
    return move_in


def listening(pool: Pool, to: str, move_in: dict) -> dict:
    pool.send(to, "move_listening", job=move_in["job"], epoch=move_in["epoch"], endpoint="tcp://10.0.0.9:4000",
              key=f"{to}-public-key")
    return move_in


def test_a_move_hands_the_job_over_in_the_store_before_the_source_may_say_go(pool, tmp_path):
    job, source = running_job(pool)
    target = next(n for n in ("n1", "n2", "n3") if n != source)
    move_in = start(pool, job, target)
    assert move_in["epoch"] == 1 and move_in["source_key"] == f"{source}-public-key"
    assert move_in["net"]["ip"] and move_in["mem_mib"] == 128
    listening(pool, target, move_in)
    (move_out,) = of_type(pool.take(source), "move_out")
    assert move_out["endpoint"] == "tcp://10.0.0.9:4000" and move_out["key"] == f"{target}-public-key"
    assert pool.job(job)["node"] == source and pool.job(job)["moving_to"] == target

    # Output from the source until it says ready is the job's; the hand-over is in the store before GO goes.
    pool.send(source, "job_output", job=job, stream="stdout", data=b"before\n")
    answer = pool.send(source, "move_ready", job=job, epoch=1)
    assert of_type(answer, "move_go") == [{"v": PROTOCOL_VERSION, "type": "move_go", "job": job, "epoch": 1}]
    store = Store(tmp_path / "coordinator.db")
    assert store.job(job).node == target and [m.state for m in store.moves([job])[job]] == ["go"]
    store.close()
    pool.send(source, "job_output", job=job, stream="stdout", data=b"stale\n")  # the source has no say now
    pool.send(target, "move_arrived", job=job, epoch=1)
    pool.send(target, "job_output", job=job, stream="stdout", data=b"after\n")
    pool.send(source, "move_sent", job=job, epoch=1, downtime_s=0.05, total_s=1.5, bytes=12 << 20, rounds=2)
    summary = pool.job(job)
    assert summary["node"] == target and summary["moves"] == 1 and summary["ran_on"] == [source, target]
    assert summary["last_downtime_s"] == 0.05 and "moving_to" not in summary
    assert pool.ask("logs", job=job)["stdout"] == b"before\nafter\n"

    pool.send(target, "job_finished", job=job, status=0, outputs={}, missing=[], runtime_s=3.0)
    assert pool.job(job)["state"] == "done" and pool.job(job)["attempts"] == 1


def test_stale_epochs_are_refused_and_a_second_move_takes_the_next_epoch(pool):
    job, source = running_job(pool)
    target = next(n for n in ("n1", "n2", "n3") if n != source)
    listening(pool, target, start(pool, job, target))
    pool.take(source)
    assert of_type(pool.send(source, "move_ready", job=job, epoch=7), "move_abort")  # no such move
    assert of_type(pool.send(target, "move_ready", job=job, epoch=1), "move_abort")  # not the source
    assert pool.job(job)["node"] == source
    assert of_type(pool.send(source, "move_ready", job=job, epoch=1), "move_go")
    pool.send(target, "move_arrived", job=job, epoch=1)
    back = start(pool, job, source)
    assert back["epoch"] == 2
    assert of_type(pool.send(target, "move_arrived", job=job, epoch=1), "move_abort")  # the old move's word


@pytest.mark.parametrize("failure", ["destination fails", "source fails", "destination lost", "source lost",
                                     "timeout", "job ends"])
def test_every_failure_before_the_hand_over_leaves_the_job_on_its_source(pool, failure):
    job, source = running_job(pool)
    target = next(n for n in ("n1", "n2", "n3") if n != source)
    listening(pool, target, start(pool, job, target))
    pool.take(source)
    if failure == "destination fails":
        pool.send(target, "move_failed", job=job, epoch=1, reason="no room")
    elif failure == "source fails":
        pool.send(source, "move_failed", job=job, epoch=1, reason="the link failed")
    elif failure in ("destination lost", "source lost"):
        pool.send(target if failure == "destination lost" else source, "bye",
                  node=target if failure == "destination lost" else source)
    elif failure == "timeout":
        pool.clock.advance(MOVE_TIMEOUT_S + 2)
        for name in ("n1", "n2", "n3"):
            pool.beat(name, "Unclaimed" if name != source else "Claimed")
        pool.housekeeping()
        pool.clock.advance(HOUSEKEEPING_EVERY_S + 1)
        pool.housekeeping()
    else:
        pool.send(source, "job_finished", job=job, status=0, outputs={}, missing=[], runtime_s=1.0)
    summary = pool.job(job)
    assert "moving_to" not in summary and summary.get("moves") == 0
    if failure == "source lost":  # its job runs again elsewhere, as any job of a lost node
        assert summary["state"] in ("queued", "running") and summary["node"] != source
    elif failure == "job ends":
        assert summary["state"] == "done"
    else:
        assert summary["state"] == "running" and summary["node"] == source and summary["attempts"] == 1
        assert of_type(pool.take(source), "move_abort") or failure == "source fails"
    assert of_type(pool.send(source, "move_ready", job=job, epoch=1), "move_abort") or failure == "source lost"


def test_after_the_hand_over_a_destination_that_never_ran_the_guest_costs_the_job_a_new_attempt(pool):
    job, source = running_job(pool)
    target = next(n for n in ("n1", "n2", "n3") if n != source)
    listening(pool, target, start(pool, job, target))
    assert of_type(pool.send(source, "move_ready", job=job, epoch=1), "move_go")
    pool.send(target, "move_failed", job=job, epoch=1, reason="no GO came")
    summary = pool.job(job)
    assert summary["moves"] == 0 and summary["state"] in ("queued", "running")
    assert summary["state"] == "queued" or summary["attempts"] == 2  # from the start, anywhere


def test_a_coordinator_restart_resolves_moves_from_the_store(tmp_path):
    first = Pool(tmp_path)
    job, source = running_job(first)
    target = next(n for n in ("n1", "n2", "n3") if n != source)
    listening(first, target, start(first, job, target))
    other = next(n for n in ("n1", "n2", "n3") if n not in (source, target))
    first.close()

    # Being prepared when the coordinator died: called off; both nodes hear it when they say hello.
    second = Pool(tmp_path, first.clock)
    assert of_type(second.hello(source, running=(job,), state="Claimed"), "move_abort")
    answer = second.hello(target, running=(job,))
    assert of_type(answer, "move_abort") and of_type(answer, "cancel_job")
    assert second.job(job)["node"] == source and "moving_to" not in second.job(job)

    # Handed over when it died: the destination owns it, and its hello with the job ends the move.
    second.hello(other)
    listening(second, other, start(second, job, other))
    assert second.job(job)["moves"] == 0
    second.send(source, "job_output", job=job, stream="stdout", data=b"12345\n")
    assert of_type(second.send(source, "move_ready", job=job, epoch=2), "move_go")
    second.close()
    third = Pool(tmp_path, first.clock)
    answer = third.hello(other, running=(job,), state="Claimed")
    assert not of_type(answer, "cancel_job")
    # its checkpoints go on from where the hand-over left them, as if the coordinator had not restarted
    (start_,) = of_type(answer, "checkpoint_start")
    assert (start_["job"], start_["stdout"], start_["stderr"]) == (job, 6, 0) and start_["interval_s"] > 0
    assert of_type(third.hello(source, state="Unclaimed", running=(job,)), "cancel_job")  # it has no say now
    summary = third.job(job)
    assert summary["node"] == other and summary["moves"] == 1 and summary["ran_on"] == [source, other]
    third.close()


def test_the_owners_return_moves_its_guest_to_an_idle_node(pool):
    job, source = running_job(pool)
    pool.beat(source, "Suspended")  # the owner is back: the guest is paused there
    moving = [name for name in ("n1", "n2", "n3") if of_type(pool.take(name), "move_in")]
    assert len(moving) == 1 and moving[0] != source and pool.job(job)["moving_to"] == moving[0]
    assert pool.ask("migrate", job=job)["type"] == "error"  # already moving


def test_with_no_idle_node_the_owners_guest_stays_until_one_frees_up(pool):
    for name in ("n1", "n2", "n3"):
        pool.hello(name)
    jobs = {name: job for job in (pool.submit() for _ in range(3)) for name in ("n1", "n2", "n3")
            if job in run_jobs(pool.take(name))}
    pool.beat("n1", "Suspended")
    assert not any(of_type(pool.take(name), "move_in") for name in ("n2", "n3"))
    pool.send("n3", "job_finished", job=jobs["n3"], status=0, outputs={}, missing=[], runtime_s=1.0)
    pool.clock.advance(1.5)
    pool.housekeeping()  # the sweep finds the paused guest a place
    assert [m["job"] for m in of_type(pool.take("n3"), "move_in")] == [jobs["n1"]]


def test_drain_migrate_moves_the_nodes_jobs_away(pool):
    job, source = running_job(pool)
    reply = pool.ask("drain", node=source, migrate=True)
    assert reply["type"] == "ok" and "moving 1 of its 1 jobs" in reply["detail"], reply
    assert pool.job(job)["moving_to"] != source


def test_a_job_that_cannot_move_says_why(pool):
    job, source = running_job(pool)
    assert "cannot take" in pool.ask("migrate", job=job, to=source)["message"]
    assert "not connected" in pool.ask("migrate", job=job, to="elsewhere")["message"]
    queued = [pool.submit() for _ in range(3)][-1]  # the other two nodes take two: this one waits
    assert "is queued" in pool.ask("migrate", job=queued)["message"]
    assert "no such job" in pool.ask("migrate", job=999)["message"]


def test_the_move_book_holds_a_moved_job_for_a_while():
    book = MoveBook()
    book.start(ActiveMove(1, 1, "a", "b", "go", 0.0, "test"))
    assert book.current(1, 1) is not None and book.current(1, 2) is None
    book.end(1, 10.0, moved=True)
    assert book.held(1, 10.0 + MOVE_HOLD_S / 2) and not book.held(1, 10.0 + MOVE_HOLD_S + 1)
    assert not book.held(2, 0.0)


def test_toward_speed_moves_the_slowest_nodes_job_to_the_fastest_idle_node_with_hysteresis():
    nodes = [NodeView("slow", "Claimed", 1, 256, 1, 0.0), NodeView("mid", "Claimed", 1, 256, 1, 0.0),
             NodeView("fast", "Unclaimed", 1, 256, 0, 60.0), NodeView("small", "Unclaimed", 1, 64, 0, 60.0),
             NodeView("away", "Owner", 1, 256, 0, 0.0)]
    speeds = {"slow": 100.0, "mid": 180.0, "fast": 200.0, "small": 900.0, "away": 1000.0}
    jobs = {"slow": [(1, 128)], "mid": [(2, 128)]}
    assert toward_speed(nodes, speeds, jobs, 1.5, lambda job: False) == (1, "fast")
    assert toward_speed(nodes, speeds, jobs, 1.5, lambda job: job == 1) is None  # mid is not slow enough
    assert toward_speed(nodes, speeds, jobs, 0, lambda job: False) is None  # off
    assert toward_speed(nodes, speeds, jobs, 2.5, lambda job: False) is None


def test_the_speed_policy_moves_a_guest_once_then_holds_it(tmp_path):
    (tmp_path / "coordinator.toml").write_text("migrate_speedup = 1.5\n")
    pool = Pool(tmp_path)
    pool.hello("n1")
    job = pool.submit()
    assert run_jobs(pool.take("n1")) == [job]
    pool.send("n2", "hello", node="n2", cores=1, mem_mib=256, speed=5e6, state="Unclaimed", idle_s=60.0,
              running=[], software="test")
    pool.clock.advance(1.5)
    pool.housekeeping()
    (move_in,) = of_type(pool.take("n2"), "move_in")
    listening(pool, "n2", move_in)
    assert of_type(pool.send("n1", "move_ready", job=job, epoch=1), "move_go")
    pool.send("n2", "move_arrived", job=job, epoch=1)
    pool.send("n1", "hello", node="n1", cores=1, mem_mib=256, speed=5e7, state="Unclaimed", idle_s=60.0,
              running=[], software="test")
    pool.clock.advance(1.5)
    pool.housekeeping()
    assert not of_type(pool.take("n1"), "move_in")  # faster still, but it moved a moment ago
    pool.close()


def test_a_guest_vacated_while_no_node_was_free_is_loaded_and_moved_when_one_frees_up(pool):
    pool.hello("n1")
    job = pool.submit()
    assert run_jobs(pool.take("n1")) == [job]
    pool.beat("n1", "Suspended")
    pool.send("n1", "job_vacated", job=job)
    pool.beat("n1", "Owner")
    pool.clock.advance(1.5)
    pool.housekeeping()
    assert not of_type(pool.take("n1"), "load_vacated")  # nowhere to go
    pool.hello("n2")  # a workstation frees up
    pool.clock.advance(1.5)
    pool.housekeeping()
    assert [m["job"] for m in of_type(pool.take("n1"), "load_vacated")] == [job]
    pool.beat("n1", "Owner")
    pool.beat("n2", "Unclaimed")
    pool.clock.advance(1.5)
    pool.housekeeping()
    assert not of_type(pool.take("n1"), "load_vacated")  # asked once, not every sweep
    pool.send("n1", "job_resumed", job=job)  # loaded, paused: it moves at once
    (move_in,) = of_type(pool.take("n2"), "move_in")
    assert move_in["job"] == job and pool.job(job)["moving_to"] == "n2"
