"""The HTTP application: the webhook handler plus a Quart app for everything else (``/health``,
``/metrics``).

Every response carries ``X-Request-ID`` and ``X-Correlation-ID`` (the caller's, or new UUID4s).
Every HTTP request counts toward ``[server] max_connections`` (`admission`): one arriving at the cap
sheds the oldest unverified webhook read, or is refused 503 when there is none to shed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, MutableMapping
from typing import Any

import httpx
import trio
from quart import Response, jsonify, request
from quart_trio import QuartTrio

from ..core.numbers import OTHER
from ..observe.state import ActorState
from ..ops.connection import store_where
from ..ops.operations import iso
from ..runtime import Runtime
from ..siblings import LOCAL_HEADER, merged_exposition
from ..store import interface
from ..store.writer import StoreWrites, store_writes_status
from ..version import VERSION
from . import admin
from .ingress import Receive, Scope, Send, Webhook, refuse_overloaded, request_ids

log = logging.getLogger(__name__)

HEALTH_DB_TIMEOUT_S = 2.0
CORE_ACTORS = ("writer", "ingress")


async def health_report(rt: Runtime) -> tuple[int, dict[str, Any]]:
    """The /health body: ``unhealthy`` (503) when the store cannot be read, its commits have failed for
    ``[store] unhealthy_after_s``, or a core actor is down; ``degraded`` while commits fail, when
    another actor is down or a breaker is not closed; else ``healthy``. A paused service does not
    make it degraded: that is an operator's decision, shown per service (``paused``, since when,
    why) and alerted on when it lasts (WacoredServicePausedTooLong). Store figures (queued
    messages, dead letters) are the stats actor's cached ones, never a query at request time."""
    checks: dict[str, Any] = {}
    try:
        with trio.fail_after(HEALTH_DB_TIMEOUT_S):
            async with rt.reader_lock:
                schema = await trio.to_thread.run_sync(rt.reader.ping)
        checks["database"] = {"status": "ok", "schema_version": schema, "path": store_where(rt.config.store)}
    except interface.STORE_ERRORS + (trio.TooSlowError,) as exc:
        checks["database"] = {"status": "error", "error": str(exc) or type(exc).__name__}
    now = rt.wall_clock()
    checks["store_writes"] = _store_writes(rt.store_writes, now, rt.config.store.unhealthy_after_s)
    checks["actors"] = {name: _actor(a) for name, a in sorted(rt.actors.items())}
    cache = rt.session_cache
    checks["sessions"] = {
        "active": rt.stats.sessions_active,
        "as_of": iso(rt.stats.refreshed_at),
        "cached": cache.entries,
        "store_reads": cache.store_reads,
        "cache_clears": cache.clears,
    }
    checks["requests"] = dict(rt.ingress_counts.requests)
    admission = rt.admission
    checks["ingress"] = {
        "in_flight": admission.in_flight,
        "unverified_reads": len(admission.reads),
        "unverified_bytes": admission.unverified_bytes,
    }
    checks["routed"] = {f"{service}:{reason}": n for (service, reason), n in rt.ingress_counts.routed.items()}
    checks["probes"] = rt.ingress_counts.probes
    checks["statuses"] = dict(rt.ingress_counts.statuses)
    stats = rt.stats
    checks["dead_letters"] = {
        **stats.dead_letters,
        "oldest_pending_age_s": None if stats.oldest_pending_at is None else round(now - stats.oldest_pending_at, 1),
        "as_of": iso(stats.refreshed_at),
    }
    checks["reloads"] = dict(rt.reload_counts.results)
    mono = trio.current_time()
    held = set(rt.lanes.held_lanes())
    checks["leases"] = {
        "node": rt.node,
        "lanes_held": sorted(held),
        "singletons": sorted(n for n in rt.lanes.singletons if rt.lanes.holds(n)),
        "ttl_s": rt.lanes.ttl_s,
    }
    paused = rt.pauses.paused
    services = {
        name: {
            "paused": name in paused,
            "paused_since": iso(paused[name].since) if name in paused else None,
            "pause_reason": paused[name].reason if name in paused else None,
            "breaker": rt.breakers[name].state(mono).value,
            "queued": stats.queued.get(name, 0),
            "oldest_queued_age_s": round(now - stats.oldest_queued_at[name], 1)
            if name in stats.oldest_queued_at
            else None,
            "lanes": len(rt.lanes.lanes.get(name, ())),
            "lanes_held": sum(1 for lane in rt.lanes.lanes.get(name, ()) if lane.name in held),
        }
        for name in sorted(rt.targets)
    }
    writes = checks["store_writes"]["status"]
    core_down = (
        checks["database"]["status"] != "ok"
        or writes == "down"
        or any(not rt.actors.get(name, ActorState()).running for name in CORE_ACTORS)
    )
    any_down = any(not a.running for a in rt.actors.values())
    any_open = any(svc["breaker"] != "closed" for svc in services.values())
    status = "unhealthy" if core_down else "degraded" if any_down or any_open or writes != "ok" else "healthy"
    body = {
        "status": status,
        "service": "wacored",
        "version": VERSION,
        "timestamp": iso(time.time()),
        "uptime_s": round(rt.wall_clock() - rt.started_at, 1),
        "checks": checks,
        "services": services,
        "workers": [worker_section(rt, status, checks["actors"])],
    }
    return (503 if status == "unhealthy" else 200), body


def worker_section(rt: Runtime, status: str, actors: dict[str, Any]) -> dict[str, Any]:
    """This worker's own part of /health, which its siblings pass through whole (`with_siblings`)."""
    place = rt.siblings.place
    return {
        "index": place.index,
        "pid": os.getpid(),
        "node": rt.node,
        "ready": rt.actors.get("ingress", ActorState()).running and not rt.draining,
        "started_at": iso(rt.started_at),
        "restarts": place.restarts,
        "status": status,
        "actors": actors,
        "lanes_held": sorted(rt.lanes.held_lanes()),
        "singletons": sorted(n for n in rt.lanes.singletons if rt.lanes.holds(n)),
    }


STATUS_RANK = {"healthy": 0, "degraded": 1, "unhealthy": 2}
BREAKER_RANK = {"closed": 0, "half_open": 1, "open": 2}
SUMMED_CHECKS = ("requests", "routed", "probes", "statuses")
"""Counts of what each worker's ingress took: the daemon's are their sums (as in /metrics)."""
SUMMED_SESSIONS = ("cached", "store_reads", "cache_clears")
"""Each worker's session cache's figures: the daemon's are their sums (``active`` is the store's)."""
WRITES_RANK = {"ok": 0, "failing": 1, "down": 2}


def with_siblings(body: dict[str, Any], answers: Mapping[int, Any]) -> dict[str, Any]:
    """`body` (this worker's /health) with every sibling's worker section, from `answers` (each
    one's local /health body, or None when it did not answer), and the worst status of them all.

    A sibling that does not answer is listed as ``down`` (it is being restarted, or wedged) and makes
    the daemon ``degraded``: the other workers still serve. The ingress counts (`SUMMED_CHECKS`) are
    summed over the workers that answered, each service's ``breaker`` is the worst of theirs, and so is
    ``store_writes`` (with the outcomes held summed); the session caches' figures are summed too (every
    worker has its own cache); the rest (leases, ``lanes_held``) stays the answering worker's own.
    """
    workers = list(body["workers"])
    for index, answer in sorted(answers.items()):
        sections = answer.get("workers") if isinstance(answer, dict) else None
        if isinstance(sections, list) and sections and all(isinstance(s, dict) for s in sections):
            workers.extend(sections)
        else:
            workers.append({"index": index, "ready": False, "status": "down"})
    workers.sort(key=lambda w: int(w.get("index", 0)))
    # "down" (and anything unknown) counts as degraded: the other workers still serve.
    worst = max([body["status"], *(w.get("status") for w in workers)], key=lambda s: STATUS_RANK.get(str(s), 1))
    status = worst if worst in STATUS_RANK else "degraded"
    merged = {**body, "status": status, "workers": workers}
    others = [answer for answer in answers.values() if isinstance(answer, dict)]
    if "checks" in body:
        checks = merged["checks"] = dict(body["checks"])
        for key in SUMMED_CHECKS:
            if key in checks:
                checks[key] = _summed(checks[key], [_part(other, "checks", key) for other in others])
        if isinstance(checks.get("store_writes"), Mapping):
            # Each worker has a writer of its own: the daemon's commits are as bad as the worst of
            # them (the one that made it degraded), with the latest error among equals (kept after
            # recovery, as a single writer keeps it), and the outcomes held are all of theirs.
            sections = [checks["store_writes"], *(_part(other, "checks", "store_writes") for other in others)]
            writes = [w for w in sections if isinstance(w, Mapping)]
            worst = max(
                writes, key=lambda w: (WRITES_RANK.get(str(w.get("status")), 1), str(w.get("last_error_at") or ""))
            )
            checks["store_writes"] = {**worst, "outcomes_held": _summed(0, [w.get("outcomes_held") for w in writes])}
        if isinstance(sessions := checks.get("sessions"), Mapping):
            checks["sessions"] = {
                **sessions,
                **{
                    key: _summed(sessions[key], [_part(other, "checks", "sessions", key) for other in others])
                    for key in SUMMED_SESSIONS
                    if isinstance(sessions.get(key), int)
                },
            }
    # Each worker has breakers of its own: the service's is the worst of them (the one that made the
    # daemon degraded), whichever worker answers.
    if "services" in body:
        merged["services"] = {
            name: {
                **svc,
                "breaker": max(
                    [svc["breaker"], *(_part(other, "services", name, "breaker") for other in others)],
                    key=lambda b: BREAKER_RANK.get(str(b), -1),
                ),
            }
            for name, svc in body["services"].items()
        }
    return merged


def _part(body: Mapping[str, Any], *keys: str) -> Any:
    """``body[k1][k2]...``, or None where a sibling's body lacks it."""
    value: Any = body
    for key in keys:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def _summed(own: Any, others: list[Any]) -> Any:
    """A count (an int, or a mapping of ints) plus the siblings' (what is not one is skipped)."""
    if isinstance(own, int):
        return own + sum(n for n in others if isinstance(n, int) and not isinstance(n, bool))
    total = dict(own)
    for other in others:
        if isinstance(other, Mapping):
            for key, n in other.items():
                if isinstance(n, int) and not isinstance(n, bool):
                    total[key] = total.get(key, 0) + n
    return total


def _store_writes(w: StoreWrites, now: float, unhealthy_after_s: float) -> dict[str, Any]:
    """How commits are going: ``ok``, ``failing`` (since when, the last error) or ``down`` (failing
    for `unhealthy_after_s`), and the delivery outcomes held until the store takes them."""
    return {
        "status": store_writes_status(w.failing_since, now, unhealthy_after_s),
        "failing_since": iso(w.failing_since),
        "consecutive_failures": w.consecutive,
        "last_error": w.last_error or None,
        "last_error_at": iso(w.last_error_at),
        "outcomes_held": len(w.held),
    }


def _actor(a: ActorState) -> dict[str, Any]:
    report: dict[str, Any] = {"status": "running" if a.running else "stopped", "restarts": a.restarts}
    if a.error:
        report["error"] = a.error
    if a.next_run is not None or a.last_run is not None:
        report.update(last_run=iso(a.last_run), next_run=iso(a.next_run))
    return report


def _json(response: httpx.Response | None) -> Any:
    if response is None:
        return None
    try:
        return response.json()
    except ValueError:
        return None


def _shielded(send: Send) -> Send:
    """`send`, shielded from cancellation. Quart cancels its request nursery as soon as the response is
    sent, which can land while hypercorn, inside that last send, re-arms the connection's keep-alive
    idle timer; the timer dies, and the idle connection then holds a graceful shutdown for the whole
    ``graceful_timeout`` (seen: a SIGTERM after one GET /health took 10 s instead of 0.1 s)."""

    async def send_shielded(message: MutableMapping[str, Any]) -> None:
        with trio.CancelScope(shield=True):
            await send(message)

    return send_shielded


def create_app(rt: Runtime) -> Any:
    """The ASGI callable serving one daemon: ``/webhook`` directly, the rest through Quart."""
    quart = QuartTrio("wacored")
    webhook = Webhook(rt)

    @quart.get("/health")
    async def health() -> tuple[Response, int]:
        status, body = await health_report(rt)
        if rt.siblings.place.siblings and LOCAL_HEADER not in request.headers:
            answers = await rt.siblings.ask("/health")
            body = with_siblings(body, {i: _json(a) for i, a in answers.items()})
            status = 503 if body["status"] == "unhealthy" else 200
        return jsonify(body), status

    @quart.get("/metrics")
    async def metrics() -> Response:
        # A plain route on the daemon's own registry: mounting prometheus_client's ASGI app through
        # the dispatcher breaks Quart's lifespan (docs/stack-notes.md, "Serving").
        accept = request.headers.get("Accept", "")
        if not rt.siblings.place.siblings or LOCAL_HEADER in request.headers:
            body, content_type = rt.metrics.render(accept)
            return Response(body, content_type=content_type)
        # Merged from text expositions: the one format every worker renders the same way.
        answers = await rt.siblings.ask("/metrics")
        own, _ = rt.metrics.render("")
        others = [a.text for a in answers.values() if a is not None and a.status_code == 200]
        body, content_type = merged_exposition(own.decode(), others, accept)
        return Response(body, content_type=content_type)

    admin.install(quart, rt)

    @quart.after_request
    async def add_ids(response: Response) -> Response:
        rid, cid = request_ids({k.lower(): v for k, v in request.headers.items()})
        response.headers["X-Request-ID"] = rid
        response.headers["X-Correlation-ID"] = cid
        if rt.draining:
            response.headers["Connection"] = "close"
        return response

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await quart(scope, receive, send)  # type: ignore[arg-type]
            return
        if not rt.admission.admit(rt.config.server):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            rid, cid = request_ids(headers)
            if scope["path"] == "/webhook" and scope["method"] == "POST":
                rt.ingress_counts.request("over_capacity", OTHER)
            log.warning(
                "request refused at the connection cap",
                extra={"event": "over_capacity", "path": scope["path"], "request_id": rid},
            )
            await refuse_overloaded(send, {"X-Request-ID": rid, "X-Correlation-ID": cid})
            return
        # Counted only when begun before the stop: those may answer without `Connection: close`.
        counted = not rt.draining
        rt.in_flight += counted
        try:
            if scope["path"] == "/webhook":
                await webhook(scope, receive, send)
            else:
                # Quart types the ASGI messages precisely; hypercorn hands us the same objects untyped.
                await quart(scope, receive, _shielded(send))  # type: ignore[arg-type]
        finally:
            rt.in_flight -= counted
            rt.admission.leave()

    return app
