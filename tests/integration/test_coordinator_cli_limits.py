# SPDX-License-Identifier: GPL-2.0-or-later
"""The admin CLI against a real coordinator and a scripted agent (real CURVE sockets, real protocol): limits
refused with one line, output capped so that `logs` always works, `fetch` never writes through a link."""

from __future__ import annotations

import subprocess
import sys

import pytest
import zmq

from conode.cluster import protocol
from conode.cluster.keys import KeyPair
from conode.limits import MAX_FRAME_BYTES
from conode.output_cap import DOWNSTREAM_LIMIT, TRUNCATION_NOTE
from test_coordinator_robustness import Link, running_coordinator


@pytest.fixture
def coordinator(tmp_path):
    with running_coordinator(tmp_path) as c:
        yield c


def cli(coordinator, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coordinator.cli", *args], env=coordinator.env,
                          capture_output=True, timeout=120)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("coordinator: error: "), lines
    return lines[0]


@pytest.fixture
def agent(coordinator):
    """An enrolled node n1 that has said hello: a Link speaking for it."""
    public, secret = zmq.curve_keypair()
    coordinator.cli("keys", "add", "--state-dir", str(coordinator.state), "--role", "agent", "--", "n1",
                    public.decode())
    link = Link(coordinator, KeyPair(public.decode(), secret.decode()))
    welcome = link.ask(protocol.encode("hello", node="n1", cores=1, mem_mib=128, speed=1.0, state="Unclaimed",
                                       idle_s=10.0, running=[], software="scripted"))
    assert welcome["type"] == "welcome"
    yield link
    link.close()


def run_one_job(coordinator, agent, *submit_args: str) -> int:
    done = cli(coordinator, "submit", *submit_args, "--", "true")
    assert done.returncode == 0, done.stderr
    job = int(done.stdout)
    run = agent.reply()
    assert run["type"] == "run_job" and run["job"] == job
    return job


def test_submissions_over_the_limits_are_refused_in_one_line(coordinator):
    line = one_error_line(cli(coordinator, "submit", "--output", "../x", "--", "true"))
    assert "'outputs' holds '../x', which is not a relative path inside the job directory" in line
    outputs = [arg for i in range(65) for arg in ("--output", f"o{i}")]
    assert "at most 64 are allowed" in one_error_line(cli(coordinator, "submit", *outputs, "--", "true"))
    assert "'mem_mib' must be an integer from 48 to 768" in one_error_line(
        cli(coordinator, "submit", "--mem", "4096", "--", "true"))
    assert coordinator.status()["totals"]["jobs"]["queued"] == 0


def test_logs_of_a_job_with_more_output_than_a_frame(coordinator, agent):
    job = run_one_job(coordinator, agent)
    chunk = b"o" * (1 << 20)
    for _ in range(MAX_FRAME_BYTES // len(chunk) + 16):  # more than one message could carry back
        agent.send(protocol.encode("job_output", job=job, stream="stdout", data=chunk))
    agent.send(protocol.encode("job_output", job=job, stream="stderr", data=b"late words\n"))
    finish = protocol.encode("job_finished", job=job, status=0, outputs={}, missing=[], runtime_s=1.0)
    assert agent.ask(finish)["type"] == "ack"
    done = cli(coordinator, "logs", str(job))
    assert done.returncode == 0, done.stderr[-500:]
    assert done.stdout == b"o" * DOWNSTREAM_LIMIT + TRUNCATION_NOTE
    assert done.stderr == b""  # dropped: it came after the limit


def test_fetch_refuses_a_symlink_in_the_target_and_writes_the_rest_safely(coordinator, agent, tmp_path):
    job = run_one_job(coordinator, agent, "--output", "result.txt", "--output", "sub/deep.txt")
    outputs = {"result.txt": b"the answer\n", "sub/deep.txt": b"deep\n"}
    finish = protocol.encode("job_finished", job=job, status=0, outputs=outputs, missing=[], runtime_s=1.0)
    assert agent.ask(finish)["type"] == "ack"

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    trap = tmp_path / "trap"
    trap.mkdir()
    (trap / "result.txt").symlink_to(victim)
    line = one_error_line(cli(coordinator, "fetch", str(job), str(trap)))
    assert f"refusing to write {trap / 'result.txt'}: a symbolic link is there" in line
    assert victim.read_text() == "precious\n" and (trap / "result.txt").is_symlink()

    fresh = tmp_path / "fresh" / "results"
    done = cli(coordinator, "fetch", str(job), str(fresh))
    assert done.returncode == 0, done.stderr
    assert (fresh / "result.txt").read_bytes() == outputs["result.txt"]
    assert (fresh / "sub" / "deep.txt").read_bytes() == outputs["sub/deep.txt"]

    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory\n")
    line = one_error_line(cli(coordinator, "fetch", str(job), str(blocked / "results")))
    assert line == f"coordinator: error: cannot write {blocked / 'results'}: Not a directory"
