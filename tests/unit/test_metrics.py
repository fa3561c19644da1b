"""The metrics: the address setting, the histogram, each daemon's collector on its real state, the dashboard."""

import json
import re
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conode.agent.metrics import AgentCollector
from conode.errors import ConodeError
from conode.metrics import Address, Buckets, MetricsServer, parse_address
from coordinator.metrics import CoordinatorCollector
from tests.unit.test_agent_daemon import Agent
from tests.unit.test_coordinator_decisions import Pool

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"


def scrape(collector) -> dict[str, list]:
    """Every sample the collector gives, by sample name (histograms as _bucket, _sum, _count; a family without
    samples, such as jobs by user before any job, by its own name)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        samples.setdefault(family.name, [])
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples, name, **labels) -> float:
    matching = [s.value for s in samples[name] if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matching) == 1, (name, labels, samples.get(name))
    return matching[0]


@pytest.mark.parametrize("text, address", [
    ("9464", Address("127.0.0.1", 9464)),
    ("0.0.0.0:9100", Address("0.0.0.0", 9100)),
    ("metrics.example:80", Address("metrics.example", 80)),
    ("[::1]:9464", Address("::1", 9464)),
    ("off", None),
])
def test_a_metrics_address_is_localhost_unless_a_host_is_given(text, address):
    assert parse_address(text) == address


@pytest.mark.parametrize("text", ["", "0", "70000", "host:", "tcp://127.0.0.1:9464", "::1:9464", "on"])
def test_a_bad_metrics_address_is_a_clear_error(text):
    with pytest.raises(ConodeError, match="metrics address .* is not PORT, HOST:PORT"):
        parse_address(text)


def test_buckets_are_cumulative_with_a_sum_and_a_count():
    buckets = Buckets((0.01, 0.1, 1.0))
    for seconds in (0.005, 0.01, 0.05, 0.5, 7.0):
        buckets.observe(seconds)
    assert buckets.cumulative() == [("0.01", 2), ("0.1", 3), ("1.0", 4), ("+Inf", 5)]
    assert buckets.count == 5 and buckets.sum == pytest.approx(7.565)


def test_the_coordinator_metrics_follow_nodes_jobs_and_placements(tmp_path):
    pool = Pool(tmp_path)
    try:
        collector = CoordinatorCollector(pool.coordinator)
        before = scrape(collector)
        assert value(before, "conode_coordinator_nodes", state="Unclaimed") == 0
        assert value(before, "conode_coordinator_placements_total") == 0
        assert value(before, "conode_coordinator_migrations_total") == 0
        pool.hello("n1", cores=2, mem_mib=256)
        pool.hello("n2", cores=1, mem_mib=128, state="Owner")
        first = pool.submit()
        pool.clock.advance(0.003)
        pool.submit()
        pool.submit()  # no room: stays queued
        after = scrape(collector)
        assert value(after, "conode_coordinator_nodes", state="Unclaimed") == 1
        assert value(after, "conode_coordinator_nodes", state="Owner") == 1
        assert value(after, "conode_coordinator_cores") == 3
        assert value(after, "conode_coordinator_free_cores") == 0
        assert value(after, "conode_coordinator_free_memory_bytes") == 0
        assert value(after, "conode_coordinator_jobs", state="running", user="admin") == 2
        assert value(after, "conode_coordinator_jobs", state="queued", user="admin") == 1
        assert value(after, "conode_coordinator_placements_total") == 2
        assert value(after, "conode_coordinator_placement_latency_seconds_count") == 2
        assert value(after, "conode_coordinator_placement_latency_seconds_bucket", le="0.001") == 2
        pool.send("n1", "job_finished", job=first, status=0, outputs={}, missing=[], runtime_s=1.0)
        pool.coordinator.counters.placement_buckets.observe(0.5)
        pool.clock.advance(100.0)
        pool.housekeeping()  # n2 is silent: lost, and down
        lost = scrape(collector)
        assert value(lost, "conode_coordinator_jobs", state="done", user="admin") == 1
        assert value(lost, "conode_coordinator_nodes", state="down") >= 1
        assert value(lost, "conode_coordinator_nodes_lost_total") >= 1
        assert value(lost, "conode_coordinator_placement_latency_seconds_bucket", le="0.001") >= 2
    finally:
        pool.close()


def test_the_agent_metrics_follow_the_owner_and_the_yields(tmp_path):
    agent = Agent(tmp_path)
    collector = AgentCollector(agent.daemon)
    w0, _ = agent.join()
    agent.run_job(1)
    agent.step(advance=1.0)
    running = scrape(collector)
    assert value(running, "conode_agent_owner_state", state="Claimed") == 1
    assert value(running, "conode_agent_owner_state", state="Owner") == 0
    assert value(running, "conode_agent_jobs") == 1
    assert value(running, "conode_agent_paused") == 0
    agent.idle.owner_back()
    agent.step()
    w0.emit("paused", at=agent.wall() + 0.03)
    agent.step(advance=1.0)
    back = scrape(collector)
    assert value(back, "conode_agent_owner_state", state="Suspended") == 1
    assert value(back, "conode_agent_yield_latency_seconds_count") == 1
    assert value(back, "conode_agent_yield_latency_seconds_bucket", le="0.02") == 0
    assert value(back, "conode_agent_yield_latency_seconds_bucket", le="0.05") == 1
    assert value(back, "conode_agent_guests", state="paused") == 1


def _dashboard_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    names = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names |= set(re.findall(r"\b(conode_[a-z_]+)\b", target["expr"]))
    return names


def test_every_metric_on_the_dashboard_is_exported(tmp_path):
    (tmp_path / "coordinator").mkdir()
    pool = Pool(tmp_path / "coordinator")
    try:
        exported = set(scrape(CoordinatorCollector(pool.coordinator)))
    finally:
        pool.close()
    (tmp_path / "agent").mkdir()
    exported |= set(scrape(AgentCollector(Agent(tmp_path / "agent").daemon)))
    used = _dashboard_metrics()
    assert len(used) > 15
    assert used - exported == set()


def test_the_endpoint_serves_on_localhost_and_a_taken_port_is_a_clear_error(tmp_path):
    pool = Pool(tmp_path)
    server = MetricsServer(Address("127.0.0.1", 0), CoordinatorCollector(pool.coordinator))  # any free port
    try:
        port = server.port
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert "conode_coordinator_nodes{state=\"Unclaimed\"} 0.0" in text
        with pytest.raises(ConodeError, match="cannot serve metrics on 127.0.0.1:.*choose a free port"):
            MetricsServer(Address("127.0.0.1", port), CoordinatorCollector(pool.coordinator))
    finally:
        server.close()
        pool.close()
