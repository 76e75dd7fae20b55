"""A worker's place among ``[server] processes`` workers, and asking its siblings for their figures.

Each worker serves its app twice: on the shared public port, and on a private unix socket of its own
(``worker-INDEX.sock`` in the runtime directory the supervisor made, mode 0700). A request carrying
`LOCAL_HEADER` gets that worker's figures alone; without it, ``/metrics`` and ``/health`` ask every
sibling for theirs over the private sockets and merge them (`core/exposition.py` for metrics, `api.py`
for health), so a scrape of whichever worker the kernel picked shows the whole daemon.

Why not prometheus-client's multiprocess mode: it only covers the library's own metric objects
written to mmap files, and most of wacored's figures come from `metrics.StateCollector` reading the
runtime at scrape time; nor would it carry ``/health``.

Error handling:
    A sibling that does not answer within `SIBLING_TIMEOUT_S`, refuses, or answers other than 200
    (being restarted, draining) is skipped: counted in `Siblings.unanswered`
    (``wacored_worker_scrape_failures_total``), never an error for the caller.

Cancellation:
    The requests run in a nursery of the caller's request; cancelling it cancels them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

import httpx
import trio
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from .core.exposition import Family, Labels, merge

log = logging.getLogger(__name__)

LOCAL_HEADER = "X-Wacored-Local"
"""Asks a worker for its own figures only (what siblings ask each other)."""
SIBLING_TIMEOUT_S = 1.0
"""A sibling answers a local scrape in a few ms; one that takes a second is wedged or restarting."""


@dataclass(frozen=True)
class Place:
    """Which worker this process is: `index` of `count`, restarted `restarts` times so far."""

    index: int = 0
    count: int = 1
    runtime_dir: str = ""
    """Where every worker's private socket is (the supervisor's directory); empty when alone."""
    restarts: int = 0

    @property
    def alone(self) -> bool:
        return self.count <= 1 or not self.runtime_dir

    def socket_path(self, index: int) -> str:
        return os.path.join(self.runtime_dir, f"worker-{index}.sock")

    @property
    def siblings(self) -> list[int]:
        return [] if self.alone else [i for i in range(self.count) if i != self.index]


class Siblings:
    """Asks the other workers for their local figures. Owns `unanswered`."""

    def __init__(self, place: Place | None = None) -> None:
        self.place = place if place is not None else Place()
        self.unanswered = 0
        """Sibling requests that got no usable answer (timeout, refused, not 200)."""

    async def ask(self, path: str, headers: dict[str, str] | None = None) -> dict[int, httpx.Response | None]:
        """GET `path` (local figures) from every sibling at once: each one's answer, or None."""
        answers: dict[int, httpx.Response | None] = {}

        async def one(index: int) -> None:
            transport = httpx.AsyncHTTPTransport(uds=self.place.socket_path(index))
            try:
                async with httpx.AsyncClient(transport=transport, timeout=SIBLING_TIMEOUT_S, trust_env=False) as http:
                    with trio.fail_after(SIBLING_TIMEOUT_S):
                        response = await http.get(
                            f"http://worker-{index}{path}", headers={**(headers or {}), LOCAL_HEADER: "1"}
                        )
                answers[index] = response if response.status_code in (200, 503) else None
            except (httpx.HTTPError, trio.TooSlowError, OSError) as exc:
                log.debug(
                    "sibling did not answer", extra={"event": "sibling_unanswered", "worker": index, "error": str(exc)}
                )
                answers[index] = None
            if answers[index] is None:
                self.unanswered += 1

        async with trio.open_nursery() as nursery:
            for index in self.place.siblings:
                nursery.start_soon(one, index)
        return answers


def families(text: str) -> list[Family]:
    """A text exposition as `Family` values (the pure merge's input)."""
    found: list[Family] = []
    for metric in text_string_to_metric_families(text):
        family = Family(metric.name, metric.type, metric.documentation)
        for sample in metric.samples:
            labels: Labels = tuple(sorted(sample.labels.items()))
            family.samples[(sample.name, labels)] = sample.value
        found.append(family)
    return found


class _Merged:
    """A registry-like collector of fixed families, for prometheus-client's encoders."""

    def __init__(self, merged: Iterable[Family]) -> None:
        self.merged = list(merged)

    def collect(self) -> Iterable[Metric]:
        for family in self.merged:
            metric = Metric(family.name, family.documentation, family.type)
            for (name, labels), value in family.samples.items():
                metric.add_sample(name, dict(labels), value)
            yield metric


def merged_exposition(own: str, others: Iterable[str], accept: str) -> tuple[bytes, str]:
    """Our text exposition merged with the siblings', encoded for `accept`: body and content type."""
    merged = merge([families(own), *(families(text) for text in others)])
    encoder, content_type = choose_encoder(accept)
    return encoder(_Merged(merged)), content_type
