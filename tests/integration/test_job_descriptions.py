"""Job descriptions and live work through the real `coordinator` CLI, on a real pool of two one-core agents:
an array from a job.toml with substitution, environment, stdin and time limits, inputs' modes and paths, output
globs, `logs -f`, `run`, hold and release, why a job waits, and the refusal of what no node can meet.

The tests share one pool and run in order (the last ones enrol a node that never comes)."""

import json
import signal
import subprocess
import sys
import time

import pytest
from pool import Pool

pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    with Pool.running(tmp_path_factory.mktemp("jobs"), ("node-a", "node-b")) as pool:
        yield pool


def submitted(result: subprocess.CompletedProcess) -> list[int]:
    return [int(line) for line in result.stdout.split()]


def wait(pool: Pool, job: int) -> subprocess.CompletedProcess:
    return pool.cli("wait", str(job), "--timeout", "240", check=False, timeout=300)


def test_a_ten_task_array_from_a_description_with_modes_paths_and_globs(pool, tmp_path):
    (tmp_path / "bin").mkdir()
    prog = tmp_path / "bin" / "prog.sh"
    prog.write_text('#!/bin/sh\nmkdir -p out\necho "$1,$ALPHA,$(cat a/x.txt),$(cat b/x.txt)" > out/r-$2.csv\n'
                    'cat data/deep/n.txt\n')
    prog.chmod(0o755)
    for sub, text in (("a", "from-a"), ("b", "from-b")):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "x.txt").write_text(text)
    (tmp_path / "data" / "deep").mkdir(parents=True)
    (tmp_path / "data" / "deep" / "n.txt").write_text("deep-data\n")
    (tmp_path / "job.toml").write_text(
        'command = "./bin/prog.sh item-$(item) $(index)"\n'
        'inputs = ["bin/prog.sh", "a/x.txt", "b/x.txt", "data"]\n'
        'outputs = ["out/*.csv"]\n'
        'queue = ["p0", "p1", "p2", "p3", "p4", "p5", "p6", "p7", "p8", "p9"]\n'
        'time_limit = 300\n'
        '[environment]\nALPHA = "alpha-$(index)"\n')
    jobs = submitted(pool.cli("submit", "-f", str(tmp_path / "job.toml")))
    assert len(jobs) == 10 and jobs == list(range(jobs[0], jobs[0] + 10))
    listed = pool.jobs()
    assert [listed[j]["task"] for j in jobs] == list(range(10)) and {listed[j]["array"] for j in jobs} == {jobs[0]}
    for index, job in enumerate(jobs):
        assert wait(pool, job).returncode == 0, pool.cli("job", str(job)).stdout.decode()
        assert pool.cli("logs", str(job)).stdout == b"deep-data\n"
        out = tmp_path / f"fetched{index}"
        pool.cli("fetch", str(job), str(out))
        assert (out / "out" / f"r-{index}.csv").read_text() == f"item-p{index},alpha-{index},from-a,from-b\n"
    table = pool.cli("jobs").stdout.decode()
    assert f"{jobs[0]}[9]" in table and "./bin/prog.sh item-p9 9" in table


def test_env_stdin_and_quoting_reach_the_command(pool, tmp_path):
    (tmp_path / "in.txt").write_text("line one\nline two\n")
    job = submitted(pool.cli("submit", "--env", "GREETING=hello world", "--env", "EMPTY=", "--stdin",
                             str(tmp_path / "in.txt"), "--", "sh", "-c",
                             'echo "[$GREETING][$EMPTY]"; wc -l; ls -a'))[0]
    assert wait(pool, job).returncode == 0
    out = pool.cli("logs", str(job)).stdout.decode()
    assert out.startswith("[hello world][]\n2\n") and ".conode-stdin" not in out
    assert "'echo \"[$GREETING][$EMPTY]\"; wc -l; ls -a'" in pool.cli("jobs").stdout.decode()


def test_a_job_past_its_time_limit_is_killed_and_fails(pool):
    job = submitted(pool.cli("submit", "--timeout", "2", "--", "sh", "-c", "echo started; sleep 60"))[0]
    started = time.monotonic()
    result = wait(pool, job)
    assert result.returncode == 1 and time.monotonic() - started < 40
    assert "time limit 2 s reached" in result.stderr.decode()
    assert pool.jobs()[job]["reason"] == "time limit 2 s reached"


def test_unknown_options_are_refused_never_run(pool):
    result = pool.cli("submit", "--guets", "2", "--", "echo", "hi", check=False)
    assert result.returncode == 2 and b"No such option '--guets'" in result.stderr
    nothing = pool.cli("submit", "-f", "/nonexistent.toml", "--", "true", check=False)
    assert nothing.returncode == 2
    assert not any("--guets" in j["argv"] for j in pool.jobs().values())


def test_logs_follow_streams_until_the_job_ends(pool):
    job = submitted(pool.cli("submit", "--", "sh", "-c",
                             "echo first; sleep 3; echo second; echo err >&2; sleep 1; echo last"))[0]
    follower = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "logs", "-f", str(job)], env=pool.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert follower.stdout.readline() == b"first\n"
        assert pool.jobs()[job]["state"] == "running"  # it came while the job ran
        out, err = follower.communicate(timeout=120)
    finally:
        if follower.poll() is None:
            follower.kill()
    assert out == b"second\nlast\n" and err == b"err\n" and follower.returncode == 0
    gang = submitted(pool.cli("submit", "--guests", "2", "--", "sh", "-c", 'sleep 1; echo "rank $CONODE_RANK"'))[0]
    followed = pool.cli("logs", "-f", str(gang), timeout=120)
    assert sorted(followed.stdout.decode().split("\n")) == ["", "==> rank 0 <==", "==> rank 1 <==", "rank 0",
                                                            "rank 1"]


def test_run_streams_and_exits_with_the_jobs_status(pool):
    result = pool.cli("run", "--env", "CODE=3", "--", "sh", "-c", 'echo out; echo err >&2; exit "$CODE"',
                      check=False, timeout=240)
    assert (result.returncode, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
    failed = pool.cli("run", "--timeout", "2", "--", "sleep", "60", check=False, timeout=240)
    assert failed.returncode == 1 and b"time limit 2 s reached" in failed.stderr
    running = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "run", "--", "sh", "-c", "echo up; sleep 60"],
                               env=pool.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert running.stdout.readline() == b"up\n"
        running.send_signal(signal.SIGINT)  # Ctrl-C
        _, err = running.communicate(timeout=60)
    finally:
        if running.poll() is None:
            running.kill()
    assert running.returncode == 130 and b"cancelled" in err
    last = max(pool.jobs().values(), key=lambda j: j["id"])
    assert last["argv"] == ["sh", "-c", "echo up; sleep 60"] and last["state"] == "cancelled"


def test_hold_release_and_history(pool):
    blockers = [submitted(pool.cli("submit", "--", "sleep", "6"))[0] for _ in range(2)]
    held = submitted(pool.cli("submit", "--", "echo", "was held"))[0]
    assert "held" in pool.cli("hold", str(held)).stdout.decode()
    tasks = submitted(pool.cli("submit", "--queue", "3", "--", "echo", "task $(index)"))
    assert pool.cli("hold", "--array", str(tasks[1])).stdout == f"array {tasks[0]}: 3 jobs held\n".encode()
    pool.cli("cancel", str(tasks[2]))
    assert pool.cli("jobs", "--state", "held").stdout.decode().count("\n") == 4  # the header and three jobs
    for blocker in blockers:
        assert wait(pool, blocker).returncode == 0
    time.sleep(2)
    state = pool.jobs()[held]
    assert state["state"] == "held" and state["why"] == "held"  # free nodes, and still not placed
    assert "held" in pool.cli("job", str(held)).stdout.decode()
    pool.cli("release", str(held))
    assert pool.cli("release", "--array", str(tasks[0])).stdout == \
        f"array {tasks[0]}: 2 jobs released (1 was not held)\n".encode()
    assert [wait(pool, job).returncode for job in (held, *tasks[:2])] == [0, 0, 0]
    assert [pool.cli("logs", str(task)).stdout for task in tasks[:2]] == [b"task 0\n", b"task 1\n"]
    ended = pool.cli("cancel", "--array", str(tasks[0]))
    assert ended.stdout == f"array {tasks[0]}: 0 jobs cancelled (3 had already ended)\n".encode()
    alone = pool.cli("hold", "--array", str(held), check=False)
    assert alone.returncode == 2 and b"is not part of an array; hold it without --array" in alone.stderr
    history = json.loads(pool.cli("history", "--json").stdout)
    record = next(j for j in history if j["id"] == held)
    assert record["node"] in ("node-a", "node-b") and record["exit_status"] == 0 and record["cpu_s"] > 0
    assert record["finished_at"] and "sleep 6" in pool.cli("history").stdout.decode()
    again = pool.cli("release", str(held), check=False)
    assert again.returncode == 2 and b"only a held job can be released" in again.stderr


def test_requests_no_node_can_meet_are_refused_and_a_waiting_job_says_why(pool):
    refused = pool.cli("submit", "--mem", "512", "--", "true", check=False)
    assert refused.returncode == 2
    assert b"asks for 512 MiB of guest memory; the largest node offers 128 MiB" in refused.stderr
    gang = pool.cli("submit", "--guests", "3", "--", "true", check=False)
    assert gang.returncode == 2 and b"offer 2 such guest(s)" in gang.stderr
    # A node enrolled but never seen may be bigger: the job waits, and says why.
    pool.cli("keys", "add", "--state-dir", str(pool.state), "--role", "agent", "big-node",
             "Yne@$b-K&t8Rn0u1VxD]OJw)B=kJ7Qw)(fOx?Ah5")
    job = submitted(pool.cli("submit", "--mem", "256", "--", "true"))[0]
    assert pool.jobs()[job]["why"] == "largest node offers 128 MiB"
    assert "queued (largest node offers 128 MiB)" in pool.cli("jobs").stdout.decode()
    pool.cli("cancel", str(job))
