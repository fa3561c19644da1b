"""The agent's Prometheus metrics, computed when scraped (conode/metrics.py says why and how): the owner state
as the loop sees it now, and the rest from the status the loop writes every second."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from conode.idle.policy import OwnerState
from conode.metrics import histogram, labelled

if TYPE_CHECKING:
    from conode.agent.daemon import AgentDaemon

GUEST_STATES = ("starting", "running", "paused", "stopped")  # guests.WorkerSlot.state


class AgentCollector:
    def __init__(self, daemon: AgentDaemon) -> None:
        self._daemon = daemon

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        daemon = self._daemon
        status = daemon.last_status  # one reference: the loop replaces it whole
        state = daemon.owner.policy.state
        yield labelled(GaugeMetricFamily("conode_agent_owner_state", "1 for the owner state the agent is in",
                                         labels=["state"]),
                       (([s.value], float(s is state)) for s in OwnerState))
        yield GaugeMetricFamily("conode_agent_paused", "1 while the owner has paused the pool here (conode pause)",
                                value=float(daemon.owner.last.pause is not None))
        yield GaugeMetricFamily("conode_agent_connected", "1 while the coordinator has welcomed this agent",
                                value=float(bool(status.get("connected"))))
        yield GaugeMetricFamily("conode_agent_guest_cpu_percent", "CPU the guests use, in percent of one core",
                                value=status.get("guest_cpu_percent", 0.0))
        guests = status.get("guests", [])
        yield GaugeMetricFamily("conode_agent_guest_memory_bytes", "Resident memory of the guests' processes",
                                value=sum(guest.get("memory_bytes") or 0 for guest in guests))
        states = Counter(guest["state"] for guest in guests)
        yield labelled(GaugeMetricFamily("conode_agent_guests", "Guests by state", labels=["state"]),
                       (([s], states.get(s, 0)) for s in sorted({*GUEST_STATES, *states})))
        yield GaugeMetricFamily("conode_agent_jobs", "Jobs running in the guests", value=len(status.get("jobs", [])))
        yield GaugeMetricFamily("conode_agent_saved_jobs", "Jobs saved to disk with their guest (vacated)",
                                value=len(status.get("vacated_jobs", [])))
        yield GaugeMetricFamily("conode_agent_saved_guest_bytes", "Disk the saved guests take",
                                value=status.get("saved_bytes") or 0)
        yield histogram("conode_agent_yield_latency_seconds", "From the owner's input (or pause) to the guests "
                        "stopped", daemon.guests.yield_buckets)
