"""Ingress: where a webhook enters. ``GET /webhook`` (Meta's handshake) and ``POST /webhook``.

``POST /webhook``, in the contract's order: size (413, before reading a declared-too-long body),
signature over the raw bytes (401), parsing (400), then the writer's transaction (`ingest.ingest`):
per-sender rate limit (429, nothing stored), routing of every message in order from the stored
sessions, one commit (503 if it fails), then 200 with the routes. The answer is sent only after the
commit: a 200 means the batch is on disk. Rate limit and routing run in the writer, on the store's
committed state, so several processes sharing one store limit and route every sender alike.

The body is read under the bounds of `admission`: a deadline for the whole body (``[server]
read_timeout_s``, 408 ``{"error":"request_timeout"}``) and a budget of unverified bytes across every
read in flight (``max_unverified_bytes``); a read shed for a newer request is answered 503
``{"error":"overloaded"}`` with ``Retry-After``. Both answers say ``Connection: close``: the rest of
the body is never read, so the connection cannot carry another request.

The webhook is served as a plain ASGI handler rather than through Quart: it is the hot path, and on
a prototype of this design Quart's request/response machinery alone held it to 0.73x the bare server.
Every other path goes to the Quart app in `api.py`.

Error handling:
    Every failure is an HTTP answer with a JSON body, a log line and a count; nothing raises out of
    the handler except cancellation.

Cancellation:
    The body read runs in the read's own cancel scope (`admission.Admission.reading`): its deadline or
    a shed cancels the read only, and the request still answers. Any other cancellation propagates.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import trio
from opentelemetry import context as otel_context
from opentelemetry import trace

from ..config import WhatsAppConfig
from ..core.ingest import PlannedRow, keeps_statuses, stores_nothing
from ..core.numbers import OTHER, Numbers
from ..core.whatsapp import Batch, PayloadError, parse_webhook, signature_valid
from ..observe import logs
from ..observe.counts import bump
from ..observe.telemetry import message_traceparent, webhook_span
from ..runtime import Runtime
from ..store import StoreUnavailable
from ..store.ingest import IngestContext, Ingested, IngestPolicy
from ..store.writer import Ingest
from .admission import Outcome

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
PARSE_IN_THREAD_BYTES = 256 * 1024
"""Bodies at least this long are parsed in a worker thread: a 3 MB batch takes ~290 ms to parse (measured,
bench/README.md), which on the event loop would stall every other request for as long. Below it the
thread hop (~70 us) costs more than it saves."""


class TooLarge(Exception):
    """The body is longer than ``max_body_bytes``."""


class ClientGone(Exception):
    """The caller disconnected before its body was read: there is nobody left to answer."""


_VARIANT = "89ab"
"""The RFC 4122 variant's hex digits: 10 in the top bits of the fourth group."""


def new_id() -> str:
    """A random UUID4, as ``str(uuid.uuid4())`` spells it, made without a `uuid.UUID` (1.5 us instead
    of 3.6 us, measured; two a POST that carries no ids, as Meta's do)."""
    h = os.urandom(16).hex()
    # Version 4 in the third group's first digit, the RFC 4122 variant (10xx) in the fourth's.
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def request_ids(headers: dict[str, str]) -> tuple[str, str]:
    """The caller's request and correlation ids when well-formed, else new UUID4s."""
    rid = headers.get("x-request-id", "")
    cid = headers.get("x-correlation-id", "")
    return (rid if _ID.match(rid) else new_id(), cid if _ID.match(cid) else new_id())


async def read_body(
    receive: Receive, declared: int | None, limit: int, account: Callable[[int], None] | None = None
) -> bytes:
    """The whole request body; `TooLarge` past `limit` bytes (without reading a declared-long one).

    `account(n)` is called before each chunk of `n` bytes is kept (the unverified-bytes budget)."""
    if declared is not None and declared > limit:
        raise TooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise TooLarge
        if account is not None:
            account(len(chunk))
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _parse(raw: bytes, numbers: Numbers) -> Batch:
    keeps = keeps_statuses(numbers)
    if len(raw) < PARSE_IN_THREAD_BYTES:
        return parse_webhook(raw, keeps)
    return await trio.to_thread.run_sync(parse_webhook, raw, keeps)


class Webhook:
    """The ``/webhook`` ASGI handler for one daemon (`rt` holds its config and state)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request_id, correlation_id = request_ids(headers)
        ids = {"X-Request-ID": request_id, "X-Correlation-ID": correlation_id}
        with logs.bound(request_id=request_id, correlation_id=correlation_id):
            if scope["method"] == "GET":
                await self._handshake(scope, send, ids)
            elif scope["method"] == "POST":
                await self._answer_post(receive, send, headers, ids)
            else:
                await self._respond(send, 405, {"error": "method_not_allowed"}, {**ids, "Allow": "GET, POST"})

    async def _answer_post(self, receive: Receive, send: Send, headers: dict[str, str], ids: dict[str, str]) -> None:
        rt = self.rt
        started = time.perf_counter()
        with webhook_span(rt.tracer, headers) as span:
            try:
                status, body, extra = await self._post(receive, headers, ids["X-Request-ID"], ids["X-Correlation-ID"])
            except ClientGone:
                # Nothing was stored (the body never arrived whole); Meta will deliver it again.
                rt.ingress_counts.request("client_gone", OTHER)
                span.set_attribute("wacored.outcome", "client_gone")
                log.info("caller left before its body was read", extra={"event": "webhook_client_gone"})
                return
            span.set_attribute("http.response.status_code", status)
            latency_s = time.perf_counter() - started
            extra["X-WA-Core-Latency"] = f"{round(latency_s * 1000)}ms"
            await self._respond(send, status, body, {**ids, **extra})
        rt.metrics.ack_latency.observe(latency_s)
        rt.slo.observe_ack(latency_s, rt.config.slo.p95_ms)

    async def _handshake(self, scope: Scope, send: Send, ids: dict[str, str]) -> None:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        token = self.rt.config.whatsapp.verify_token
        mode = query.get("hub.mode", [""])[0]
        given = query.get("hub.verify_token", [""])[0]
        challenge = query.get("hub.challenge", [""])[0]
        if mode == "subscribe" and token and secrets.compare_digest(given.encode(), token.encode()):
            bump(self.rt.ingress_counts.handshakes, "ok")
            log.info("webhook verified", extra={"event": "handshake_ok"})
            await self._send(send, 200, challenge.encode(), "text/plain; charset=utf-8", ids)
            return
        bump(self.rt.ingress_counts.handshakes, "refused")
        log.warning("webhook verification refused", extra={"event": "handshake_refused"})
        await self._respond(send, 403, {"error": "forbidden"}, ids)

    async def _post(
        self, receive: Receive, headers: dict[str, str], request_id: str, correlation_id: str
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        rt = self.rt
        config = rt.config
        declared = headers.get("content-length")
        server = config.server
        admission = rt.admission
        try:
            with admission.reading(server.read_timeout_s) as read:
                raw = await read_body(
                    receive,
                    int(declared) if declared and declared.isdigit() else None,
                    server.max_body_bytes,
                    lambda n: admission.grow(read, n, server.max_unverified_bytes),
                )
        except TooLarge:
            return self._reject(413, "too_large", {"error": "payload_too_large", "limit": server.max_body_bytes})
        if read.outcome is Outcome.TIMED_OUT:
            return self._reject(408, "read_timeout", {"error": "request_timeout"}, {"Connection": "close"})
        if read.outcome is Outcome.SHED:
            return self._reject(503, "shed", {"error": "overloaded"}, {"Retry-After": "1", "Connection": "close"})
        if not self._signed(config.whatsapp, raw, headers.get("x-hub-signature-256")):
            return self._reject(401, "bad_signature", {"error": "unauthorized"})
        # One `Numbers` for the whole POST, though a reload may swap `rt.numbers` meanwhile: what the
        # parse dropped (a status update without a body), the plan must drop too.
        numbers = rt.numbers
        try:
            batch = await _parse(raw, numbers)
        except PayloadError as exc:
            return self._reject(400, "bad_request", {"error": "bad_request", "detail": str(exc)})
        # A POST may hold changes of several numbers: it is labelled with its first change's number.
        label = numbers.label(numbers.key_of(batch.number))
        try:
            ingested = await self._commit(batch, numbers, request_id, correlation_id, headers.get("traceparent"))
        except (StoreUnavailable, trio.BrokenResourceError, trio.ClosedResourceError):
            # The writer refused the transaction, or is gone: either way nothing was stored.
            return self._reject(503, "unavailable", {"error": "unavailable"}, {"Retry-After": "5"}, number=label)
        if (wait := ingested.retry_after) is not None:
            return self._reject(
                429,
                "rate_limited",
                {"error": "rate_limit_exceeded", "retryAfter": wait},
                {"Retry-After": str(wait)},
                number=label,
            )
        return self._accepted(batch, numbers, ingested, label)

    def _signed(self, whatsapp: WhatsAppConfig, raw: bytes, header: str | None) -> bool:
        """Signed with the app secret, or with the previous one while a rotation keeps it (counted)."""
        if signature_valid(whatsapp.app_secret, raw, header):
            return True
        if whatsapp.app_secret_previous and signature_valid(whatsapp.app_secret_previous, raw, header):
            self.rt.ingress_counts.previous_secret += 1
            return True
        return False

    def _reject(
        self,
        status: int,
        outcome: str,
        body: dict[str, Any],
        extra: dict[str, str] | None = None,
        *,
        number: str = OTHER,
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """`number` labels the POST: ``other`` until it is parsed (its first change's number after)."""
        self.rt.ingress_counts.request(outcome, number)
        trace.get_current_span().set_attribute("wacored.outcome", outcome)
        log.warning("webhook refused", extra={"event": f"webhook_{outcome}", "status": status})
        return status, body, dict(extra or {})

    def _context(self, request_id: str, correlation_id: str, traceparent: str | None) -> IngestContext:
        """What the writer adds to the planned rows that is not policy: the request's ids, its time,
        and each message's trace context (a span parented by this POST's, made where the plan is)."""
        tracer, parent = self.rt.tracer, otel_context.get_current()

        def trace_of(p: PlannedRow) -> str:
            return message_traceparent(tracer, traceparent, p.service, p.reason, p.kind, parent=parent)

        return IngestContext(request_id, correlation_id, self.rt.wall_clock(), trace_of)

    async def _commit(
        self, batch: Batch, numbers: Numbers, request_id: str, correlation_id: str, traceparent: str | None
    ) -> Ingested:
        rt = self.rt
        if stores_nothing(batch, numbers):
            # Nothing to store (no message, every status dropped): no transaction, so the 200 does
            # not wait on the writer (measured: 155 fewer Python calls a POST, bench/ingress.py), and
            # a store that is down does not refuse what it would not keep.
            return Ingested()
        policy = IngestPolicy(numbers, rt.config.sessions.ttl_s, rt.ratelimit)
        op = Ingest(batch, policy, self._context(request_id, correlation_id, traceparent))
        await rt.writes.send(op)
        return await op.reply.wait()

    def _accepted(
        self, batch: Batch, numbers: Numbers, ingested: Ingested, label: str
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        counters = self.rt.ingress_counts
        n_messages = len(batch.messages)
        rows, ids = ingested.rows[:n_messages], ingested.ids[:n_messages]
        inserted = [r for r, row_id in zip(rows, ids, strict=True) if row_id is not None]
        routes: list[dict[str, Any]] = [
            {"message_id": r.key, "service": r.service, "reason": r.reason, **({"probe": True} if r.probe else {})}
            for r in inserted
        ]
        duplicates = n_messages - len(routes)
        for r in inserted:
            if r.probe:
                # Counted apart: a probe is not traffic, and must not move the routed figures or
                # the alerts and dashboards built on them.
                counters.probes += 1
                continue
            bump(counters.routed, (r.service, r.reason))
            # An unrouted row's number is the payload's id: `label` makes it ``other``, never the id.
            counters.count(("routed", r.service, r.reason, numbers.label(r.number)))
        # Counted once the batch is committed: a POST answered 503 counts nothing, so Meta's redelivery
        # of it is not counted twice.
        for st in batch.statuses:
            bump(counters.statuses, st.status)
            counters.count(("statuses", st.status, numbers.label(numbers.key_of(st.number))))
        outcome = "duplicate" if duplicates and not routes else "accepted"
        counters.request(outcome, label)
        trace.get_current_span().set_attributes({"wacored.outcome": outcome, "wacored.accepted": len(routes)})
        if batch.errors:
            log.warning("webhook carried errors", extra={"event": "webhook_value_errors", "count": batch.errors})
        body = {"accepted": len(routes), "duplicates": duplicates, "statuses": len(batch.statuses), "routes": routes}
        extra = {"X-Routed-Service": routes[0]["service"]} if routes else {}
        return 200, body, extra

    async def _respond(self, send: Send, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
        await self._send(send, status, json.dumps(body).encode(), "application/json", headers)

    async def _send(self, send: Send, status: int, body: bytes, content_type: str, headers: dict[str, str]) -> None:
        raw = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
        raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        if self.rt.draining and "Connection" not in headers:
            raw.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})


async def refuse_overloaded(send: Send, ids: dict[str, str]) -> None:
    """Answer a request refused at the connection cap (nothing in flight could be shed): 503, closed."""
    body = json.dumps({"error": "overloaded"}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"),
        (b"connection", b"close"),
    ]
    headers += [(k.lower().encode(), v.encode()) for k, v in ids.items()]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})
