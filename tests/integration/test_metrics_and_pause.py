"""Metrics and the owner in control, through the real CLIs: a coordinator and an agent serving Prometheus
metrics while a job runs, `conode pause` stopping its guest at once, `conode status` saying so, `conode resume`."""

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from pool import Pool, free_port
from prometheus_client.parser import text_string_to_metric_families
from test_owner_cycle import agent_status, start_owner_aware_agent

TICKS = "i=0; while [ $i -lt 24 ]; do echo tick-$i; i=$((i+1)); sleep 0.25; done; echo finished"


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of a real /metrics endpoint: (name, sorted labels) -> value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape_until(pool, port: int, what: str, predicate, timeout: float = 10):
    """The first scrape of *port* that *predicate* accepts (the agent's figures follow its status, once a second)."""
    def accepted():
        samples = scrape(port)
        return samples if predicate(samples) else None

    return pool.wait_until(what, accepted, timeout, interval=0.3)


def conode(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conode.cli", *args], capture_output=True, text=True, timeout=60,
                          env=env)


@pytest.mark.guest
def test_metrics_change_as_a_job_runs_is_paused_by_the_owner_and_ends(tmp_path):
    pool = Pool(tmp_path)
    coordinator_port, agent_port = free_port(), free_port()
    pool.start_coordinator("--metrics", str(coordinator_port))
    try:
        owner = start_owner_aware_agent(pool, "desk")
        pool.kill(pool.agents["desk"])  # restarted with its metrics and the directory it shares with the owner
        shared = pool.root / "reports"  # what /run/conode-idle is to an agent run as a service
        shared.mkdir()
        with open(pool.root / "desk.toml", "a") as config:
            config.write(f'idle_reports = "{shared}"\n')
        pool.start_agent("desk", "--idle-source", f"file:{owner.path}", "--config", str(pool.root / "desk.toml"),
                         "--metrics", f"127.0.0.1:{agent_port}")
        owner.left()
        pool.wait_until("a guest offered to the pool", lambda: "desk" in pool.ready_nodes(), 120)
        before = scrape(coordinator_port)
        assert metric(before, "conode_coordinator_nodes", state="Unclaimed") == 1
        assert metric(before, "conode_coordinator_free_cores") == 1
        assert metric(before, "conode_coordinator_placements_total") == 0

        job = pool.submit("sh", "-c", TICKS)
        pool.wait_until("the job to produce output", lambda: b"tick-2" in pool.cli("logs", str(job)).stdout, 60)
        running = scrape(coordinator_port)
        assert metric(running, "conode_coordinator_placements_total") == 1
        assert metric(running, "conode_coordinator_placement_latency_seconds_count") == 1
        assert metric(running, "conode_coordinator_jobs", state="running", user="admin") == 1
        assert metric(running, "conode_coordinator_free_cores") == 0
        agent = scrape_until(pool, agent_port, "the agent's metrics to show the job and its CPU",
                             lambda s: metric(s, "conode_agent_jobs") == 1
                             and metric(s, "conode_agent_guest_cpu_percent") > 0)  # a sample over a second
        assert metric(agent, "conode_agent_owner_state", state="Claimed") == 1
        assert metric(agent, "conode_agent_guest_memory_bytes") > 32 << 20
        assert metric(agent, "conode_agent_paused") == 0

        # The owner snoozes the pool: the guest stops at once, though the owner is still away.
        paused = conode("pause", "--for", "2h", "--dir", str(shared))
        assert paused.returncode == 0 and paused.stdout.startswith("pool paused here for 2 h, until "), paused
        status = pool.wait_until("the guest to stop", lambda: (s := agent_status(pool, "desk"))["guests"][0][
            "state"] == "paused" and s, 10, interval=0.1)
        assert status["owner_state"] == "Suspended" and status["paused_until"] > time.time() + 7000
        assert status["yield_ms"] and status["yield_ms"][-1] < 1000
        words = conode("status", "--dir", str(shared)).stdout  # the owner reads the agent's shared status
        assert "the pool:     paused until " in words and "`conode resume` ends it" in words
        assert f"guest 0:      paused with job {job} (admin's): " in words and "% of a core" in words
        assert "paused:       yes, by " in words and "saved guests: 0 MiB on disk, at most " in words
        pool.wait_until("the job to show suspended", lambda: pool.jobs()[job]["state"] == "suspended", 10)
        agent = scrape_until(pool, agent_port, "the agent's metrics to show the pause",
                             lambda s: metric(s, "conode_agent_paused") == 1)
        assert metric(agent, "conode_agent_owner_state", state="Suspended") == 1
        assert metric(agent, "conode_agent_yield_latency_seconds_count") == 1
        held = pool.cli("logs", str(job)).stdout
        time.sleep(1.5)
        assert pool.cli("logs", str(job)).stdout == held  # no progress while paused

        resumed = conode("resume", "--dir", str(shared))
        assert resumed.returncode == 0 and "pool resumed here" in resumed.stdout
        assert pool.cli("wait", str(job), "--timeout", "120", check=False, timeout=150).returncode == 0
        assert pool.cli("logs", str(job)).stdout.endswith(b"tick-23\nfinished\n")
        done = scrape_until(pool, coordinator_port, "the done job in the metrics",
                            lambda s: metric(s, "conode_coordinator_jobs", state="done", user="admin") == 1)
        assert metric(done, "conode_coordinator_jobs", state="running", user="admin") == 0
        assert metric(done, "conode_coordinator_requeues_total") == 0
        assert metric(done, "conode_coordinator_migrations_total") == 0
        # status.json is rewritten every STATUS_EVERY_S: the job's end reaches it at the next write.
        idle_words = "the pool:     may use this machine now (its guests wait for jobs); it stops as soon"
        words = pool.wait_until("the agent's status to show the job's end", lambda: (
            w := conode("status", "--state-dir", str(pool.root / "desk")).stdout) and idle_words in w and w, 10)
        assert "paused:       no" in words

        pool.agents["desk"].terminate()  # it says goodbye: the node is down, counted as lost
        pool.agents["desk"].wait(30)
        down = scrape_until(pool, coordinator_port, "the node down in the metrics",
                            lambda s: metric(s, "conode_coordinator_nodes", state="down") == 1, 20)
        assert metric(down, "conode_coordinator_nodes_lost_total") == 1
        assert metric(down, "conode_coordinator_nodes", state="Unclaimed") == 0
    finally:
        pool.close()


def test_pause_and_resume_need_a_directory_and_a_duration_they_understand(tmp_path):
    missing = conode("pause", "--state-dir", str(tmp_path / "nowhere"))
    assert missing.returncode == 125 and "does not exist; give the agent's state directory" in missing.stderr
    bad = conode("pause", "--for", "2x", "--state-dir", str(tmp_path))
    assert bad.returncode == 125 and "--for '2x': give a duration such as 90s, 45m, 2h" in bad.stderr
    too_long = conode("pause", "--for", "30d", "--state-dir", str(tmp_path))
    assert too_long.returncode == 125 and "a pause lasts between a second and 7 days" in too_long.stderr
    assert not list(tmp_path.iterdir())
    assert conode("pause", "--for", "90s", "--state-dir", str(tmp_path)).stdout.startswith(
        "pool paused here for 90 s, until ")
    (pause,) = tmp_path.iterdir()
    record = json.loads(pause.read_text())
    assert record["until"] - record["at"] == 90 and pause.stat().st_mode & 0o777 == 0o644
    assert "pool resumed here" in conode("resume", "--state-dir", str(tmp_path)).stdout
    assert "the pool was not paused here" in conode("resume", "--state-dir", str(tmp_path)).stdout


def test_a_metrics_address_taken_or_wrong_is_a_clear_error_at_start(tmp_path):
    pool = Pool(tmp_path)
    try:
        served = subprocess.run([sys.executable, "-m", "coordinator.cli", "serve", "--state-dir", str(pool.state),
                                 "--metrics", "localhost:http"], env=pool.env, capture_output=True, text=True,
                                timeout=60)
        assert served.returncode == 2 and "metrics address 'localhost:http' is not PORT, HOST:PORT" in served.stderr
        (pool.state / "coordinator.toml").write_text(f'bind = "{pool.endpoint}"\nmetrics = "nonsense"\n')
        served = subprocess.run([sys.executable, "-m", "coordinator.cli", "serve", "--state-dir", str(pool.state)],
                                env=pool.env, capture_output=True, text=True, timeout=60)
        assert served.returncode == 2 and "metrics address 'nonsense'" in served.stderr
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            assert conode("agent", "init", "--state-dir", str(tmp_path / "desk")).returncode == 0
            agent = conode("agent", "--state-dir", str(tmp_path / "desk"), "--coordinator", pool.endpoint,
                           "--coordinator-key", pool.server_key, "--metrics", str(port))
        assert agent.returncode == 125
        assert f"cannot serve metrics on 127.0.0.1:{port}: Address already in use; choose a free port" in agent.stderr
    finally:
        pool.close()
