# SPDX-License-Identifier: GPL-2.0-or-later
"""The coordinator's decisions, in-process and without sleeps: a real Coordinator on a real SQLite store, a fake
clock, and an in-memory transport in place of the ROUTER socket. Messages are real encoded frames handed to
``Coordinator.handle`` as the socket would hand them; replies are decoded from what it sent."""

from __future__ import annotations

import math

import msgpack
import pytest

from conode import limits
from conode.cluster import protocol
from conode.cluster.protocol import PROTOCOL_VERSION
from conode.testing.clock import FakeClock
from coordinator.config import StateDir
from coordinator.server import MAX_ATTEMPTS, ORPHAN_GRACE_S, VACATED_HOLD_S, Coordinator
from conode.output_cap import DOWNSTREAM_LIMIT, TRUNCATION_NOTE
from coordinator.store import Store

ADMIN_KEY = "admin-public-key"
NODES = ("n1", "n2", "n3")


class MemoryTransport:
    """What the coordinator sent, per peer; peers in ``unreachable`` refuse delivery as a vanished one does."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, bytes]] = []
        self.unreachable: set[bytes] = set()

    def send(self, identity: bytes, payload: bytes) -> bool:
        if identity in self.unreachable:
            return False
        self.sent.append((identity, payload))
        return True

    def close(self) -> None:
        pass


class Pool:
    """A coordinator and the peers that talk to it; each peer is an identity and an enrolled key."""

    def __init__(self, root, clock: FakeClock | None = None) -> None:
        self.state = StateDir(root)
        if not self.state.database.exists():
            store = Store(self.state.database)
            store.add_key("admin", "admin", ADMIN_KEY)
            for name in NODES:
                store.add_key(name, "agent", f"{name}-public-key")
            store.close()
        self.clock = clock or FakeClock()
        self.transport = MemoryTransport()
        self.coordinator = Coordinator(self.state, clock=self.clock, transport=self.transport)

    def close(self) -> None:
        self.coordinator.close()

    # --- sending --------------------------------------------------------------------------------------------
    def frame(self, who: str, frame: bytes) -> list[dict]:
        """Hand *frame* from *who* to the coordinator; return what it sent to *who* in answer.

        An admin's replies are consumed here; an agent's stay for :meth:`take` too.
        """
        identity = who.encode()
        key = ADMIN_KEY if who == "admin" else f"{who}-public-key"
        before = len(self.transport.sent)
        self.coordinator.handle(identity, key, frame)
        answers = [protocol.decode(p) for i, p in self.transport.sent[before:] if i == identity]
        if who == "admin":
            self.take(who)
        return answers

    def send(self, who: str, kind: str, **fields) -> list[dict]:
        return self.frame(who, protocol.encode(kind, **fields))

    def ask(self, kind: str, **fields) -> dict:
        """An admin request and its one reply."""
        (reply,) = self.send("admin", kind, **fields)
        return reply

    def take(self, who: str) -> list[dict]:
        """The messages sent to *who* since last asked."""
        identity = who.encode()
        mine = [protocol.decode(p) for i, p in self.transport.sent if i == identity]
        self.transport.sent = [(i, p) for i, p in self.transport.sent if i != identity]
        return mine

    # --- agents ---------------------------------------------------------------------------------------------
    def hello(self, name: str, cores: int = 1, running: tuple[int, ...] = (), state: str = "Unclaimed",
              mem_mib: int = 256) -> list[dict]:
        return self.send(name, "hello", node=name, cores=cores, mem_mib=mem_mib, speed=1e6, state=state,
                         idle_s=60.0, running=list(running), software="test")

    def beat(self, name: str, state: str = "Claimed") -> list[dict]:
        return self.send(name, "heartbeat", node=name, state=state, idle_s=60.0, running=[])

    def submit(self, mem_mib: int = 128, argv: tuple[str, ...] = ("true",)) -> int:
        reply = self.ask("submit", argv=list(argv), inputs={}, outputs=[], mem_mib=mem_mib)
        assert reply["type"] == "submitted", reply
        return reply["job"]

    def job(self, job_id: int) -> dict:
        return self.ask("job", job=job_id)["job"]

    def housekeeping(self) -> None:
        self.coordinator.housekeeping()


@pytest.fixture
def pool(tmp_path):
    p = Pool(tmp_path)
    yield p
    p.close()


def run_jobs(messages: list[dict]) -> list[int]:
    return [m["job"] for m in messages if m["type"] == "run_job"]


# --- submit limits ------------------------------------------------------------------------------------------
def raw_submit(**changes) -> bytes:
    fields = {"argv": ["true"], "inputs": {}, "outputs": [], "mem_mib": 128, **changes}
    return msgpack.packb({"v": PROTOCOL_VERSION, "type": "submit", **fields}, use_bin_type=True)


@pytest.mark.parametrize("changes,says", [
    ({"outputs": ["../x"]}, "'outputs' holds '../x', which is not a relative path"),
    ({"outputs": [f"o{i}" for i in range(limits.MAX_FILES + 1)]}, f"at most {limits.MAX_FILES}"),
    ({"argv": ["x" * 4000] * 70}, f"at most {limits.MAX_ARGV_BYTES - protocol.JOB_CWD_BYTES} are allowed"),
    ({"argv": ["x"] * (limits.MAX_ARGV + 1)}, f"at most {limits.MAX_ARGV}"),
    ({"inputs": {"a": b"\0" * (limits.MAX_JOB_INPUT_BYTES + 1)}}, f"at most {limits.MAX_JOB_INPUT_BYTES}"),
    ({"inputs": {f"i{i}": b"" for i in range(limits.MAX_FILES + 1)}}, f"at most {limits.MAX_FILES}"),
    ({"mem_mib": limits.MIN_GUEST_MEM_MIB - 1}, "'mem_mib' must be an integer from 48 to 768"),
    ({"mem_mib": limits.MAX_GUEST_MEM_MIB + 1}, "'mem_mib' must be an integer from 48 to 768"),
])
def test_a_submission_over_a_limit_gets_a_clear_error_and_queues_nothing(pool, changes, says):
    pool.hello("n1")
    (reply,) = pool.frame("admin", raw_submit(**changes))
    assert reply["type"] == "error" and reply["code"] == "malformed"
    assert says in reply["message"]
    assert pool.coordinator.store.job_counts() == {} and len(pool.coordinator.queue) == 0
    assert run_jobs(pool.take("n1")) == []  # nothing placed


def test_a_submission_at_the_limits_is_accepted_and_placed(pool):
    pool.hello("n1", mem_mib=limits.MAX_GUEST_MEM_MIB)
    job = pool.submit(mem_mib=limits.MAX_GUEST_MEM_MIB, argv=("x",) * limits.MAX_ARGV)
    (run,) = [m for m in pool.take("n1") if m["type"] == "run_job"]
    assert run["job"] == job and len(run["argv"]) == limits.MAX_ARGV


def test_an_empty_command_is_refused(pool):
    (reply,) = pool.frame("admin", raw_submit(argv=[]))
    assert reply["type"] == "error" and reply["code"] == "invalid" and "command" in reply["message"]


# --- what nodes report --------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,bad", [("cores", 0), ("mem_mib", 4096), ("speed", math.nan), ("idle_s", math.inf),
                                       ("idle_s", -1.0)])
def test_a_bad_hello_gets_an_error_and_the_node_is_not_registered(pool, field, bad):
    fields = {"node": "n1", "cores": 1, "mem_mib": 128, "speed": 1.0, "state": "Unclaimed", "idle_s": 0.0,
              "running": [], "software": "x", field: bad}
    frame = msgpack.packb({"v": PROTOCOL_VERSION, "type": "hello", **fields}, use_bin_type=True)
    (reply,) = pool.frame("n1", frame)
    assert reply["type"] == "error" and f"'{field}'" in reply["message"]
    assert pool.coordinator.nodes == {} and not pool.coordinator.open_nodes
    pool.submit()
    assert pool.take("n1") == [reply]  # only the error: no job goes to it
    (reply,) = pool.beat("n1")  # and it is still unknown: it must say a proper hello
    assert reply["type"] == "reconnect"


# --- liveness -----------------------------------------------------------------------------------------------
def test_a_dead_nodes_job_is_requeued_when_its_liveness_expires(pool):
    silence = protocol.HEARTBEAT_INTERVAL_S * protocol.HEARTBEAT_LIVENESS
    pool.hello("n1")
    job = pool.submit()
    assert run_jobs(pool.take("n1")) == [job]
    pool.clock.advance(silence - 0.5)
    pool.housekeeping()
    assert pool.job(job)["state"] == "running" and "n1" in pool.coordinator.nodes
    pool.clock.advance(1.0)  # silent for longer than the liveness allows
    pool.housekeeping()
    assert "n1" not in pool.coordinator.nodes
    state = pool.job(job)
    assert state["state"] == "queued" and "node n1 lost (missed its heartbeats)" in state["reason"]
    pool.hello("n2")
    assert run_jobs(pool.take("n2")) == [job]
    assert pool.job(job)["node"] == "n2" and pool.job(job)["attempts"] == 2


def test_a_node_that_keeps_beating_keeps_its_job(pool):
    pool.hello("n1")
    job = pool.submit()
    for _ in range(20):
        pool.clock.advance(protocol.HEARTBEAT_INTERVAL_S)
        pool.beat("n1")
        pool.housekeeping()
    assert pool.job(job)["state"] == "running" and pool.job(job)["attempts"] == 1


def test_a_job_whose_nodes_keep_dying_fails_after_max_attempts(pool):
    job = pool.submit()
    for attempt in range(MAX_ATTEMPTS):
        pool.hello("n1")
        assert run_jobs(pool.take("n1")) == [job]
        pool.clock.advance(protocol.HEARTBEAT_INTERVAL_S * protocol.HEARTBEAT_LIVENESS + 1)
        pool.housekeeping()
    state = pool.job(job)
    assert state["state"] == "failed" and f"gave up after {MAX_ATTEMPTS} attempts" in state["reason"]


def test_an_unreachable_node_is_dropped_and_the_job_goes_elsewhere(pool):
    pool.hello("n1")
    pool.hello("n2")
    pool.transport.unreachable.add(b"n1")
    pool.transport.unreachable.add(b"n2")
    job = pool.submit()  # both chosen in turn, both unreachable
    assert pool.coordinator.nodes == {} and pool.job(job)["state"] == "queued"
    pool.hello("n3")
    assert run_jobs(pool.take("n3")) == [job]


# --- vacated jobs -------------------------------------------------------------------------------------------
def test_a_vacated_job_is_held_for_its_node_then_requeued(pool):
    pool.hello("n1")
    job = pool.submit()
    assert run_jobs(pool.take("n1")) == [job]
    pool.send("n1", "job_vacated", job=job)  # the owner came back; the guest was saved to n1's disk
    pool.beat("n1", state="Owner")
    assert pool.job(job)["state"] == "vacated"
    pool.hello("n2")  # an idle node: the job is not moved while held for n1
    assert run_jobs(pool.take("n2")) == []
    pool.clock.advance(VACATED_HOLD_S - 2)  # both nodes go silent meanwhile
    pool.housekeeping()
    assert pool.coordinator.nodes == {} and pool.job(job)["state"] == "vacated"
    pool.hello("n2")
    pool.housekeeping()
    assert run_jobs(pool.take("n2")) == [] and pool.job(job)["state"] == "vacated"
    pool.clock.advance(3)
    pool.beat("n2", state="Unclaimed")
    pool.housekeeping()  # the hold is over
    assert run_jobs(pool.take("n2")) == [job]
    state = pool.job(job)
    assert state["state"] == "running" and state["node"] == "n2"
    assert "vacated on n1 for over" in state["reason"]


def test_a_vacated_job_resumes_on_its_node(pool):
    pool.hello("n1")
    job = pool.submit()
    pool.take("n1")
    pool.send("n1", "job_vacated", job=job)
    other = pool.submit()
    assert run_jobs(pool.take("n1")) == [other]  # the slot was freed by the vacated job
    pool.send("n1", "job_finished", job=other, status=0, outputs={}, missing=[], runtime_s=1.0)
    assert pool.send("n1", "job_resumed", job=job) == []
    assert pool.job(job)["state"] == "running" and job in pool.coordinator.nodes["n1"].running


def test_a_vacated_job_whose_guest_cannot_be_resumed_runs_again(pool):
    pool.hello("n1")
    job = pool.submit()
    pool.take("n1")
    pool.send("n1", "job_vacated", job=job)
    pool.send("n1", "job_failed", job=job, reason="its saved guest was discarded: no base image", retry=True)
    answers = pool.take("n1")
    assert {"v": PROTOCOL_VERSION, "type": "ack", "job": job} in answers
    assert run_jobs(answers) == [job]  # placed again at once, not held for an hour
    assert pool.job(job)["state"] == "running" and "no base image" in pool.job(job)["reason"]


# --- a coordinator restart ----------------------------------------------------------------------------------
def test_a_restarted_coordinator_recovers_running_and_queued_jobs(tmp_path):
    first = Pool(tmp_path)
    first.hello("n1", cores=2)
    kept, lost = first.submit(), first.submit()
    first.hello("n3")
    on_n3, waiting = first.submit(), first.submit()
    assert run_jobs(first.take("n1")) == [kept, lost] and run_jobs(first.take("n3")) == [on_n3]
    first.close()  # as if killed: nothing more is written

    second = Pool(tmp_path, clock=FakeClock(50_000.0))  # another process: its own clock
    assert list(second.coordinator.queue) == [waiting]
    # n1 comes back holding one of its jobs and one this coordinator never placed there.
    replies = second.hello("n1", cores=2, running=(kept, 999))
    kinds = [(m["type"], m.get("job")) for m in replies]
    assert ("cancel_job", 999) in kinds
    assert any(m["type"] == "welcome" for m in replies)
    # The job n1 lost is queued again, ahead of the one that was waiting, and goes to the free slot.
    assert run_jobs(replies) == [lost]
    assert second.job(lost)["attempts"] == 2 and "restarted without it" in second.job(lost)["reason"]
    assert second.job(kept)["state"] == "running" and second.job(kept)["attempts"] == 1
    # n3 never comes back: after the grace period its job is requeued.
    for _ in range(int(ORPHAN_GRACE_S) + 2):
        second.clock.advance(1.0)
        second.beat("n1", state="Claimed")
        second.housekeeping()
    assert second.job(on_n3)["state"] == "queued" and "did not come back" in second.job(on_n3)["reason"]
    assert second.job(kept)["state"] == "running"
    second.close()


def test_output_sent_before_the_node_says_hello_to_a_restarted_coordinator_is_kept(tmp_path):
    first = Pool(tmp_path)
    first.hello("n1")
    job = first.submit()
    first.send("n1", "job_output", job=job, stream="stdout", data=b"before ")
    first.close()
    second = Pool(tmp_path, clock=FakeClock(50_000.0))
    # n1's socket reconnected by itself: its output arrives before it learns it must say hello.
    (reply,) = second.send("n1", "job_output", job=job, stream="stdout", data=b"during ")
    assert reply["type"] == "reconnect"
    second.send("n1", "job_output", job=999, stream="stdout", data=b"not its job")  # nothing stored
    second.send("n2", "job_output", job=job, stream="stdout", data=b"wrong node")  # nor from another node
    second.hello("n1", running=(job,))
    second.send("n1", "job_output", job=job, stream="stdout", data=b"after")
    assert second.ask("logs", job=job)["stdout"] == b"before during after"
    second.close()


# --- cancel -------------------------------------------------------------------------------------------------
def test_cancelling_a_running_job_tells_its_node_and_frees_the_slot(pool):
    pool.hello("n1")
    job, queued = pool.submit(), pool.submit()
    assert run_jobs(pool.take("n1")) == [job]
    reply = pool.ask("cancel", job=job)
    assert reply["type"] == "ok" and "cancelled" in reply["detail"]
    messages = pool.take("n1")
    assert {"type": "cancel_job", "job": job, "v": PROTOCOL_VERSION} in messages
    assert run_jobs(messages) == [queued]  # the freed slot takes the next job
    assert pool.job(job)["state"] == "cancelled"


def test_a_cancelled_queued_job_is_never_placed(pool):
    first, second = pool.submit(), pool.submit()
    assert pool.ask("cancel", job=first)["type"] == "ok"
    pool.hello("n1")
    assert run_jobs(pool.take("n1")) == [second]
    assert pool.ask("cancel", job=first)["detail"] == f"job {first} is already cancelled"


# --- placement ----------------------------------------------------------------------------------------------
def test_a_job_no_node_can_hold_does_not_block_the_queue_and_waits_for_a_big_node(pool):
    pool.hello("n1", cores=4, mem_mib=128)
    big = pool.submit(mem_mib=512)
    small = pool.submit(mem_mib=64)
    assert run_jobs(pool.take("n1")) == [small]
    pool.hello("n2", mem_mib=512)
    assert run_jobs(pool.take("n2")) == [big]


def test_jobs_wait_in_order_while_the_pool_is_full(pool):
    pool.hello("n1")
    jobs = [pool.submit() for _ in range(5)]
    assert run_jobs(pool.take("n1")) == jobs[:1]
    assert list(pool.coordinator.queue) == jobs[1:] and not pool.coordinator.open_nodes
    for done, following in zip(jobs, jobs[1:]):
        pool.send("n1", "job_finished", job=done, status=0, outputs={}, missing=[], runtime_s=0.1)
        assert run_jobs(pool.take("n1")) == [following]
    assert len(pool.coordinator.queue) == 0


def test_owner_and_drain_close_a_node_and_reopen_it(pool):
    pool.hello("n1", state="Owner")
    job = pool.submit()
    assert run_jobs(pool.take("n1")) == []
    pool.beat("n1", state="Unclaimed")
    assert run_jobs(pool.take("n1")) == [job]
    pool.send("n1", "job_finished", job=job, status=0, outputs={}, missing=[], runtime_s=0.1)
    assert pool.ask("drain", node="n1")["type"] == "ok"
    later = pool.submit()
    assert run_jobs(pool.take("n1")) == []
    pool.ask("drain", node="n1", undrain=True)
    assert run_jobs(pool.take("n1")) == [later]


# --- output and time ----------------------------------------------------------------------------------------
def test_a_chatty_job_is_stored_up_to_the_stream_limit_and_logs_always_fit(pool):
    pool.hello("n1")
    job = pool.submit()
    chunk = b"y" * (1 << 20)
    for i in range(limits.MAX_STREAM_BYTES // len(chunk) + 4):
        pool.send("n1", "job_output", job=job, stream="stderr" if i % 2 else "stdout", data=chunk)
    reply = pool.ask("logs", job=job)
    stored = reply["stdout"] + reply["stderr"]
    assert len(stored) == DOWNSTREAM_LIMIT + len(TRUNCATION_NOTE)
    assert stored.count(TRUNCATION_NOTE) == 1
    assert len(protocol.encode("logs_reply", **{k: reply[k] for k in ("job", "stdout", "stderr")})) \
        < limits.MAX_FRAME_BYTES


def test_records_are_stamped_with_the_coordinators_clock(pool):
    job = pool.submit()
    pool.clock.advance(120.0)
    pool.hello("n1")
    pool.clock.advance(30.0)
    pool.send("n1", "job_finished", job=job, status=3, outputs={"out": b"x"}, missing=["gone: not found"],
              runtime_s=30.0)
    state = pool.job(job)
    assert state["started_at"] - state["submitted_at"] == pytest.approx(120.0)
    assert state["finished_at"] - state["started_at"] == pytest.approx(30.0)
    assert state["exit_status"] == 3 and "gone: not found" in state["reason"]


def test_a_job_list_always_fits_one_reply(pool):
    long_command = ["prog"] + ["a" * 4000] * 64  # 256 KiB of arguments: 1,000 of these would not fit
    job = pool.submit(argv=tuple(long_command))
    for _ in range(3):
        pool.submit()
    for limit, listed in ((-1, 0), (10**9, 4), (2, 2)):  # -1 is no limit to SQLite: clamped, as is 10**9
        reply = pool.ask("jobs", limit=limit)
        assert reply["type"] == "jobs_reply" and len(reply["jobs"]) == listed
    listed = next(j for j in pool.ask("jobs")["jobs"] if j["id"] == job)
    assert listed["argv_truncated"] and listed["argv"][0] == "prog" and len(listed["argv"]) < len(long_command)
    assert pool.job(job)["argv"] == long_command  # `job` gives the whole command


def test_a_job_queued_under_older_rules_fails_with_the_reason_instead_of_reaching_a_node(tmp_path):
    first = Pool(tmp_path)
    first.close()
    store = Store(first.state.database)  # what an older coordinator accepted
    old = store.add_job(["cat"], {}, ["../outside"], 128, "admin")
    store.close()
    pool = Pool(tmp_path)
    fine = pool.submit()
    assert run_jobs(pool.hello("n1")) == [fine]
    state = pool.job(old)
    assert state["state"] == "failed" and "not runnable within the pool's limits" in state["reason"]
    assert "'outputs'" in state["reason"] and len(pool.coordinator.queue) == 0
    pool.close()
