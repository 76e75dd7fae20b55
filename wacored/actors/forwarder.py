"""Forwarders: one actor per target, delivering committed messages over HTTP.

A target is a downstream service (``[services.NAME] url``, signed with its own secrets) or the
Graph API sender (``whatsapp``: replies such as the home menu, with the access token). Each forwarder
runs `concurrency` lanes, each with its own httpx transport and kept-alive connection (one shared
pool's bookkeeping caps throughput: docs/stack-notes.md, "httpx and the lane transport"); a sender
always maps to the same lane, so one sender's messages reach a service in arrival order while
different senders proceed concurrently.

Delivery policy (pure functions below): 2xx delivered; 408/425/429/5xx, timeouts and connection
errors transient, retried `retries` times with exponential backoff and full jitter, or later when a
429/503 names a ``Retry-After`` (`retry_after.py`; such an answer does not count against the
breaker); any other 4xx permanent, dead-lettered at once. A delivery that still fails is
dead-lettered through the writer.
Every attempt first asks the target's circuit breaker (`breaker.py`): while it is open the delivery
is not attempted but dead-lettered with the reason ``breaker_open``, for the DLQ retrier. Every
attempt made goes to the writer with the delivery's outcome (`Outcome.tries`: the attempts log).

A paused service (`pauses.py`) is not attempted at all: before each attempt (a first one or a
retry) a lane asks `Delivering.pauses`, and while the service is paused it holds that delivery, in
order, taking nothing else; the rest wait in the lane's channel, then the forwarder's, then on disk.
So an attempt in hand when the pause lands finishes, nothing more starts, and nothing is
dead-lettered for the pause; the breaker is never asked. On resume the lane goes on where it stopped.

Each delivery reads the target afresh from `Delivering.targets`, so a config reload changes URLs,
secrets, timeouts and retries between two deliveries without disturbing one in flight. The number of
lanes is fixed when the forwarder starts.

Error handling:
    Every httpx error of an attempt is caught and classified (`httpx.TransportError` and subclasses).
    Anything else raised while delivering one message (a bug, or a row no check foresaw) costs that
    message, never the lane: it is dead-lettered at once as ``internal_error`` (permanent: retrying the
    same bytes would raise again), logged once with its traceback and counted, and the lane goes on
    with its next row. A crash of the actor itself is left for broken infrastructure: a poison row
    would otherwise crash every restart that reads it back. A downstream's answer is never trusted:
    its excerpt is made safe once, where it is read (`untrusted.excerpt`), so logs, spans, the store
    and the admin API only ever see masked, bounded UTF-8.

Cancellation and stopping:
    An attempt cut short by cancellation records nothing: the message stays ``queued`` and is
    delivered again after the next start (downstreams deduplicate on ``Idempotency-Key``). Once
    `Delivering.stopping` is set, lanes finish the delivery in hand (no further retries) and take no more.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import certifi
import httpx
import trio
from opentelemetry.trace import Status, StatusCode, Tracer

from ..capabilities import Delivering
from ..core.delivery import Verdict, backoff_s, classify, dead_letter_reason, next_try_s, settled
from ..core.retry_after import retry_after_s
from ..core.untrusted import EXCERPT, clean, excerpt, token
from ..observe.counts import bump
from ..observe.telemetry import NO_TRACER, forward_span, recording, traceparent_of
from ..runtime import HEARTBEAT_S
from ..store import AttemptRow, Delivery, Outcome, interface
from ..store.interface import LaneReads
from ..store.writer import Record, WriteOp
from .lanes import Lane
from .targets import Target, targets_of
from .transport import Answer, LaneTransport

log = logging.getLogger(__name__)

PAGE = 64
"""Rows a lane reads at a time: one indexed range read per 64 deliveries at most."""
INTERNAL_ERROR = "internal_error"


@dataclass(frozen=True)
class Attempt:
    verdict: Verdict
    error: str = ""
    status_code: int | None = None
    retry_after_s: float | None = None
    """What the service's ``Retry-After`` asked for (a 429 or 503 only; capped), or None."""
    started_at: float = 0.0
    """Wall-clock time it began (set by `guarded_attempt`)."""
    duration_s: float = 0.0

    def row(self, d: Delivery, service: str, number: int, kind: str, node: str) -> AttemptRow:
        """This attempt as the attempts log keeps it (`error` is already safe: `untrusted.excerpt`)."""
        return AttemptRow(
            d.id, service, number, kind, self.started_at, self.duration_s, self.status_code, self.error, node
        )


async def attempt(
    transport: httpx.AsyncBaseTransport,
    target: Target,
    d: Delivery,
    *,
    tracer: Tracer = NO_TRACER,
    dlq_retry: bool = False,
) -> Attempt:
    """One POST of `d` to `target`, classified; never raises for a network or HTTP failure.

    Traced as one CLIENT span (`telemetry.forward_span`: a child of the message's stored context, or
    linked to it for a dead-letter retry, `dlq_retry`); the ``traceparent`` sent is that span's.
    Without tracing, no span work at all: the stored ``traceparent`` goes as it is.
    """
    if not recording(tracer):
        return await _attempt(transport, target, d, d.traceparent, dlq_retry)
    with forward_span(tracer, d, retry=dlq_retry) as span:
        result = await _attempt(transport, target, d, traceparent_of(span) or d.traceparent, dlq_retry)
        span.set_attribute("wacored.outcome", result.verdict.value)
        if result.status_code is not None:
            span.set_attribute("http.response.status_code", result.status_code)
        if result.verdict is not Verdict.DELIVERED:
            span.set_status(Status(StatusCode.ERROR, result.error))  # already safe: `untrusted.excerpt`
        return result


async def _attempt(
    transport: httpx.AsyncBaseTransport, target: Target, d: Delivery, traceparent: str, dlq_retry: bool
) -> Attempt:
    """The POST itself. It goes straight to the lane's transport: httpx's client layers (auth and
    redirect flows, cookies, hooks) do nothing for a forward and cost ~30% of its CPU. A `LaneTransport`
    gets the target's pre-encoded head (`Target.head`, `LaneTransport.post`); any other transport (a
    test's `httpx.MockTransport`), or a head `Target.head` will not encode, an `httpx.Request`.
    """
    now = time.time()
    lane = transport if isinstance(transport, LaneTransport) else None
    head = target.head(d, now=now, traceparent=traceparent, dlq_retry=dlq_retry) if lane is not None else None
    try:
        # One deadline for the whole attempt (connect, send, answer), so a service that trickles
        # its answer cannot hold the lane past `timeout_ms` either.
        # A bare cancel scope, not `trio.fail_after`: the same deadline without a generator-based
        # context manager per forward.
        with trio.move_on_after(target.forwarding.timeout_ms / 1000) as deadline:
            if lane is not None and head is not None:
                answer = await lane.post(target.route_of(d), head, d.body)
            else:
                answer = await _via_httpx(transport, target, d, now, traceparent, dlq_retry)
        if deadline.cancelled_caught:
            return Attempt(Verdict.TRANSIENT, "timeout (TooSlowError)")
    except httpx.TimeoutException as exc:
        return Attempt(Verdict.TRANSIENT, f"timeout ({type(exc).__name__})")
    except httpx.TransportError as exc:
        return Attempt(Verdict.TRANSIENT, clean(f"connection error ({type(exc).__name__}: {exc})"))
    # The verdict rests on the status alone: what the body says cannot undo a 2xx.
    status = answer.status_code
    verdict = classify(status)
    if verdict is Verdict.DELIVERED:
        return Attempt(verdict, status_code=status)
    wait = retry_after_s(status, answer.header("retry-after"), time.time(), target.forwarding.retry_after_max_s)
    # Whatever charset the service names, the excerpt is UTF-8 with replacement: a name such as
    # "base64" makes Python's codec lookup raise, and others raise UnicodeError. Raw bytes: forwards
    # ask for ``Accept-Encoding: identity``, and decoding a body is not worth the risk (httpx's
    # decoders leak their stream when a body is corrupt).
    encoding = answer.header("content-encoding")
    encoding = "identity" if encoding is None else encoding
    said = excerpt(answer.body[:EXCERPT]) if encoding == "identity" else f"<{token(encoding)}>"
    return Attempt(verdict, f"HTTP {status}: {said}", status, wait)


async def _via_httpx(
    transport: httpx.AsyncBaseTransport, target: Target, d: Delivery, now: float, traceparent: str, dlq_retry: bool
) -> Answer:
    """The POST as an `httpx.Request` through any httpx transport, its answer read as `_drain` reads it."""
    headers = target.headers(d, now=now, dlq_retry=dlq_retry, traceparent=traceparent)
    request = httpx.Request("POST", target.url_of(d), content=d.body, headers=headers)
    response = await transport.handle_async_request(request)
    try:
        head = await _drain(response)
    finally:
        await response.aclose()
    raw = tuple((name.lower(), value) for name, value in response.headers.raw)
    return Answer(response.status_code, raw, head)


async def _drain(response: httpx.Response) -> bytes:
    """Read the response body so the connection can carry the lane's next request; return its head.

    How much is read is the transport's bound (`transport.MAX_BODY`); a transport error while reading
    does not undo the status.
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


async def guarded_attempt(
    rt: Delivering, target: Target, transport: httpx.AsyncBaseTransport, d: Delivery, *, dlq_retry: bool = False
) -> Attempt | None:
    """One attempt of `d` through `target`'s circuit breaker, counted and timed (`Attempt.started_at`,
    `Attempt.duration_s`); None when the breaker did not let it through."""
    name = target.name
    breaker = rt.breakers[name]
    started = trio.current_time()
    started_at = rt.wall_clock()
    if not breaker.allow(started):
        bump(rt.attempt_counts.forwards, (name, "breaker_open"))
        return None
    try:
        result = await attempt(transport, target, d, tracer=rt.tracer, dlq_retry=dlq_retry)
    except BaseException:
        breaker.release()  # cut short (cancelled): it proved nothing either way
        raise
    took = trio.current_time() - started
    rt.metrics.forward_latency.labels(name).observe(took)
    result = dataclasses.replace(result, started_at=started_at, duration_s=took)
    if result.retry_after_s is not None:
        # The service said when to come back: waiting for it is not a failure of the service.
        breaker.release()
    elif result.verdict is Verdict.TRANSIENT:
        breaker.failure(trio.current_time())
    else:
        breaker.success()
    bump(rt.attempt_counts.forwards, (name, result.verdict.value))
    return result


async def deliver(
    rt: Delivering,
    name: str,
    transport: httpx.AsyncBaseTransport,
    d: Delivery,
    rng: random.Random,
    log_to: list[AttemptRow] | None = None,
) -> Outcome | None:
    """Attempt `d` until delivered, refused, blocked by the breaker, or out of retries.

    Each attempt made is appended to `log_to` as it ends (so a caller still has them if this raises)
    and goes with the outcome (`Outcome.tries`). None: the daemon is stopping, and `d` stays queued
    for the next start (its attempts are not logged: it is delivered again then).
    While the service is paused, the next attempt waits (uncounted, the breaker not asked) until it is
    resumed.
    """
    made = log_to if log_to is not None else []
    tries = 0
    while True:
        if not rt.pauses.may_attempt(name):
            await rt.pauses.hold(name, rt.stopping)
            if rt.stopping.is_set():
                return None
        # Read afresh each time: a reload may have changed the target since the last attempt. (A
        # removed service's forwarder is cancelled in the same step that removes its target.)
        target = rt.targets[name]
        result = await guarded_attempt(rt, target, transport, d)
        if result is None:
            blocked = Attempt(Verdict.TRANSIENT, "circuit breaker open")
            return _outcome(rt, d, name, tries, blocked, "breaker_open", made)
        tries += 1
        made.append(result.row(d, name, tries, "delivery", rt.node))
        if settled(result.verdict, tries, target.forwarding.retries):
            return _outcome(rt, d, name, tries, result, dead_letter_reason(result.verdict), made)
        if await _stopped_while_waiting(
            rt, next_try_s(backoff_s(tries, target.forwarding.retry_base_ms / 1000, rng), result.retry_after_s)
        ):
            return None


async def _stopped_while_waiting(rt: Delivering, seconds: float) -> bool:
    """Wait `seconds` before a retry; True (and at once) when the daemon starts stopping meanwhile: a
    retry not yet made is not "the delivery in hand", so the drain does not wait for it (the message
    stays queued)."""
    if rt.stopping.is_set():
        return True
    with trio.move_on_after(seconds):
        await rt.stopping.wait()
        return True
    return False


def internal_error(exc: Exception) -> str:
    """What is kept of an unexpected exception: its class and a short, safe message."""
    return clean(f"{INTERNAL_ERROR}: {type(exc).__name__}: {exc}")


async def deliver_contained(
    rt: Delivering,
    name: str,
    transport: httpx.AsyncBaseTransport,
    d: Delivery,
    rng: random.Random,
) -> Outcome | None:
    """`deliver`, with anything unexpected it raises turned into a permanent dead letter for `d` alone
    (the attempts it made before are logged with it)."""
    made: list[AttemptRow] = []
    try:
        return await deliver(rt, name, transport, d, rng, made)
    except Exception as exc:
        log.exception(
            "delivery raised: the message is dead-lettered, the lane goes on",
            extra={
                "event": "delivery_internal_error",
                "service": name,
                "message_id": d.key,
                "error": internal_error(exc),
            },
        )
        bump(rt.attempt_counts.internal_errors, name)
        return _outcome(rt, d, name, 1, Attempt(Verdict.PERMANENT, internal_error(exc)), INTERNAL_ERROR, made)


def _outcome(
    rt: Delivering,
    d: Delivery,
    name: str,
    tries: int,
    result: Attempt,
    reason: str,
    made: list[AttemptRow],
) -> Outcome:
    at = rt.wall_clock()
    delivered = result.verdict is Verdict.DELIVERED
    permanent = result.verdict is Verdict.PERMANENT
    return Outcome(
        message_id=d.id,
        delivered=delivered,
        attempts=tries,
        at=at,
        error=result.error,
        permanent=permanent,
        status_code=result.status_code,
        target=name,
        key=d.key,
        reason=reason,
        retry_at=None if delivered or permanent else at + next_try_s(rt.config.dlq.delay_s(1), result.retry_after_s),
        tries=tuple(made),
    )


@functools.cache
def tls_context(ca_file: str = "") -> ssl.SSLContext:
    """The TLS context of every lane to services that trust the same CAs: the system's trust store
    (OpenSSL's default paths, ``/etc/ssl/certs`` on Debian, where an operator installs a company CA),
    certifi's bundle as well (a minimal image may have no system store), and the service's ``ca_file``
    (a private CA) when it has one. One context per distinct `ca_file`: building one loads the
    bundles (~25 ms and ~0.5 MB each), which 16 lanes x 8 targets would otherwise pay at every start.

    Raises `OSError` or `ssl.SSLError` for a `ca_file` that cannot be read (check-config says so first).
    """
    context = ssl.create_default_context()
    context.load_verify_locations(cafile=certifi.where())
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


def new_transport(ca_file: str = "") -> httpx.AsyncBaseTransport:
    """A lane's transport: one kept-alive connection, TLS trusting the system store, certifi's bundle
    and `ca_file`."""
    return LaneTransport(tls_context(ca_file))


async def run_lane(
    rt: Delivering,
    lane: Lane,
    reader: LaneReads,
    writes: trio.MemorySendChannel[WriteOp],
    rng: random.Random,
    transport: httpx.AsyncBaseTransport | None = None,
) -> None:
    """Deliver one lane's queued rows one at a time, in id order, while this node holds its lease;
    report each outcome to the writer. Reads a page from the store whenever woken, and every
    heartbeat when idle."""
    name, actor = lane.target, f"forwarder.{lane.target}"
    async with writes, transport or new_transport() as lane_transport:
        while not rt.stopping.is_set():
            rt.beat(actor)
            lane.rearm()
            page = await _page(lane, reader) if lane.held() else []
            if not page:
                await lane.sleep(HEARTBEAT_S)
                continue
            for d in page:
                if rt.stopping.is_set() or not lane.held():
                    break
                lane.busy = True
                try:
                    outcome = await deliver_contained(rt, name, lane_transport, d, rng)
                finally:
                    lane.busy = False
                if outcome is None:
                    return
                _log_outcome(name, d, outcome)
                lane.handed.add(d.id)
                await writes.send(Record(outcome))
            else:
                if len(page) < PAGE:
                    # The read had every row then queued here: read again once something wakes the
                    # lane (a commit of its rows, the relay, a takeover, a replay), not right away.
                    # The bench's lanes made 2.7 reads a message, 1.2 of them empty, before this.
                    await lane.sleep(HEARTBEAT_S)


async def _page(lane: Lane, reader: LaneReads) -> list[Delivery]:
    """The lane's next rows not in hand, oldest first (none when the store cannot be read: the lane
    tries again at its next wake). On this thread when the read is local (SQLite), else in a worker
    thread (`LaneReads.blocking_reads`)."""
    # What is in hand when the read starts: a read in a worker thread may return a row whose outcome
    # the writer commits (and takes out of `handed`) while it runs, still ``queued`` in what it read.
    in_hand = set(lane.handed)
    try:
        limit = PAGE + len(in_hand)
        if reader.blocking_reads:
            rows = await trio.to_thread.run_sync(reader.page, lane.target, lane.index, limit)
        else:
            rows = reader.page(lane.target, lane.index, limit)
    except interface.STORE_ERRORS as exc:
        log.warning(
            "lane cannot read the store", extra={"event": "lane_read_failed", "service": lane.target, "error": str(exc)}
        )
        return []
    return [d for d in rows if d.id not in in_hand and d.id not in lane.handed][:PAGE]


def _log_outcome(name: str, d: Delivery, outcome: Outcome) -> None:
    ids = {"service": name, "message_id": d.key, "request_id": d.request_id, "correlation_id": d.correlation_id}
    if outcome.delivered:
        log.debug("delivered", extra={"event": "delivered", **ids})
    else:
        log.warning(
            "dead-lettered",
            extra={
                "event": "dead_lettered",
                **ids,
                "reason": outcome.reason,
                "error": outcome.error,
                "attempts": outcome.attempts,
            },
        )


async def run_forwarder(
    rt: Delivering,
    name: str,
    lanes: Sequence[Lane],
    reader: LaneReads,
    writes: trio.MemorySendChannel[WriteOp],
    *,
    rng: random.Random | None = None,
    transport: Callable[[], httpx.AsyncBaseTransport] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run target `name`'s lanes (those this node holds deliver; the others wait for a lease).

    Owns: its lane tasks and their HTTP transports, and `writes` (closed on exit); the `Lane`s belong
    to the daemon's board, so a restarted forwarder carries on with what they hold. Stops when
    cancelled (what was not delivered stays queued), or once `rt.stopping` is set and its lanes have
    finished the deliveries in hand. `transport` makes each lane's transport (tests pass
    `httpx.MockTransport`). `reader` is shared by the lanes: they use it on this thread, one at a time.
    """
    rng = rng or random.Random()
    async with writes, trio.open_nursery() as nursery:
        for lane in lanes:
            lane_transport = transport() if transport else new_transport(rt.targets[name].ca_file)
            nursery.start_soon(run_lane, rt, lane, reader, writes.clone(), rng, lane_transport)
        task_status.started()
        # The lanes beat between deliveries; one delivery to a slow service can take longer than the
        # watchdog waits (timeout x attempts), and a slow service is not a wedged forwarder.
        while not rt.stopping.is_set():
            rt.beat(f"forwarder.{name}")
            with trio.move_on_after(HEARTBEAT_S):
                await rt.stopping.wait()
        for lane in lanes:
            lane.wake()  # an idle lane sees `stopping` now, not a heartbeat later


__all__ = [
    "EXCERPT",
    "INTERNAL_ERROR",
    "Attempt",
    "Target",
    "attempt",
    "deliver",
    "deliver_contained",
    "guarded_attempt",
    "internal_error",
    "new_transport",
    "run_forwarder",
    "run_lane",
    "targets_of",
    "tls_context",
]
