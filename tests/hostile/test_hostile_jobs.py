"""Hostile jobs against a real pool: one coordinator, one agent with one guest slot, real guests.

The job is the attacker: it runs as root in its guest and can write anything to the host channel. Each test
makes one attack, checks that it failed (or ended with that job alone failing, with a reason), and then runs an
ordinary job on the same node, which must succeed with exactly its own results.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from pool import Pool  # noqa: E402

pytestmark = pytest.mark.guest

NODE = "target"


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    pool = Pool(tmp_path_factory.mktemp("hostile"))
    pool.start_coordinator()
    pool.add_agent(NODE, "--owner", "away", "--cores", "1")
    try:
        pool.wait_until("the node is ready", lambda: pool.ready_nodes() == [NODE], timeout=180)
        yield pool
    finally:
        pool.close()


def wait(pool: Pool, job: int, timeout: float = 120) -> dict:
    pool.cli("wait", str(job), "--timeout", str(timeout), check=False, timeout=timeout + 30)
    return pool.jobs()[job]


def the_node_still_works(pool: Pool, tmp_path: Path) -> None:
    """An ordinary job right after the attack: its input in, its output out, nothing else in its guest."""
    assert pool.agents[NODE].poll() is None, "the agent died"
    data = tmp_path / "in.txt"
    data.write_text("genuine input\n")
    job = pool.submit("sh", "-c", "test ! -e /tmp/planted || echo PLANTED; ls /job; "
                      "tr a-z A-Z < in.txt > out.txt; echo done", inputs=(data,), outputs=("out.txt",))
    info = wait(pool, job)
    assert info["state"] == "done" and info["exit_status"] == 0, info
    assert info["node"] == NODE
    assert pool.cli("logs", str(job)).stdout == f"{job}\ndone\n".encode()
    out = tmp_path / f"fetched-{job}"
    pool.cli("fetch", str(job), str(out))
    assert (out / "out.txt").read_text() == "GENUINE INPUT\n"


def test_a_planted_process_cannot_touch_the_next_job(pool, tmp_path):
    planter = pool.submit("sh", "-c", "touch /tmp/planted; setsid sh -c 'while true; do "
                          "for f in /job/*/in.txt; do cp $f /tmp/stolen; done; "
                          "for d in /job/*; do echo tampered > $d/out.txt; done; sleep 0.05; done' "
                          "</dev/null >/dev/null 2>&1 & echo planted")
    assert wait(pool, planter)["state"] == "done"
    the_node_still_works(pool, tmp_path)


def test_a_forged_ready_discards_only_the_forger(pool, tmp_path):
    forger = pool.submit("sh", "-c", "touch /tmp/planted; printf 'R\\000\\000\\000\\000\\004\\000\\000\\000evil' "
                         "> /dev/hvc0; sleep 5; echo unreachable")
    info = wait(pool, forger)
    assert info["state"] == "failed" and "READY" in info["reason"], info
    the_node_still_works(pool, tmp_path)


@pytest.mark.parametrize("make, reason", [
    ("ln -s /dev/zero out.txt", "symbolic link"),
    ("mkfifo out.txt", "not a regular file"),
    ("dd if=/dev/zero of=out.txt bs=1 count=0 seek=100M 2>/dev/null", "more than the limit"),
    ("mkdir d; ln -s / d/up; ln -s d/up/etc/passwd out.txt", "symbolic link"),
])
def test_special_outputs_are_refused_with_a_reason(pool, tmp_path, make, reason):
    job = pool.submit("sh", "-c", f"{make}; echo made", outputs=("out.txt",))
    info = wait(pool, job)
    assert info["state"] == "done" and info["exit_status"] == 0, info
    assert "out.txt" in info["reason"] and reason in info["reason"], info
    the_node_still_works(pool, tmp_path)


def test_a_desynchronised_channel_ends_that_guest(pool, tmp_path):
    started = time.monotonic()
    job = pool.submit("sh", "-c", "printf 'O\\001\\000\\000\\000\\000\\000\\020\\000' > /dev/hvc0; echo after")
    info = wait(pool, job, timeout=90)
    assert info["state"] == "failed" and "stalled" in info["reason"], info
    assert time.monotonic() - started < 80
    the_node_still_works(pool, tmp_path)


def test_a_fork_bomb_is_cancelled_at_once(pool, tmp_path):
    job = pool.submit("sh", "-c", "echo bombing; b() { b | b & }; b")
    pool.wait_until("the bomb runs", lambda: pool.cli("logs", str(job)).stdout.startswith(b"bombing"), timeout=60)
    pool.cli("cancel", str(job))
    assert pool.jobs()[job]["state"] == "cancelled"
    the_node_still_works(pool, tmp_path)


def test_huge_stdout_is_capped_and_logs_still_work(pool, tmp_path):
    job = pool.submit("sh", "-c", "yes 0123456789abcdef | head -c 40000000; echo; echo tail >&2")
    info = wait(pool, job, timeout=300)
    assert info["state"] == "done" and info["exit_status"] == 0, info
    logs = pool.cli("logs", str(job), timeout=120)
    assert 15 << 20 <= len(logs.stdout) <= (16 << 20) + 200, (len(logs.stdout), logs.stdout[-100:])
    assert b"output truncated" in logs.stdout[-200:], (len(logs.stdout), logs.stdout[-100:])
    the_node_still_works(pool, tmp_path)


def test_each_guest_gets_its_own_randomness_and_the_right_time(pool, tmp_path):
    script = "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; mktemp; date +%s"
    jobs = [pool.submit("sh", "-c", script) for _ in range(2)]
    outputs = []
    for job in jobs:
        assert wait(pool, job)["state"] == "done"
        outputs.append(pool.cli("logs", str(job)).stdout.decode().split())
    (random_a, temp_a, time_a), (random_b, temp_b, time_b) = outputs
    assert re.fullmatch(r"[0-9a-f]{32}", random_a) and random_a != random_b
    assert temp_a != temp_b
    assert abs(int(time_a) - time.time()) < 120 and abs(int(time_b) - time.time()) < 120
