# SPDX-License-Identifier: GPL-2.0-or-later
"""Users: who may do what, whose jobs are whose, and fair share between them, decided by a real Coordinator
in-process (the Pool of test_coordinator_decisions: real store, fake clock, in-memory transport), and the pure
permission rules of coordinator/users.py."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from conode import limits
from conode.cluster import protocol
from coordinator.store import Store
from coordinator.users import ADMIN, AGENT, USER, Requester, check_user_name, may_manage, may_send
from tests.unit.test_coordinator_decisions import NODES, Pool, raw_submit, run_jobs

USERS = ("alice", "bob")


@pytest.fixture
def pool(tmp_path):
    p = Pool(tmp_path)
    for name in USERS:
        p.coordinator.store.add_key(name, USER, f"{name}-public-key")
    yield p
    p.close()


def ask_as(pool: Pool, who: str, kind: str, **fields) -> dict:
    """A client request from *who* (an admin or a user) and its one reply."""
    (reply,) = pool.send(who, kind, **fields)
    pool.take(who)
    return reply


def submit_as(pool: Pool, who: str, *argv: str, **extra) -> int:
    reply = ask_as(pool, who, "submit", argv=list(argv or ("true",)), inputs={}, outputs=[], mem_mib=128, **extra)
    assert reply["type"] == "submitted", reply
    return reply["job"]


def finish(pool: Pool, node: str, job: int) -> list[dict]:
    return pool.send(node, "job_finished", job=job, status=0, outputs={}, missing=[], runtime_s=1.0)


def check_shares(pool: Pool) -> None:
    """The running share of every owner is what the nodes run of theirs."""
    coordinator = pool.coordinator
    counted: dict[str, int] = {}
    for node in coordinator.nodes.values():
        for guest in node.running:
            owner = coordinator.store.job(guest).owner
            counted[owner] = counted.get(owner, 0) + 1
    for owner in {*counted, "admin", *USERS}:
        assert coordinator.queue.shares.running(owner) == counted.get(owner, 0), owner


# --- the rules ------------------------------------------------------------------------------------------------
def test_who_may_send_what():
    assert may_send(ADMIN, "client") and may_send(USER, "client") and may_send(ADMIN, "admin")
    assert not may_send(USER, "admin") and not may_send(USER, "agent") and not may_send(AGENT, "client")
    assert not may_send(None, "client") and not may_send(None, "admin") and may_send(AGENT, "agent")
    assert not may_send(ADMIN, "agent") and not may_send("stranger", "client")


def test_who_may_manage_a_job():
    alice, bob, admin = Requester("alice", USER), Requester("bob", USER), Requester("root", ADMIN)
    assert may_manage(alice, "alice") and not may_manage(alice, "bob") and not may_manage(bob, "alice")
    assert may_manage(admin, "alice") and may_manage(admin, "") and not may_manage(alice, "")
    assert not may_manage(Requester("n1", AGENT), "n1")  # a node's key never manages jobs, even "its own"


@pytest.mark.parametrize("name", ["alice", "j.doe", "r2-d2", "a_b", "x" * 32])
def test_good_user_names(name):
    assert check_user_name(name) is None


@pytest.mark.parametrize("name", ["", "Alice", "1abc", "-x", "a b", "a/b", "a$b", "x" * 33, "ü"])
def test_bad_user_names_say_what_a_name_is(name):
    assert "lower-case letters" in check_user_name(name)


# --- in the coordinator ---------------------------------------------------------------------------------------
def test_a_users_job_is_theirs_and_everyone_sees_it(pool):
    job = submit_as(pool, "alice", "echo", "hi")
    mine = submit_as(pool, "admin")
    listed = {j["id"]: j for j in ask_as(pool, "bob", "jobs")["jobs"]}
    assert listed[job]["owner"] == "alice" and listed[mine]["owner"] == "admin"
    assert [j["id"] for j in ask_as(pool, "bob", "jobs", user="alice")["jobs"]] == [job]
    assert ask_as(pool, "bob", "jobs", user="carol")["jobs"] == []
    assert ask_as(pool, "bob", "job", job=job)["job"]["owner"] == "alice"


def test_only_the_owner_or_an_admin_may_cancel(pool):
    pool.hello("n1")
    job = submit_as(pool, "alice")
    queued = submit_as(pool, "alice")
    reply = ask_as(pool, "bob", "cancel", job=job)
    assert reply["type"] == "error" and reply["code"] == "forbidden"
    assert reply["message"] == (f"job {job} belongs to alice; bob may cancel only their own jobs (an admin may "
                                f"cancel any)")
    assert pool.job(job)["state"] == "running"
    assert ask_as(pool, "alice", "cancel", job=queued)["type"] == "ok"
    assert ask_as(pool, "admin", "cancel", job=job)["type"] == "ok"
    assert pool.job(job)["state"] == "cancelled" and "cancelled by admin" in pool.job(job)["reason"]
    assert ask_as(pool, "bob", "cancel", job=10_000)["code"] == "not-found"
    check_shares(pool)


def test_only_the_owner_or_an_admin_may_hold_and_release(pool):
    job = submit_as(pool, "alice")  # no node: it stays queued
    for kind in ("hold", "release"):
        if kind == "release":
            assert ask_as(pool, "alice", "hold", job=job)["type"] == "ok"
        reply = ask_as(pool, "bob", kind, job=job)
        assert reply["code"] == "forbidden" and reply["message"] == (
            f"job {job} belongs to alice; bob may {kind} only their own jobs (an admin may {kind} any)")
    assert pool.job(job)["state"] == "held"
    assert ask_as(pool, "alice", "release", job=job)["type"] == "ok"
    assert ask_as(pool, "admin", "hold", job=job)["type"] == "ok"
    assert ask_as(pool, "admin", "release", job=job)["type"] == "ok"
    pool.hello("n1")
    assert run_jobs(pool.take("n1")) == [job]  # released into its owner's queue, and placed
    check_shares(pool)


def test_an_array_is_its_submitters_with_its_priority(pool):
    reply = ask_as(pool, "bob", "submit", argv=["echo", "$(item)"], inputs={}, outputs=[], mem_mib=128,
                   items=["a", "b", "c"], priority=-1)
    first = ask_as(pool, "bob", "submit", argv=["first"], inputs={}, outputs=[], mem_mib=128)["job"]
    alice = submit_as(pool, "alice")
    pool.hello("n1", cores=5)
    # bob's priority-0 job before his array at -1; alice's turn comes second
    assert run_jobs(pool.take("n1")) == [first, alice, *reply["jobs"]]
    assert {pool.job(j)["owner"] for j in reply["jobs"]} == {"bob"}


@pytest.mark.parametrize("kind,fields,command", [
    ("drain", {"node": "n1"}, "drain"), ("forget", {"node": "n1"}, "forget"),
    ("image_rm", {"name": "img"}, "image rm"), ("image_missing", {"chunks": []}, "image add"),
    ("user_add", {"name": "carol", "public_key": "k"}, "user add"), ("users", {}, "user list"),
    ("user_rm", {"name": "bob"}, "user rm"),
])
def test_a_user_key_cannot_do_what_is_for_admins(pool, kind, fields, command):
    pool.hello("n1")
    reply = ask_as(pool, "alice", kind, **fields)
    assert reply["type"] == "error" and reply["code"] == "forbidden"
    assert reply["message"] == f"`coordinator {command}` is for the pool's admins; alice is a user's key (ask an admin)"
    assert pool.coordinator.drained == set() and pool.coordinator.store.key_owner("bob-public-key") == ("bob", USER)


def test_agents_are_not_clients_and_users_are_not_agents(pool):
    assert ask_as(pool, "n1", "status")["code"] == "forbidden"
    reply = ask_as(pool, "alice", "hello", node="alice", cores=1, mem_mib=128, speed=1.0, state="Unclaimed",
                   idle_s=0.0, running=[], software="x")
    assert reply["code"] == "forbidden" and "alice is a user's key" in reply["message"]
    assert "alice" not in pool.coordinator.nodes


def test_admins_add_list_and_remove_users(pool):
    public, _ = zmq.curve_keypair()
    key = public.decode()
    assert ask_as(pool, "admin", "user_add", name="carol", public_key=key)["detail"] == "user carol added"
    assert pool.coordinator.store.key_owner(key) == ("carol", USER)
    submit_as(pool, "alice")
    users = {u["name"]: u for u in ask_as(pool, "admin", "users")["users"]}
    assert set(users) == {"alice", "bob", "carol"} and users["carol"]["public_key"] == key
    assert users["alice"]["queued"] == 1 and users["alice"]["running"] == 0
    for name, key_, says in [("carol", key, "already enrolled"), ("Carol", key, "lower-case letters"),
                             ("dave", "not-a-key", "not a CURVE public key"), ("n1", key, "already enrolled")]:
        reply = ask_as(pool, "admin", "user_add", name=name, public_key=key_)
        assert reply["type"] == "error" and says in reply["message"], reply
    reply = ask_as(pool, "admin", "user_rm", name="n1")
    assert reply["type"] == "error" and "n1 is an agent key, not a user" in reply["message"]
    assert ask_as(pool, "admin", "user_rm", name="zed")["code"] == "not-found"
    assert ask_as(pool, "admin", "user_rm", name="alice")["type"] == "ok"
    # revoked at once, not after the key cache's delay; her queued job stays hers
    assert ask_as(pool, "alice", "status")["code"] == "forbidden"
    assert [j["owner"] for j in ask_as(pool, "admin", "jobs")["jobs"]] == ["alice"]


def test_keys_changed_by_another_process_count_from_the_next_housekeeping(pool):
    """`coordinator keys add|remove` writes the database from its own process while the coordinator serves."""
    assert ask_as(pool, "alice", "status")["type"] == "status_reply"  # her enrolment is cached now
    assert ask_as(pool, "dave", "status")["code"] == "forbidden"  # and that dave's key is not enrolled
    other = Store(pool.state.database)
    try:
        other.remove_key("alice")
        other.add_key("dave", USER, "dave-public-key")
    finally:
        other.close()
    pool.housekeeping()
    assert ask_as(pool, "alice", "status")["code"] == "forbidden"
    assert ask_as(pool, "dave", "status")["type"] == "status_reply"


def test_a_user_with_many_jobs_does_not_starve_another(pool):
    alice = [submit_as(pool, "alice", "a", str(i)) for i in range(6)]
    bob = [submit_as(pool, "bob", "b", str(i)) for i in range(2)]
    pool.hello("n1", cores=4)
    assert run_jobs(pool.take("n1")) == [alice[0], bob[0], alice[1], bob[1]]
    check_shares(pool)
    finish(pool, "n1", bob[0])  # bob runs one, alice two: the free slot is alice's turn (bob has none queued)
    assert run_jobs(pool.take("n1")) == [alice[2]]
    late = submit_as(pool, "bob", "b", "late")
    finish(pool, "n1", alice[0])  # alice runs two, bob one: bob's late job goes before alice's older ones
    assert run_jobs(pool.take("n1")) == [late]
    check_shares(pool)


def test_priorities_order_a_users_own_jobs(pool):
    low = submit_as(pool, "alice", "low")
    high = submit_as(pool, "alice", "high", priority=10)
    bobs = submit_as(pool, "bob", "bob", priority=-3)
    pool.hello("n1", cores=3)
    assert run_jobs(pool.take("n1")) == [high, bobs, low]
    assert pool.job(high)["priority"] == 10
    (reply,) = pool.frame("alice", raw_submit(priority=limits.MAX_JOB_PRIORITY + 1))
    assert reply["code"] == "malformed" and f"'priority' must be an integer from -{limits.MAX_JOB_PRIORITY}" in \
        reply["message"]


def test_running_shares_follow_lost_nodes_vacated_and_restarted_agents(pool):
    pool.hello("n1", cores=2)
    pool.hello("n2", cores=2)
    jobs = [submit_as(pool, owner) for owner in ("alice", "alice", "bob", "bob")]
    check_shares(pool)
    on_n1 = sorted(pool.coordinator.nodes["n1"].running)
    pool.send("n2", "job_vacated", job=min(pool.coordinator.nodes["n2"].running))
    check_shares(pool)
    pool.clock.advance(protocol.HEARTBEAT_INTERVAL_S * protocol.HEARTBEAT_LIVENESS + 1)
    pool.beat("n2", state="Owner")
    pool.housekeeping()  # n1 went silent: its jobs go back to the queue
    assert "n1" not in pool.coordinator.nodes
    check_shares(pool)
    pool.hello("n1", cores=2, running=tuple(on_n1))  # it comes back still running them? too late: requeued
    check_shares(pool)
    pool.hello("n2", cores=2, running=())  # restarted without its job
    check_shares(pool)
    assert {pool.job(j)["state"] for j in jobs} <= {"queued", "running", "vacated"}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["submit", "finish", "fail", "vacate", "resume", "cancel", "lose",
                                           "hello", "gang"]),
                          st.sampled_from(("admin", *USERS)), st.sampled_from(NODES), st.integers(0, 30)),
                max_size=40))
def test_running_shares_stay_true_whatever_happens(events):
    """Whatever jobs start, end, move, vacate or are lost with their nodes, each owner's running share is what
    the nodes run of theirs, and no queued job waits while a node it fits has a free slot."""
    with tempfile.TemporaryDirectory() as root:
        pool = Pool(Path(root))
        try:
            for name in USERS:
                pool.coordinator.store.add_key(name, USER, f"{name}-public-key")
            for name in NODES:
                pool.hello(name, cores=2)
            for event, who, node, pick in events:
                coordinator = pool.coordinator
                running = sorted(coordinator.nodes[node].running) if node in coordinator.nodes else []
                guest = running[pick % len(running)] if running else None
                if event == "submit":
                    submit_as(pool, who)
                elif event == "gang":
                    ask_as(pool, who, "submit", argv=["true"], inputs={}, outputs=[], mem_mib=128, guests=2)
                elif event == "finish" and guest is not None:
                    finish(pool, node, guest)
                elif event == "fail" and guest is not None:
                    pool.send(node, "job_failed", job=guest, reason="test", retry=pick % 2 == 0)
                elif event == "vacate" and guest is not None:
                    pool.send(node, "job_vacated", job=guest)
                elif event == "resume":
                    vacated = coordinator.store.vacated_jobs(node)
                    if vacated and node in coordinator.nodes:
                        pool.send(node, "job_resumed", job=vacated[pick % len(vacated)])
                elif event == "cancel":
                    ask_as(pool, "admin", "cancel", job=pick + 1)
                elif event == "lose" and node in coordinator.nodes:
                    coordinator._lose_node(coordinator.nodes[node], "test")
                elif event == "hello":
                    pool.hello(node, cores=2, running=tuple(running[:pick % 3]))
                for name in NODES:
                    pool.take(name)
                check_shares(pool)
                free = sum(n.cores - len(n.running) for n in coordinator.nodes.values())
                assert not (free >= 2 and len(coordinator.queue)) or all(
                    n.state != "Unclaimed" for n in coordinator.nodes.values()), "a job waits beside free slots"
        finally:
            pool.close()
