"""Prometheus metrics for the coordinator and the agent: the address setting, a cheap histogram, the endpoint.

Metrics are off unless an address is given. Each daemon registers one collector that computes its gauges when
Prometheus scrapes, from the state the daemon keeps anyway, so nothing is spent per heartbeat or per tick. The
only thing counted as it happens is a latency, into :class:`Buckets`: a few integer additions, no lock, no
``prometheus_client`` on the hot path. The endpoint serves in a thread of its own (``prometheus_client``'s),
reading that state; what it reads is replaced, never mutated in place, or read as a copy.
"""

from __future__ import annotations

import bisect
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from conode.errors import ConodeError

log = logging.getLogger("conode.metrics")

LOCALHOST = "127.0.0.1"
OFF = "off"
ADDRESS_HELP = "PORT, HOST:PORT or [IPv6]:PORT (a bare port listens on 127.0.0.1), or off"


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> Address | None:
    """The metrics address a setting or flag names, or None for "off"; localhost unless a host is given."""
    text = text.strip()
    if text == OFF:
        return None
    match = re.fullmatch(r"(?:\[([0-9A-Fa-f:.]+)\]:|([^:\[\]\s]+):)?(\d{1,5})", text)
    if match is None or not 0 < int(match[3]) < 65536:
        raise ConodeError(f"metrics address {text!r} is not {ADDRESS_HELP}"[:300])
    return Address(match[1] or match[2] or LOCALHOST, int(match[3]))


class Buckets:
    """A cumulative latency histogram in seconds: counts per upper bound, a sum and a count."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(sorted(bounds))
        self._counts = [0] * (len(self.bounds) + 1)  # the last: above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self._counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, observations at or below it) per bound and "+Inf", as Prometheus histograms give them."""
        counts = list(self._counts)  # a copy: the owning thread may observe meanwhile
        rows, total = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), counts):
            total += count
            rows.append((bound, total))
        return rows


def histogram(name: str, doc: str, buckets: Buckets) -> Any:
    from prometheus_client.core import HistogramMetricFamily

    return HistogramMetricFamily(name, doc, buckets=buckets.cumulative(), sum_value=buckets.sum)


class MetricsServer:
    """The /metrics endpoint of one collector, on its own registry, in prometheus_client's server thread."""

    def __init__(self, address: Address, collector: Any) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        self.address = address
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        try:
            self._server, self._thread = start_http_server(address.port, address.host, registry)
        except OSError as exc:
            raise ConodeError(f"cannot serve metrics on {address}: {exc.strerror or exc}; choose a free port "
                              f"(metrics setting or --metrics)") from None
        log.info("metrics on http://%s/metrics", Address(address.host, self.port))

    @property
    def port(self) -> int:
        """The port it listens on (the one asked for, or the one the system chose for port 0)."""
        return int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(address: Address | None, collector: Any) -> MetricsServer | None:
    return None if address is None else MetricsServer(address, collector)


def labelled(family: Any, rows: Iterable[tuple[Sequence[str], float]]) -> Any:
    """*family* with one sample per (label values, value) row."""
    for labels, value in rows:
        family.add_metric(list(labels), value)
    return family
