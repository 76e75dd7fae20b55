"""Traces: one OpenTelemetry `TracerProvider` per daemon, and the spans of a message's journey.

::

    POST /webhook (SERVER, continues the caller's ``traceparent``)
     └─ route message (INTERNAL, one per routed message) ── its context is stored with the row
         └─ forward (CLIENT, one per attempt; parent = the stored context) ── sent as ``traceparent``
    forward (CLIENT, a DLQ retry: a new trace *linked* to the stored context, not parented)

Memory channels and the SQLite row do not carry contextvars, so the stored ``traceparent`` is the
carrier between ingress and the forwarders (docs/stack-notes.md, "OpenTelemetry").

The provider is never the global one (tests run many daemons in one process). With ``traces =
"none"`` the daemon's tracer is `NO_TRACER` and ingress skips span work entirely; rows still get a
valid W3C ``traceparent`` so downstreams can start a trace of their own.

Cancellation:
    `Tracing.aclose` flushes in a worker thread (the SDK's shutdown blocks), shielded and bounded by
    `FLUSH_S`: a collector that does not answer cannot hold the daemon's exit.
"""

from __future__ import annotations

import re
import secrets
import sys
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING

import trio
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ..config import TelemetryConfig

if TYPE_CHECKING:
    from ..store import Delivery

NO_TRACER: Tracer = trace.NoOpTracer()
SPAN_QUEUE = 65_536
"""Spans held before the processor drops: a 1000-message batch makes ~2000 spans at once, and the
SDK's default queue (2048) dropped half of them at burst rates (docs/stack-notes.md, "OpenTelemetry")."""
SPAN_BATCH = 2_048
EXPORT_TIMEOUT_MS = 5_000
FLUSH_S = 5.0
OTLP_TRACES_PATH = "/v1/traces"
INSTRUMENTATION = "wacored"

_PROPAGATOR = TraceContextTextMapPropagator()
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")


def recording(tracer: Tracer) -> bool:
    """Whether `tracer` records anything (False for `NO_TRACER`: callers skip span work)."""
    return not isinstance(tracer, trace.NoOpTracer)


class Tracing:
    """The tracer of one daemon and the provider behind it (None when traces are off)."""

    def __init__(self, provider: TracerProvider | None) -> None:
        self.provider = provider
        self.tracer: Tracer = provider.get_tracer(INSTRUMENTATION) if provider else NO_TRACER

    @classmethod
    def from_config(cls, config: TelemetryConfig, exporter: SpanExporter | None = None) -> Tracing:
        """The tracing `config` asks for; `exporter` replaces the configured one (tests)."""
        exporter = exporter or build_exporter(config)
        if exporter is None:
            return cls(None)
        provider = TracerProvider(
            resource=Resource.create({"service.name": config.service_name}), shutdown_on_exit=False
        )
        provider.add_span_processor(
            BatchSpanProcessor(
                exporter,
                max_queue_size=SPAN_QUEUE,
                max_export_batch_size=SPAN_BATCH,
                export_timeout_millis=EXPORT_TIMEOUT_MS,
            )
        )
        return cls(provider)

    async def aclose(self) -> None:
        """Flush what is buffered and stop the exporter, in a thread, for at most `FLUSH_S`."""
        if self.provider is None:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(FLUSH_S):
            await trio.to_thread.run_sync(self.provider.shutdown, abandon_on_cancel=True)


def build_exporter(config: TelemetryConfig) -> SpanExporter | None:
    if config.traces == "console":
        # One line per span on stdout: stderr carries the JSON log lines, which must stay one per line.
        return ConsoleSpanExporter(service_name=config.service_name, out=sys.stdout, formatter=_one_line)
    if config.traces == "otlp":
        # Imported here: the OTLP exporter pulls in protobuf and requests, which "none" never needs.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=otlp_traces_url(config.otlp_endpoint), timeout=EXPORT_TIMEOUT_MS / 1000)
    return None


def _one_line(span: ReadableSpan) -> str:
    return f"{span.to_json(indent=None)}\n"


def otlp_traces_url(endpoint: str) -> str:
    """The collector's traces URL: `endpoint` as given when it names the path, else base + ``/v1/traces``
    (the way ``OTEL_EXPORTER_OTLP_ENDPOINT`` is read)."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith(OTLP_TRACES_PATH) else endpoint + OTLP_TRACES_PATH


def extract(traceparent: str | None) -> Context:
    """The context a ``traceparent`` header carries (an empty context when it is absent or invalid)."""
    return _PROPAGATOR.extract({"traceparent": traceparent} if traceparent else {})


def traceparent_of(span: Span) -> str | None:
    """`span`'s context as a W3C ``traceparent``, or None for a span that is not a real one."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, trace.set_span_in_context(span))
    return carrier.get("traceparent")


def child_traceparent(incoming: str | None) -> str:
    """A W3C traceparent continuing the caller's trace, or starting one (used when traces are off)."""
    match = _TRACEPARENT.match(incoming or "")
    trace_id = match.group(1) if match and match.group(1) != "0" * 32 else secrets.token_hex(16)
    return f"00-{trace_id}-{secrets.token_hex(8)}-01"


_NOT_RECORDING = nullcontext(trace.INVALID_SPAN)


def webhook_span(tracer: Tracer, headers: Mapping[str, str]) -> AbstractContextManager[Span]:
    """The SERVER span of one webhook POST, current inside the block; a no-op span when not recording
    (a shared `nullcontext`: no generator nor span made per POST)."""
    if not recording(tracer):
        return _NOT_RECORDING
    return tracer.start_as_current_span(
        "POST /webhook",
        context=extract(headers.get("traceparent")),
        kind=SpanKind.SERVER,
        attributes={"http.request.method": "POST", "url.path": "/webhook", "http.route": "/webhook"},
    )


def message_traceparent(
    tracer: Tracer, incoming: str | None, service: str, reason: str, kind: str, *, parent: Context | None = None
) -> str:
    """The ``traceparent`` stored with one routed message: the context of its own span (a child of
    `parent`, the POST span's context, by default the current one) when recording, else a fresh child
    of the caller's trace. The writer plans the rows in its own task: ingress passes its context."""
    if not recording(tracer):
        return child_traceparent(incoming)
    span = tracer.start_span(
        "route message",
        context=parent,
        attributes={"wacored.service": service, "wacored.route_reason": reason, "wacored.kind": kind},
    )
    span.end()
    return traceparent_of(span) or child_traceparent(incoming)


@contextmanager
def forward_span(tracer: Tracer, d: Delivery, *, retry: bool) -> Iterator[Span]:
    """The CLIENT span of one forward attempt of `d`.

    A first delivery continues the trace stored with the row (``d.traceparent`` is the parent). A
    dead-letter retry runs minutes or hours later, as its own trace *linked* to the stored context,
    so the original trace is not stretched over that gap. The span is not made current: nothing
    below an attempt starts spans.
    """
    stored = trace.get_current_span(extract(d.traceparent)).get_span_context()
    links = [Link(stored)] if retry and stored.is_valid else None
    parent = Context() if retry else trace.set_span_in_context(trace.NonRecordingSpan(stored))
    span = tracer.start_span(
        "forward",
        context=parent,
        kind=SpanKind.CLIENT,
        links=links,
        attributes={
            "wacored.service": d.target,
            "wacored.route_reason": d.reason,
            "wacored.kind": d.kind,
            "wacored.retry": retry,
            "http.request.method": "POST",
        },
    )
    try:
        yield span
    except BaseException as exc:
        span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        raise
    finally:
        span.end()
