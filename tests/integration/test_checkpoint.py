"""Checkpoints end to end: a coordinator and two agents as separate processes, real guests.

A job prints a known sequence over about 20 s while it is checkpointed every 3 s; the agent running it is
SIGKILLed in the middle. The job must go on from its last checkpoint on the other agent (not start again: a
random token it drew at its start, printed before the kill, is the one it prints at its end) and its output
must be exactly an uninterrupted run's, each line once. The same for a job on a pool image, whose disk overlay
goes with its checkpoints: what it wrote to its disk before is there after the move. A job vacated to disk by
its workstation's owner and resumed there is checkpointed again, and goes on from those checkpoints; so is a job
moved to another agent, once its guest runs there.
"""

import json
import re
import shutil
import subprocess
import sys

import pytest
from pool import Pool
from test_owner_cycle import start_owner_aware_agent

from conode.testing.root_image import root_image
from conode.tomlfile import read_toml, write_toml

pytestmark = pytest.mark.guest

LINES = 20
JOB = ("t=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \\n'); echo token $t; i=1; s=0; "
       f"while [ $i -le {LINES} ]; do s=$((s + i * i)); echo line $i $s; sleep 1; i=$((i + 1)); done; "
       "echo token $t; echo result $s")


def expected(token: str) -> bytes:
    lines, total = [f"token {token}"], 0
    for i in range(1, LINES + 1):
        total += i * i
        lines.append(f"line {i} {total}")
    return ("\n".join(lines + [f"token {token}", f"result {total}"]) + "\n").encode()


def checkpointing_pool(tmp_path, interval_s: float) -> Pool:
    pool = Pool(tmp_path / "pool")
    settings = read_toml(pool.state / "coordinator.toml")
    write_toml(pool.state / "coordinator.toml", {**settings, "checkpoint_interval_s": interval_s})
    pool.start_coordinator()
    return pool


@pytest.fixture()
def pool(tmp_path):
    pool = checkpointing_pool(tmp_path, 3.0)
    for name in ("node-a", "node-b"):
        pool.add_agent(name)
    try:
        pool.wait_until("two ready nodes", lambda: len(pool.ready_nodes()) == 2, timeout=240)
        yield pool
    finally:
        pool.close()


def test_a_job_whose_agent_is_killed_goes_on_from_its_checkpoint(pool):
    job = pool.submit("sh", "-c", JOB)
    follower = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "logs", "-f", str(job)], env=pool.env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    kept = re.compile(rf"job {job}: checkpoint (\d+) from (\S+) kept")

    def checkpointed_and_halfway() -> str | None:
        """The node of a kept checkpoint, once the job is halfway and wrote lines after the checkpoint (which
        it writes again where it goes on: the follower must not show them twice)."""
        found = kept.findall(pool.log("coordinator"))
        chain = pool.state / "checkpoints" / str(job) / "chain.json"
        offset = json.loads(chain.read_text())["outputs"]["stdout"] if chain.exists() else None
        logs = pool.cli("logs", str(job)).stdout
        return found[-1][1] if found and offset is not None and logs.count(b"\nline ") >= 8 \
            and logs[offset:].count(b"\n") >= 1 else None

    victim = pool.wait_until("a checkpoint kept and half the job done", checkpointed_and_halfway, timeout=150)
    assert pool.jobs()[job]["node"] == victim and pool.jobs()[job]["state"] == "running"
    before = pool.cli("logs", str(job)).stdout
    pool.kill(pool.agents[victim])

    assert pool.cli("wait", str(job), "--timeout", "180", check=False, timeout=200).returncode == 0
    final = pool.jobs()[job]
    assert final["state"] == "done" and final["exit_status"] == 0 and final["node"] != victim
    output = pool.cli("logs", str(job)).stdout
    token = re.match(rb"token (\w+)\n", before)
    assert token is not None, before
    assert output == expected(token[1].decode()), output.decode(errors="replace")
    assert follower.communicate(timeout=30)[0] == output  # each line once
    log = pool.log("coordinator")
    assert f"job {job} placed on {final['node']}, to go on from its checkpoint" in log
    assert f"job {job}: checkpoint" in log and "refused" not in log


def kill_after_a_checkpoint(pool, job: int, lines: int) -> str:
    """SIGKILL the agent running *job* once a checkpoint of it is kept and it printed *lines* lines; its name."""
    kept = re.compile(rf"job {job}: checkpoint (\d+) from (\S+) kept")

    def checkpointed() -> str | None:
        found = kept.findall(pool.log("coordinator"))
        return found[-1][1] if found and pool.cli("logs", str(job)).stdout.count(b"line ") >= lines else None

    victim = pool.wait_until("a checkpoint kept", checkpointed, timeout=240)
    pool.kill(pool.agents[victim])
    return victim


@pytest.mark.skipif(shutil.which("mke2fs") is None or shutil.which("cpio") is None,
                    reason="needs e2fsprogs (mke2fs) and cpio")
def test_a_job_on_an_image_goes_on_with_its_disk(pool, tmp_path):
    image = root_image(tmp_path, {"only-here.txt": "image\n"})
    pool.cli("image", "add", "one", str(image), timeout=120)
    command = ("echo written-before > /disk.txt; sync; i=1; while [ $i -le 12 ]; do echo line $i; sleep 1; "
               "i=$((i + 1)); done; sync; echo 3 > /proc/sys/vm/drop_caches; cat /disk.txt")
    job = int(pool.cli("submit", "--image", "one", "--", "sh", "-c", command).stdout.strip())
    victim = kill_after_a_checkpoint(pool, job, 4)
    assert pool.cli("wait", str(job), "--timeout", "240", check=False, timeout=300).returncode == 0, \
        pool.log("coordinator")[-3000:]
    assert pool.jobs()[job]["node"] != victim
    expected = "".join(f"line {i}\n" for i in range(1, 13)) + "written-before\n"
    logs = pool.cli("logs", str(job))
    assert logs.stdout.decode() == expected and logs.stderr == b""  # the page cache dropped: read from the disk
    assert f"job {job} placed on" in pool.log("coordinator") and "to go on from its checkpoint" in pool.log("coordinator")


def test_a_job_resumed_from_a_vacate_is_checkpointed_and_goes_on_from_it(tmp_path):
    pool = checkpointing_pool(tmp_path, 2.0)
    try:
        owner = start_owner_aware_agent(pool, "laptop", vacate_after_s=1.0)
        owner.left()
        pool.wait_until("a guest offered to the pool", lambda: "laptop" in pool.ready_nodes(), 120)
        job = pool.submit("sh", "-c", JOB)
        pool.wait_until("the job under way", lambda: pool.cli("logs", str(job)).stdout.count(b"line ") >= 2, 60)
        pool.wait_until("the job vacated", lambda: (owner.types(), pool.jobs()[job]["state"])[1] == "vacated", 30,
                        interval=0.2)
        owner.left()
        again = re.compile(rf"job {job} resumed on laptop.*job {job}: checkpoint \d+ from laptop kept", re.S)
        pool.wait_until("a checkpoint after the resume", lambda: again.search(pool.log("coordinator")), 60)
        before = pool.cli("logs", str(job)).stdout
        pool.kill(pool.agents["laptop"])
        pool.add_agent("spare")  # the job waits for it, its checkpoint kept
        assert pool.cli("wait", str(job), "--timeout", "180", check=False, timeout=200).returncode == 0
        assert pool.jobs()[job]["node"] == "spare"
        token = re.match(rb"token (\w+)\n", before)
        assert token is not None, before
        assert pool.cli("logs", str(job)).stdout == expected(token[1].decode())
    finally:
        pool.close()


def test_a_job_moved_to_another_agent_is_checkpointed_there_and_goes_on_from_it(tmp_path):
    pool = checkpointing_pool(tmp_path, 2.0)
    try:
        for name in ("node-a", "node-b"):
            pool.add_agent(name)
        pool.wait_until("two ready nodes", lambda: len(pool.ready_nodes()) == 2, timeout=240)
        job = pool.submit("sh", "-c", JOB)
        kept = re.compile(rf"job {job}: checkpoint \d+ from (\S+) kept")
        source = pool.wait_until("a checkpoint at the source", lambda: (found := kept.findall(pool.log("coordinator")))
                                 and found[-1], 60, interval=0.2)
        target = "node-b" if source == "node-a" else "node-a"
        pool.cli("migrate", str(job), "--to", target)
        after = re.compile(rf"job {job} now runs on {target}.*job {job}: checkpoint (\d+) from {target} kept", re.S)
        piece = pool.wait_until("a checkpoint after the move", lambda: after.search(pool.log("coordinator")), 60)[1]
        pool.kill(pool.agents[source])  # it plays no part any more
        before = pool.cli("logs", str(job)).stdout
        pool.kill(pool.agents[target])
        pool.add_agent("spare")  # the job waits for it, its checkpoint from the destination kept
        assert pool.cli("wait", str(job), "--timeout", "180", check=False, timeout=200).returncode == 0
        final = pool.jobs()[job]
        assert final["state"] == "done" and final["node"] == "spare"
        token = re.match(rb"token (\w+)\n", before)
        assert token is not None, before
        assert pool.cli("logs", str(job)).stdout == expected(token[1].decode())  # each line once, not started afresh
        going_on = re.search(rf"job {job} placed on spare, to go on from its checkpoint \(piece (\d+)\)",
                             pool.log("coordinator"))
        assert going_on is not None and int(going_on[1]) >= int(piece)
    finally:
        pool.close()
