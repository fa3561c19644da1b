# SPDX-License-Identifier: GPL-2.0-or-later
"""Arrays, launches, time limits, hold/release, followed logs, history and pending reasons, decided by a real
Coordinator in-process (the Pool of test_coordinator_decisions: real store, fake clock, in-memory transport)."""

from __future__ import annotations

import pytest

from coordinator import launch
from tests.unit.test_coordinator_decisions import NODES, Pool, run_jobs


@pytest.fixture
def pool(tmp_path):
    p = Pool(tmp_path)
    yield p
    p.close()


def finish(pool: Pool, node: str, job: int, status: int = 0, runtime_s: float = 1.5) -> None:
    pool.send(node, "job_finished", job=job, status=status, outputs={}, missing=[], runtime_s=runtime_s)


def test_an_array_is_one_submission_its_inputs_stored_once_each_task_substituted(pool):
    reply = pool.ask("submit", argv=["sh", "-c", "echo $(item)"], inputs={"data": b"x" * 1000}, outputs=["r$(index)"],
                     mem_mib=128, env={"N": "$(index)"}, modes={"data": 0o600}, items=["a", "b", "c"])
    ids = reply["jobs"]
    assert len(ids) == 3 and reply["job"] == ids[0]
    stored = pool.coordinator.store.db.execute("SELECT COUNT(*) FROM jobs WHERE LENGTH(inputs) > 100").fetchone()
    assert stored == (1,)
    pool.hello("n1", cores=3)
    runs = [m for m in pool.take("n1") if m["type"] == "run_job"]
    assert [m["job"] for m in runs] == ids
    for index, (message, item) in enumerate(zip(runs, "abc")):
        assert message["inputs"] == {"data": b"x" * 1000} and message["outputs"] == [f"r{index}"]
        assert message["argv"][0] == launch.SHELL and message["argv"][-3:] == ["sh", "-c", f"echo {item}"]
        assert str(index) in message["argv"] and "chmod 600 -- data" in message["argv"][2]
    job = pool.job(ids[2])
    assert (job["array"], job["task"], job["env"], job["argv"]) == (ids[0], 2, {"N": "2"}, ["sh", "-c", "echo c"])


def test_stdin_is_staged_beside_the_inputs_under_its_own_name(pool):
    pool.hello("n1")
    assert pool.ask("submit", argv=["cat"], inputs={}, outputs=[], mem_mib=128, stdin=b"in")["type"] == "submitted"
    (message,) = [m for m in pool.take("n1") if m["type"] == "run_job"]
    assert message["inputs"] == {launch.STDIN_INPUT: b"in"} and f"exec <{launch.STDIN_INPUT}" in message["argv"][2]
    clash = pool.ask("submit", argv=["cat"], inputs={launch.STDIN_INPUT: b""}, outputs=[], mem_mib=128, stdin=b"")
    assert clash["type"] == "error" and "rename that input" in clash["message"]


def test_a_job_past_its_time_limit_is_stopped_and_fails_with_the_reason(pool):
    pool.hello("n1")
    job = pool.ask("submit", argv=["sleep", "100"], inputs={}, outputs=[], mem_mib=128, timeout_s=60)["job"]
    assert run_jobs(pool.take("n1")) == [job]
    pool.clock.advance(59.0)
    pool.beat("n1", state="Unclaimed")
    pool.housekeeping()
    assert pool.job(job)["state"] == "running"
    pool.clock.advance(2.0)
    pool.beat("n1", state="Unclaimed")
    pool.housekeeping()
    assert pool.job(job)["state"] == "failed" and pool.job(job)["reason"] == "time limit 60 s reached"
    assert {"type": "cancel_job", "job": job} in [{k: m[k] for k in ("type", "job") if k in m}
                                                  for m in pool.take("n1")]


def test_a_held_job_is_not_placed_until_released(pool):
    job = pool.submit()
    assert pool.ask("hold", job=job)["detail"] == f"job {job} held"
    pool.hello("n1")
    assert run_jobs(pool.take("n1")) == [] and pool.job(job)["why"] == "held"
    assert pool.ask("release", job=job)["detail"] == f"job {job} released"
    assert run_jobs(pool.take("n1")) == [job]
    refused = pool.ask("hold", job=job)
    assert refused["type"] == "error" and refused["message"] == f"job {job} is running; only a queued job can be held"
    cancelled = pool.submit()
    pool.ask("hold", job=cancelled)
    assert pool.ask("cancel", job=cancelled)["type"] == "ok" and pool.job(cancelled)["state"] == "cancelled"


def test_followed_logs_come_in_order_from_a_cursor(pool):
    pool.hello("n1")
    job = pool.submit()
    pool.take("n1")
    pool.send("n1", "job_output", job=job, stream="stdout", data=b"one\n")
    first = pool.ask("logs", job=job, after=0)
    assert (first["stdout"], first["stderr"], first["more"]) == (b"one\n", b"", False)
    pool.send("n1", "job_output", job=job, stream="stderr", data=b"two\n")
    second = pool.ask("logs", job=job, after=first["cursor"])
    assert (second["stdout"], second["stderr"]) == (b"", b"two\n") and second["cursor"] > first["cursor"]
    assert pool.ask("logs", job=job, after=second["cursor"])["stdout"] == b""


def test_jobs_by_state_and_history_with_cpu_time(pool):
    pool.hello("n1")
    done, queued = pool.submit(), pool.submit()
    pool.take("n1")
    finish(pool, "n1", done, status=4, runtime_s=2.5)
    later = pool.submit()
    assert [j["id"] for j in pool.ask("jobs", states=["queued"])["jobs"]] == [later]
    bad = pool.ask("jobs", states=["sleeping"])
    assert bad["type"] == "error" and "no job state 'sleeping'" in bad["message"]
    history = pool.ask("jobs", history=True)["jobs"]
    assert [j["id"] for j in history] == [done]
    assert (history[0]["node"], history[0]["exit_status"], history[0]["cpu_s"]) == ("n1", 4, 2.5)
    assert queued not in [j["id"] for j in history]


def test_what_no_known_node_can_meet_is_refused_and_a_waiting_job_says_why(pool):
    for name in NODES[:-1]:
        pool.hello(name, mem_mib=256)
    job = pool.submit(mem_mib=512)  # an enrolled node not seen yet may be bigger
    assert pool.job(job)["why"] == "largest node offers 256 MiB"
    pool.hello(NODES[-1], mem_mib=256)
    refused = pool.send("admin", "submit", argv=["true"], inputs={}, outputs=[], mem_mib=512)[0]
    assert refused["type"] == "error" and "the largest node offers 256 MiB" in refused["message"]
    many = pool.send("admin", "submit", argv=["true"], inputs={}, outputs=[], mem_mib=128, guests=4)[0]
    assert many["type"] == "error" and "offer 3 such guest(s)" in many["message"]
