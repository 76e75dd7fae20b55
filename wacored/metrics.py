"""Prometheus metrics of one daemon: its own registry, and the histograms observed on the hot paths.

Counters and gauges that mirror state the daemon already keeps (`Runtime.counters`, breakers,
`Runtime.stats`, actors) are read at scrape time from those cached values, never from the database.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

ACK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.2, 1.5, 2.0, 3.0, 5.0, 10.0)
"""Around the 1.2 s ack SLO (``[slo] p95_ms``), with room below it to see normal latency."""
FORWARD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
"""Up to twice the default forward timeout (4 s)."""


class Metrics:
    """The registry of one daemon (never the global one: tests run many daemons in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.ack_latency = Histogram(
            "wacored_ack_latency_seconds", "Time from a webhook POST's arrival to its answer.",
            buckets=ACK_BUCKETS, registry=self.registry,
        )
        self.forward_latency = Histogram(
            "wacored_forward_latency_seconds", "Duration of one forward attempt, by target service.",
            ["service"], buckets=FORWARD_BUCKETS, registry=self.registry,
        )
