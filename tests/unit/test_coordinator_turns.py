# SPDX-License-Identifier: GPL-2.0-or-later
"""A loop turn of the coordinator (Coordinator.turn): its job transitions committed together, and nothing it sends
goes before they are durable; a node a held message cannot reach is lost at the turn's end and its job goes
elsewhere. The real Coordinator and SQLite store, an in-memory transport that looks at the database, as another
process would, at the moment of each send."""

from __future__ import annotations

import sqlite3

import pytest
from test_coordinator_decisions import ADMIN_KEY, Pool, run_jobs

from conode.cluster import protocol


class CommittedView:
    """Records, for each message sent, the job states another connection to the database sees at that moment."""

    def __init__(self, pool: Pool) -> None:
        self.db = sqlite3.connect(pool.state.database)
        self.seen: list[tuple[bytes, dict, dict[int, str]]] = []
        inner = pool.transport.send

        def send(identity: bytes, payload: bytes) -> bool:
            states = dict(self.db.execute("SELECT id, state FROM jobs"))
            self.seen.append((identity, protocol.decode(payload), states))
            return inner(identity, payload)

        pool.transport.send = send  # type: ignore[method-assign]

    def close(self) -> None:
        self.db.close()


def deliver(pool: Pool, who: str, kind: str, **fields) -> None:
    """A message from *who*, handled as the loop hands it over (its answer, if any, left where it went)."""
    key = ADMIN_KEY if who == "admin" else f"{who}-public-key"
    pool.coordinator.handle(who.encode(), key, protocol.encode(kind, **fields))


def submit(pool: Pool) -> None:
    deliver(pool, "admin", "submit", argv=["true"], inputs={}, outputs=[], mem_mib=128)


@pytest.fixture
def pool(tmp_path):
    p = Pool(tmp_path)
    yield p
    p.close()


def test_a_turns_messages_go_after_its_transitions_are_committed(pool):
    pool.hello("n1", cores=2)
    pool.hello("n2", cores=2)
    pool.take("n1"), pool.take("n2")
    view = CommittedView(pool)
    with pool.coordinator.turn():
        for _ in range(3):
            submit(pool)  # each placed at once; its reply and its run_job held back
        assert pool.transport.sent == [] and view.seen == []
        assert view.db.execute("SELECT COUNT(*) FROM jobs").fetchone() == (0,)  # one transaction, not yet committed
    jobs = [m["job"] for _, m, _ in view.seen if m["type"] == "submitted"]
    placed = {m["job"]: who for who, m, _ in view.seen if m["type"] == "run_job"}
    assert sorted(placed) == jobs
    for who, message, states in view.seen:
        if message["type"] == "run_job":
            assert states[message["job"]] == "running", message["job"]  # durable before the agent hears of it
        if message["type"] == "submitted":
            assert message["job"] in states
    with pool.coordinator.turn():
        deliver(pool, placed[jobs[0]].decode(), "job_finished", job=jobs[0], status=0, outputs={}, missing=[],
                runtime_s=0.1)
    (ack,) = [(m, states) for _, m, states in view.seen if m["type"] == "ack"]
    assert ack[0]["job"] == jobs[0] and ack[1][jobs[0]] == "done"
    view.close()


def test_a_node_a_held_message_cannot_reach_is_lost_after_the_turn_and_its_job_goes_elsewhere(pool):
    pool.hello("n1")
    pool.transport.unreachable.add(b"n1")
    with pool.coordinator.turn():
        submit(pool)
        assert pool.coordinator.nodes["n1"].running  # sent, as far as the turn knows
    (job,) = [m["job"] for m in pool.take("admin") if m["type"] == "submitted"]
    assert "n1" not in pool.coordinator.nodes
    state = pool.job(job)
    assert state["state"] == "queued" and "node n1 lost (unreachable)" in state["reason"]
    pool.hello("n2")
    assert run_jobs(pool.take("n2")) == [job]


def test_a_turn_that_stops_with_an_error_sends_nothing_it_held(pool):
    pool.hello("n1")
    pool.take("n1")
    with pytest.raises(KeyboardInterrupt):
        with pool.coordinator.turn():
            submit(pool)
            raise KeyboardInterrupt
    assert pool.take("n1") == [] and pool.take("admin") == []
    pool.beat("n1")  # and the next message is answered at once again, outside a turn
    assert pool.transport.sent == []  # a heartbeat has no answer
    (reply,) = pool.send("admin", "jobs")
    assert reply["type"] == "jobs_reply"
