"""The coordinator's Prometheus metrics, computed when scraped (conode/metrics.py says why and how).

Gauges come from the node registry and one grouped query of the job table on a connection of the collector's
own; counters and the latency histograms (placements, gangs' sets) from :class:`coordinator.server.Counters`.
Job owners are the ``user`` label: the key that submitted the job, "admin" for a job without one.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from conode.metrics import histogram, labelled
from coordinator.placement import ACCEPTING_STATES
from coordinator.store import Store

if TYPE_CHECKING:
    from coordinator.server import Coordinator

NODE_STATES = ("Owner", "Unclaimed", "Claimed", "Suspended", "Vacating")  # the agents' owner states
DOWN = "down"  # a node that left and has not been forgotten
DEFAULT_USER = "admin"
PLACEMENT_LATENCY_BOUNDS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0,
                            3600.0)
GANG_SET_BOUNDS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# why a gang's cut is discarded (coordinator/gang_checkpointing.py): too slow, a piece refused by the coordinator,
# a rank lost (the gang stopped), a piece its worker or agent could not take or send
CUT_DISCARD_REASONS = ("late", "refused", "rank_lost", "piece_failed")


class CoordinatorCollector:
    def __init__(self, coordinator: Coordinator) -> None:
        self._coordinator = coordinator
        self._store: Store | None = None  # opened on first use, in a scraping thread
        self._lock = threading.Lock()  # the endpoint answers each scrape in a thread of its own

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        coordinator = self._coordinator
        nodes = list(coordinator.nodes.values())  # one atomic copy: the loop may add or remove nodes meanwhile
        drained = coordinator.drained
        states = Counter(node.state for node in nodes)
        states[DOWN] = len(coordinator.down)
        yield labelled(GaugeMetricFamily("conode_coordinator_nodes", "Nodes by owner state (down: left the pool)",
                                         labels=["state"]),
                       (([state], states.get(state, 0)) for state in (*NODE_STATES, DOWN)))
        yield GaugeMetricFamily("conode_coordinator_nodes_drained", "Connected nodes drained by an admin",
                                value=sum(node.name in drained for node in nodes))
        open_nodes = [node for node in nodes if node.state in ACCEPTING_STATES and node.name not in drained]
        free = [(max(0, node.cores - len(node.running)), node.mem_mib) for node in open_nodes]
        yield GaugeMetricFamily("conode_coordinator_cores", "Guest cores the connected nodes offer",
                                value=sum(node.cores for node in nodes))
        yield GaugeMetricFamily("conode_coordinator_free_cores", "Guest cores free now on nodes whose owner is away",
                                value=sum(cores for cores, _ in free))
        yield GaugeMetricFamily("conode_coordinator_free_memory_bytes",
                                "Guest memory of the free cores (each free core is one guest of its node's size)",
                                value=sum(cores * mem_mib for cores, mem_mib in free) << 20)
        jobs = GaugeMetricFamily("conode_coordinator_jobs", "Jobs by state and owner", labels=["state", "user"])
        yield labelled(jobs, (([state, user or DEFAULT_USER], count)
                              for state, user, count in self._job_counts()))
        counters = coordinator.counters
        for name, doc, value in (
                ("conode_coordinator_placements", "Jobs placed on nodes", counters.placed),
                ("conode_coordinator_requeues", "Jobs put back in the queue (their node lost or failing)",
                 counters.requeued),
                ("conode_coordinator_migrations", "Running jobs moved to another node", counters.migrations),
                ("conode_coordinator_nodes_lost", "Nodes that left without saying goodbye or said it",
                 counters.nodes_lost)):
            yield CounterMetricFamily(name, doc, value=value)
        yield histogram("conode_coordinator_placement_latency_seconds",
                        "From a job's (re)queueing to its placement", counters.placement_buckets)
        yield CounterMetricFamily("conode_coordinator_gang_cuts", "Coordinated checkpoints (cuts) of gangs begun",
                                  value=counters.gang_cuts)
        yield CounterMetricFamily("conode_coordinator_gang_sets", "Cuts of gangs kept as complete sets",
                                  value=counters.gang_sets)
        discarded = CounterMetricFamily("conode_coordinator_gang_cuts_discarded", "Cuts of gangs discarded, by why",
                                        labels=["reason"])
        yield labelled(discarded, (([reason], counters.gang_cuts_discarded[reason])
                                   for reason in CUT_DISCARD_REASONS))
        yield histogram("conode_coordinator_gang_set_seconds", "From a gang's cut's beginning to its set kept",
                        counters.gang_set_buckets)

    def _job_counts(self) -> list[tuple[str, str | None, int]]:
        with self._lock:
            if self._store is None:
                self._store = Store(self._coordinator.state.database)
            return self._store.job_counts_by_user()
