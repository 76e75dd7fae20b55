"""Forwarders: one actor per target, delivering committed messages over HTTP.

A target is a downstream service (``[services.NAME] url``, body re-signed with the app secret) or the
Graph API sender (``whatsapp``: replies such as the home menu, with the access token). Each forwarder
runs `concurrency` lanes, each with its own httpx transport and kept-alive connection (one shared
pool's bookkeeping caps throughput, STACK_NOTES "httpx"); a sender always maps to the same lane, so
one sender's messages reach a service in arrival order while different senders proceed concurrently.

Delivery policy (pure functions below): 2xx delivered; 408/425/429/5xx, timeouts and connection
errors transient, retried `retries` times with exponential backoff and full jitter; any other 4xx
permanent, dead-lettered at once. A delivery that still fails is dead-lettered through the writer.

Error handling:
    Every httpx error of an attempt is caught and classified (`httpx.TransportError` and subclasses);
    nothing else is expected, and anything else crashes the actor (its messages stay queued on disk).

Cancellation:
    An attempt cut short by cancellation records nothing: the message stays ``queued`` and is
    delivered again after the next start (downstreams deduplicate on ``Idempotency-Key``).
"""

from __future__ import annotations

import functools
import logging
import random
import ssl
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import certifi
import httpx
import trio
from opentelemetry.trace import Status, StatusCode, Tracer

from .config import GRAPH_SENDER, Config, ForwardingConfig
from .runtime import VERSION
from .store import Delivery, Outcome, StoreUnavailable
from .telemetry import NO_TRACER, forward_span, traceparent_of
from .transport import LaneTransport
from .whatsapp import sign
from .writer import CatchUp, DeliveryQueue, Record, WriteOp

log = logging.getLogger(__name__)

LANE_BUFFER = 64
CATCH_UP_RETRY_S = 1.0
EXCERPT = 200
USER_AGENT = f"wacored/{VERSION}"


class Verdict(StrEnum):
    DELIVERED = "delivered"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


def classify(status: int) -> Verdict:
    """What an HTTP status means for a delivery (ARCHITECTURE.md, "Forwarding")."""
    if 200 <= status < 300:
        return Verdict.DELIVERED
    if status in (408, 425, 429) or status >= 500:
        return Verdict.TRANSIENT
    return Verdict.PERMANENT


def backoff_s(retry: int, base_s: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff before retry number `retry` (1-based)."""
    return rng.uniform(0.0, base_s * 2 ** (retry - 1))


def lane_of(sender: str, lanes: int) -> int:
    """A stable lane per sender (crc32: the same across restarts, unlike `hash`)."""
    return zlib.crc32(sender.encode()) % lanes


@dataclass(frozen=True)
class Target:
    """Where one forwarder delivers, and how it authenticates."""

    name: str
    url: str
    forwarding: ForwardingConfig
    app_secret: str = ""
    access_token: str = ""

    @property
    def is_graph(self) -> bool:
        return self.name == GRAPH_SENDER

    @functools.cached_property
    def parsed_url(self) -> httpx.URL:
        """`url`, parsed once: every forward of the target reuses it."""
        return httpx.URL(self.url)


    def headers(self, d: Delivery) -> dict[str, str]:
        headers = {
            "Content-Type": "application/json",
            "Accept-Encoding": "identity",
            "User-Agent": USER_AGENT,
            "X-Correlation-ID": d.correlation_id,
            "X-Request-ID": d.request_id,
            "Idempotency-Key": d.key,
            "traceparent": d.traceparent,
        }
        if self.is_graph:
            headers["Authorization"] = f"Bearer {self.access_token}"
            return headers
        headers.update({
            "X-Routed-From": "wacored",
            "X-Routed-Service": d.service,
            "X-Route-Reason": d.reason,
            "X-Hub-Signature-256": sign(self.app_secret, d.body),
        })
        return headers


def targets_of(config: Config) -> dict[str, Target]:
    """Every forwarding target of a config: each service, and the Graph API sender."""
    secret = config.whatsapp.app_secret
    targets = {
        name: Target(name=name, url=svc.url, forwarding=svc.forwarding, app_secret=secret)
        for name, svc in config.services.items()
    }
    targets[GRAPH_SENDER] = Target(
        name=GRAPH_SENDER,
        url=config.whatsapp.messages_url,
        forwarding=config.forwarding,
        access_token=config.whatsapp.access_token,
    )
    return targets


@dataclass(frozen=True)
class Attempt:
    verdict: Verdict
    error: str = ""
    status_code: int | None = None


async def attempt(
    transport: httpx.AsyncBaseTransport, target: Target, d: Delivery, *, tracer: Tracer = NO_TRACER,
    retry: bool = False,
) -> Attempt:
    """One POST of `d` to `target`, classified; never raises for a network or HTTP failure.

    Traced as one CLIENT span (`telemetry.forward_span`: a child of the message's stored context, or
    linked to it when `retry`, a dead-letter retry); the ``traceparent`` sent is that span's.
    """
    with forward_span(tracer, d, retry=retry) as span:
        result = await _attempt(transport, target, d, traceparent_of(span) or d.traceparent)
        span.set_attribute("wacored.outcome", result.verdict.value)
        if result.status_code is not None:
            span.set_attribute("http.response.status_code", result.status_code)
        if result.verdict is not Verdict.DELIVERED:
            span.set_status(Status(StatusCode.ERROR, result.error[:EXCERPT]))
        return result


async def _attempt(transport: httpx.AsyncBaseTransport, target: Target, d: Delivery, traceparent: str) -> Attempt:
    """The POST itself. It goes straight to the lane's transport (`LaneTransport`): httpx's client
    layers (auth and redirect flows, cookies, hooks) do nothing for a forward and cost ~30% of its CPU.
    """
    headers = target.headers(d)
    headers["traceparent"] = traceparent
    request = httpx.Request("POST", target.parsed_url, content=d.body, headers=headers)
    try:
        # One deadline for the whole attempt (connect, send, answer), so a service that trickles
        # its answer cannot hold the lane past `timeout_ms` either.
        with trio.fail_after(target.forwarding.timeout_ms / 1000):
            response = await transport.handle_async_request(request)
            try:
                head = await _drain(response)
            finally:
                await response.aclose()
    except (httpx.TimeoutException, trio.TooSlowError) as exc:
        return Attempt(Verdict.TRANSIENT, f"timeout ({type(exc).__name__})")
    except httpx.TransportError as exc:
        return Attempt(Verdict.TRANSIENT, f"connection error ({type(exc).__name__}: {exc})"[:EXCERPT])
    # The verdict rests on the status alone: what the body says cannot undo a 2xx.
    verdict = classify(response.status_code)
    if verdict is Verdict.DELIVERED:
        return Attempt(verdict, status_code=response.status_code)
    encoding = response.headers.get("content-encoding", "identity")
    excerpt = head.decode(response.encoding or "utf-8", "replace") if encoding == "identity" else f"<{encoding}>"
    return Attempt(verdict, f"HTTP {response.status_code}: {excerpt}", response.status_code)


async def _drain(response: httpx.Response) -> bytes:
    """Read the response body so the connection can carry the lane's next request; return its head.

    Raw bytes: forwards ask for ``Accept-Encoding: identity``, and decoding a body is not worth the
    risk (httpx's decoders leak their stream when a body is corrupt). How much is read is the
    transport's bound (`transport.MAX_BODY`); a transport error while reading does not undo the status.
    """
    if response.is_stream_consumed:  # already read, as a transport may hand it over
        return response.content[:EXCERPT]
    head = b""
    try:
        async for part in response.aiter_raw():
            head += part[: EXCERPT - len(head)]
    except httpx.TransportError:
        pass
    return head


async def deliver(
    transport: httpx.AsyncBaseTransport, target: Target, d: Delivery, rng: random.Random,
    clock: Callable[[], float], *, tracer: Tracer = NO_TRACER,
) -> Outcome:
    """Attempt `d` until delivered, permanently refused, or out of retries."""
    fwd = target.forwarding
    tries = 0
    result = Attempt(Verdict.TRANSIENT)
    for tries in range(1, fwd.retries + 2):
        result = await attempt(transport, target, d, tracer=tracer)
        if result.verdict is not Verdict.TRANSIENT or tries > fwd.retries:
            break
        await trio.sleep(backoff_s(tries, fwd.retry_base_ms / 1000, rng))
    return Outcome(
        message_id=d.id,
        delivered=result.verdict is Verdict.DELIVERED,
        attempts=tries,
        at=clock(),
        error=result.error,
        permanent=result.verdict is Verdict.PERMANENT,
        status_code=result.status_code,
        target=target.name,
        key=d.key,
    )


@functools.cache
def _tls() -> ssl.SSLContext:
    # One context for every lane: building one loads the CA bundle (~25 ms and ~0.5 MB each), which
    # 16 lanes x 8 targets would pay at every start.
    return ssl.create_default_context(cafile=certifi.where())


def _transport() -> httpx.AsyncBaseTransport:
    return LaneTransport(_tls())


async def run_lane(
    target: Target,
    receive: trio.MemoryReceiveChannel[Delivery],
    writes: trio.MemorySendChannel[WriteOp],
    rng: random.Random,
    clock: Callable[[], float] = time.time,
    transport: httpx.AsyncBaseTransport | None = None,
    tracer: Tracer = NO_TRACER,
) -> None:
    """Deliver one lane's messages one at a time, in order; report each outcome to the writer."""
    async with receive, writes, (transport or _transport()) as lane_transport:
        async for d in receive:
            outcome = await deliver(lane_transport, target, d, rng, clock, tracer=tracer)
            ids = {"service": target.name, "message_id": d.key, "request_id": d.request_id,
                   "correlation_id": d.correlation_id}
            if outcome.delivered:
                log.debug("delivered", extra={"event": "delivered", **ids})
            else:
                log.warning(
                    "dead-lettered",
                    extra={"event": "dead_lettered", **ids, "error": outcome.error, "attempts": outcome.attempts},
                )
            await writes.send(Record(outcome))


async def run_forwarder(
    target: Target,
    queue: DeliveryQueue,
    writes: trio.MemorySendChannel[WriteOp],
    *,
    rng: random.Random | None = None,
    clock: Callable[[], float] = time.time,
    transport: httpx.AsyncBaseTransport | None = None,
    tracer: Tracer = NO_TRACER,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Feed `target`'s lanes from its queue, reading spilled rows back from disk in order.

    Owns: the queue's receive end, its lanes and their HTTP clients, and `writes` (closed on exit).
    Stops: when cancelled (what was not delivered stays queued on disk). `transport` replaces the
    network (tests pass `httpx.MockTransport`).
    """
    rng = rng or random.Random()
    lanes = max(1, target.forwarding.concurrency)
    async with writes, trio.open_nursery() as nursery:
        sends: list[trio.MemorySendChannel[Delivery]] = []
        for _ in range(lanes):
            send, receive = trio.open_memory_channel[Delivery](LANE_BUFFER)
            sends.append(send)
            nursery.start_soon(run_lane, target, receive, writes.clone(), rng, clock, transport, tracer)
        task_status.started()
        async with queue.receive:
            while True:
                batch = await _next(queue, writes)
                for d in batch:
                    await sends[lane_of(d.sender, lanes)].send(d)


async def _next(queue: DeliveryQueue, writes: trio.MemorySendChannel[WriteOp]) -> list[Delivery]:
    if queue.spill_from is not None and queue.depth() == 0:
        ask = CatchUp(queue.target)
        await writes.send(ask)
        try:
            return await ask.reply.wait()
        except StoreUnavailable:
            # The rows stay on disk and spill_from is unchanged: ask again shortly.
            await trio.sleep(CATCH_UP_RETRY_S)
            return []
    return [await queue.receive.receive()]
