"""wacored.observe.telemetry: the spans of a message's journey, their carrier in SQLite, and the OTLP export."""

from __future__ import annotations

import io
import json
import re
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest
import trio
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, Tracer, format_span_id, format_trace_id

from tests.conftest import Downstream, make_config, open_daemon, serve_downstream
from tests.support import make_delivery, until_settled
from wacored.actors.forwarder import Target, attempt
from wacored.config import ForwardingConfig, TelemetryConfig
from wacored.core.delivery import Verdict
from wacored.observe.telemetry import (
    NO_TRACER,
    Tracing,
    build_exporter,
    child_traceparent,
    forward_span,
    message_traceparent,
    otlp_traces_url,
)
from wacored.store import Delivery

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
INCOMING = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
STORED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Spans(InMemorySpanExporter):
    """Finished spans, and an event a test can wait on for the next ones (spans end in the trio thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = trio.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = super().export(spans)
        self.changed.set()
        self.changed = trio.Event()
        return result


@pytest.fixture
def spans() -> Iterator[Spans]:
    exporter = Spans()
    yield exporter
    exporter.clear()


@pytest.fixture
def tracer(spans: Spans) -> Iterator[Tracer]:
    """A per-test provider (never the global one), exporting synchronously as each span ends."""
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(spans))
    yield provider.get_tracer("test")
    provider.shutdown()


def traceparent(span: ReadableSpan) -> str:
    ctx = span.get_span_context()
    return f"00-{format_trace_id(ctx.trace_id)}-{format_span_id(ctx.span_id)}-{ctx.trace_flags:02x}"


def delivery(traceparent: str = STORED) -> Delivery:
    return make_delivery(traceparent=traceparent)


def target() -> Target:
    return Target(
        name="rides",
        url="http://rides.test/webhook",
        forwarding=ForwardingConfig(timeout_ms=1000),
    )


def recording_transport(status: int, seen: list[httpx.Request]) -> httpx.MockTransport:
    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, content=b"{}")

    return httpx.MockTransport(handler)


async def wait_for_span(spans: Spans, kind: SpanKind) -> ReadableSpan:
    with trio.fail_after(10):
        while not (found := [s for s in spans.get_finished_spans() if s.kind is kind]):
            await spans.changed.wait()
    return found[0]


async def test_a_message_is_one_trace_from_the_callers_span_to_the_downstream(
    tmp_path: Path, services: Downstream, graph: Downstream, spans: Spans, tracer: Tracer
) -> None:
    async with open_daemon(make_config(tmp_path, services, graph), tracer=tracer) as daemon:
        r = await daemon.send_text("rides", headers={"traceparent": INCOMING})
        assert r.status_code == 200
        [got] = await services.wait_for(1, "/rides")
        client = await wait_for_span(spans, SpanKind.CLIENT)
    [server] = [s for s in spans.get_finished_spans() if s.kind is SpanKind.SERVER]
    [route] = [s for s in spans.get_finished_spans() if s.name == "route message"]
    assert format_trace_id(server.context.trace_id) == TRACE_ID
    assert server.parent is not None
    assert format_span_id(server.parent.span_id) == CALLER_SPAN
    assert server.attributes is not None
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["wacored.outcome"] == "accepted"
    assert route.parent is not None
    assert route.parent.span_id == server.context.span_id
    assert route.attributes == {
        "wacored.service": "rides",
        "wacored.route_reason": "keyword",
        "wacored.kind": "message",
    }
    assert client.parent is not None
    assert client.parent.span_id == route.context.span_id
    assert client.context.trace_id == server.context.trace_id
    assert client.attributes is not None
    assert client.attributes["wacored.outcome"] == "delivered"
    # The carrier: the row's traceparent is the route span, and the downstream sees the client span.
    with sqlite3.connect(tmp_path / "wacored.db") as db:
        [(stored,)] = db.execute("SELECT traceparent FROM messages").fetchall()
    assert stored == traceparent(route)
    assert got.headers["traceparent"] == traceparent(client)


async def test_refused_posts_are_traced_with_their_outcome(
    tmp_path: Path, services: Downstream, graph: Downstream, spans: Spans, tracer: Tracer
) -> None:
    async with open_daemon(make_config(tmp_path, services, graph), tracer=tracer) as daemon:
        assert (await daemon.post(b"{}", signed=False)).status_code == 401
    [server] = spans.get_finished_spans()
    assert server.attributes is not None
    assert (server.attributes["http.response.status_code"], server.attributes["wacored.outcome"]) == (
        401,
        "bad_signature",
    )
    assert server.parent is None


async def test_a_forward_attempt_is_a_child_of_the_stored_context(spans: Spans, tracer: Tracer) -> None:
    seen: list[httpx.Request] = []
    result = await attempt(recording_transport(503, seen), target(), delivery(), tracer=tracer)
    assert result.verdict is Verdict.TRANSIENT
    [span] = spans.get_finished_spans()
    assert span.kind is SpanKind.CLIENT
    assert span.parent is not None
    assert format_span_id(span.parent.span_id) == "b7ad6b7169203331"
    assert format_trace_id(span.context.trace_id) == "0af7651916cd43dd8448eb211c80319c"
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["http.response.status_code"] == 503
    assert seen[0].headers["traceparent"] == traceparent(span)


async def test_a_retry_is_a_new_trace_linked_to_the_stored_context(spans: Spans, tracer: Tracer) -> None:
    seen: list[httpx.Request] = []
    result = await attempt(recording_transport(200, seen), target(), delivery(), tracer=tracer, dlq_retry=True)
    assert result.verdict is Verdict.DELIVERED
    [span] = spans.get_finished_spans()
    assert span.parent is None
    assert format_trace_id(span.context.trace_id) != "0af7651916cd43dd8448eb211c80319c"
    [link] = span.links
    assert traceparent_of_link(link.context) == STORED
    assert span.attributes is not None
    assert span.attributes["wacored.retry"] is True
    assert seen[0].headers["traceparent"] == traceparent(span)


def traceparent_of_link(ctx: object) -> str:
    return f"00-{format_trace_id(ctx.trace_id)}-{format_span_id(ctx.span_id)}-01"  # type: ignore[attr-defined]


async def test_forward_span_ends_with_an_error_when_the_attempt_raises(spans: Spans, tracer: Tracer) -> None:
    with pytest.raises(trio.TooSlowError), forward_span(tracer, delivery(), retry=False):
        raise trio.TooSlowError
    [span] = spans.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR


async def test_without_tracing_the_stored_traceparent_is_sent_unchanged() -> None:
    seen: list[httpx.Request] = []
    await attempt(recording_transport(200, seen), target(), delivery())
    await attempt(recording_transport(200, seen), target(), delivery(), tracer=NO_TRACER, dlq_retry=True)
    assert [r.headers["traceparent"] for r in seen] == [STORED, STORED]


def test_without_tracing_a_message_still_gets_a_child_of_the_callers_trace() -> None:
    tp = message_traceparent(NO_TRACER, INCOMING, "rides", "keyword", "message")
    assert re.match(rf"^00-{TRACE_ID}-[0-9a-f]{{16}}-01$", tp)
    assert CALLER_SPAN not in tp
    assert re.match(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-01$", child_traceparent("garbage"))
    assert not child_traceparent(f"00-{'0' * 32}-{CALLER_SPAN}-01").startswith(f"00-{'0' * 32}")


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        ("http://collector:4318", "http://collector:4318/v1/traces"),
        ("http://collector:4318/", "http://collector:4318/v1/traces"),
        ("http://collector:4318/v1/traces", "http://collector:4318/v1/traces"),
    ],
)
def test_otlp_endpoint_is_the_collector_base_or_its_traces_url(endpoint: str, url: str) -> None:
    assert otlp_traces_url(endpoint) == url


def test_traces_none_costs_nothing() -> None:
    tracing = Tracing.from_config(TelemetryConfig())
    assert tracing.provider is None
    assert tracing.tracer is NO_TRACER


def test_console_spans_are_one_json_line_each() -> None:
    exporter = build_exporter(TelemetryConfig(traces="console"))
    assert isinstance(exporter, ConsoleSpanExporter)
    out = io.StringIO()
    exporter.out = out
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    provider.get_tracer("t").start_span("one").end()
    provider.shutdown()
    [line] = out.getvalue().splitlines()
    assert json.loads(line)["name"] == "one"


async def test_spans_are_exported_over_otlp_http_to_the_configured_collector(
    tmp_path: Path, services: Downstream, graph: Downstream, nursery: trio.Nursery
) -> None:
    collector = await serve_downstream(nursery, Downstream())
    config = make_config(
        tmp_path,
        services,
        graph,
        telemetry={"traces": "otlp", "otlp_endpoint": collector.url, "service_name": "wacored-test"},
    )
    async with open_daemon(config) as daemon:
        assert (await daemon.send_text("rides", headers={"traceparent": INCOMING})).status_code == 200
        await services.wait_for(1, "/rides")
        # The forward span ends once the lane has read the answer, before its outcome is recorded.
        await until_settled(tmp_path / "wacored.db")
    # Leaving the daemon flushed its provider (in a thread, while the collector kept serving).
    posts = collector.on("/v1/traces")
    assert posts
    assert all(p.headers["content-type"] == "application/x-protobuf" for p in posts)
    names: dict[str, str] = {}
    for post in posts:
        request = ExportTraceServiceRequest.FromString(post.body)
        for resource_spans in request.resource_spans:
            attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            assert attrs["service.name"] == "wacored-test"
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    names[span.name] = span.trace_id.hex()
    assert names == {"POST /webhook": TRACE_ID, "route message": TRACE_ID, "forward": TRACE_ID}


async def test_a_failed_attempt_span_carries_a_masked_bounded_excerpt(spans: Spans, tracer: Tracer) -> None:
    """The span status holds the downstream's answer as safe text: digits masked, bounded, decodable."""

    async def handler(_: httpx.Request) -> httpx.Response:
        return httpx.Response(
            500,
            content=b"no such user 250788123456 " + b"\xff" * 500,
            headers={"Content-Type": "text/plain; charset=base64"},
        )

    result = await attempt(httpx.MockTransport(handler), target(), delivery(), tracer=tracer)
    [span] = spans.get_finished_spans()
    description = span.status.description or ""
    assert description == result.error
    assert "250788123456" not in description
    assert "2507****456" in description
    assert len(description) <= 220
