"""The admin HTTP API under ``/admin/``: the operator's commands (`operations`) over HTTP.

- ``GET /admin/dlq?state=&service=``: dead letters, oldest first (the objects of ``dlq list --json``);
- ``POST /admin/dlq/replay`` ``{"ids": [...]}`` or ``{"all": true, "service": S, "state": "abandoned"}``;
- ``POST /admin/dlq/purge`` ``{"state": "delivered"|"abandoned", "older_than": "7d"}``;
- ``GET /admin/status``: what ``wacored status --json`` prints;
- ``GET /admin/messages?since=&until=&service=&state=&kind=&limit=``: messages, newest first (``messages
  list --json``); ``GET /admin/messages/<key>``: one message and its attempts (``messages show --json``);
- ``POST /admin/messages/replay`` ``{"ids": [...]}`` or ``{"service": S, "since": T, ...}``: queue them
  again, and wake the writer's sweep so the forwarders have them at once.
- ``GET /admin/services``: each service, paused or not, since when, why (``services list --json``);
- ``POST /admin/services/<name>/pause`` ``{"reason": "..."}`` (optional) and ``.../resume``: answered
  once the daemon's pause watcher has read the change (`PauseBoard.refreshed`), every worker's under
  ``[server] processes = N`` (each sibling is asked ``GET /admin/local/pauses``, which reads the
  table before it answers), so no attempt to a paused service starts after the 200.

Under ``[server] processes = N`` a replay also wakes the other workers' DLQ retrier or lanes
(``GET /admin/local/retrier``, ``.../lanes``): the retrier runs in one worker, and each lane is held
by one. Those ``/admin/local/`` routes only exist for a request carrying `LOCAL_HEADER`, as the
siblings' own requests on their private sockets do (and the token, like every admin request).

Every request needs ``Authorization: Bearer <[admin] token>``. With no token configured the API is off
and every ``/admin/`` path answers 404, so its existence is not advertised. The token and the store
(the SQLite file, or the PostgreSQL database of ``[store] url``: `ops.connection.open_ops`) are read
from ``rt.config`` at each request: a reload swaps the config whole.

Error handling:
    No token configured → 404 ``{"error":"not_found"}``; a missing or wrong token → 401
    ``{"error":"unauthorized"}`` (logged, without what was presented); a body over `MAX_BODY` bytes →
    413 ``{"error":"too_large"}``; bad input → 400 ``{"error":"bad_request","detail":...}``: a body that
    is not JSON, nested deeper than `MAX_DEPTH`, an id outside SQLite's 64-bit integers, a pause
    of the Graph API sender or with a reason that is not printable text of at most 200 characters;
    an unknown service → 404 ``{"error":"not_found","detail":...}``; the store
    refusing or unreadable (locked past its busy timeout, missing, a directory, not a database,
    corrupt, a table missing, a newer schema, a value of the wrong type, an OS error, PostgreSQL
    down) → 503
    ``{"error":"store_unavailable","detail":...}``.

Cancellation:
    The store's work runs in a worker thread on a connection of its own (never the writer's, nor the
    shared `Runtime.reader`), so the event loop never waits on it; a cancelled request lets its
    short transaction finish in the thread.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import trio
from quart import Blueprint, Response, jsonify, request
from quart_trio import QuartTrio
from werkzeug.exceptions import RequestEntityTooLarge

from ..config import StoreConfig
from ..ops import messages as msgs
from ..ops import operations as ops
from ..ops import pauses
from ..ops.connection import OpsConnection, open_ops, store_where
from ..runtime import Runtime
from ..siblings import LOCAL_HEADER

log = logging.getLogger(__name__)

T = TypeVar("T")
_REPLAY_KEYS = {"ids", "all", "service", "state"}
_PURGE_KEYS = {"state", "older_than"}
_SELECTION_KEYS = {"since", "until", "service", "state", "kind"}
_MESSAGE_REPLAY_KEYS = {"ids"} | _SELECTION_KEYS
_PAUSE_KEYS = {"reason"}
PAUSE_APPLY_S = 2.0
"""How long a pause or resume waits for the daemon's pause watcher to read it before answering
anyway (the change is stored: the watcher applies it at its next read)."""
MAX_BODY = 1024 * 1024
"""Bytes of an admin request body at most (a replay of a hundred thousand ids fits)."""
MAX_DEPTH = 32
"""JSON nesting at most: the bodies are one object of flat values; `json` recurses per level."""
SQLITE_INT = (-(2**63), 2**63 - 1)
"""The integers SQLite stores: a row id outside them cannot even be looked up."""


class AdminError(Exception):
    """An answer other than 200, with its JSON body."""

    def __init__(self, status: int, error: str, detail: str | None = None) -> None:
        super().__init__(detail or error)
        self.status, self.error, self.detail = status, error, detail

    def response(self) -> tuple[Response, int]:
        body = {"error": self.error, **({"detail": self.detail} if self.detail is not None else {})}
        return jsonify(body), self.status


def _bad_request(detail: str) -> AdminError:
    return AdminError(400, "bad_request", detail)


def install(app: QuartTrio, rt: Runtime) -> None:
    """Serve ``/admin/`` on `app` for the daemon of `rt`."""
    # Quart stops reading a body past this (RequestEntityTooLarge); only admin routes take bodies.
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.register_blueprint(_blueprint(rt))


def _blueprint(rt: Runtime) -> Blueprint:
    bp = Blueprint("admin", __name__, url_prefix="/admin")

    @bp.errorhandler(AdminError)
    async def refused(exc: AdminError) -> tuple[Response, int]:
        return exc.response()

    @bp.before_request
    async def authorize() -> None:
        _authorize(rt.config.admin.token, request.headers.get("Authorization", ""))

    @bp.get("/dlq")
    async def dlq() -> Response:
        state, service = request.args.get("state") or None, request.args.get("service") or None
        if state is not None and state not in ops.STATES:
            raise _bad_request(f"state must be one of {', '.join(ops.STATES)}")
        entries = await _on_store(rt, partial(_listed, state=state, service=service))
        return jsonify(entries)

    @bp.post("/dlq/replay")
    async def replay() -> Response:
        body = _object(await _json_body(), _REPLAY_KEYS)
        result = await _on_store(rt, _replay_request(body, rt.wall_clock()))
        if result["replayed"]:
            rt.wake_retrier()  # due now: the retrier should not wait for its next interval
            await _tell_siblings(rt, "retrier")  # it runs in one worker, maybe another
        return jsonify(result)

    @bp.post("/dlq/purge")
    async def purge() -> Response:
        body = _object(await _json_body(), _PURGE_KEYS)
        state, older_than_s = _purge_request(body)
        count = await _on_store(rt, partial(ops.purge, state=state, older_than_s=older_than_s, now=rt.wall_clock()))
        return jsonify({"purged": count})

    @bp.get("/status")
    async def status() -> Response:
        config = rt.config
        work = partial(
            ops.status, session_ttl_s=config.sessions.ttl_s, now=rt.wall_clock(), path=store_where(config.store)
        )
        return jsonify(await _on_store(rt, work))

    @bp.get("/messages")
    async def messages_list() -> Response:
        sel = _message_selection(request.args.to_dict(), rt.wall_clock(), with_limit=True)
        return jsonify(await _on_store(rt, partial(msgs.list_messages, sel=sel)))

    @bp.get("/messages/<path:key>")
    async def message_show(key: str) -> Response:
        report = await _on_store(rt, partial(msgs.show, key=key))
        if report is None:
            raise AdminError(404, "not_found")
        return jsonify(report)

    @bp.post("/messages/replay")
    async def messages_replay() -> Response:
        body = _object(await _json_body(), _MESSAGE_REPLAY_KEYS)
        result = await _on_store(rt, _message_replay_request(body, rt.wall_clock()))
        if result["replayed"]:
            rt.wake_lanes()  # queued again: their lanes read them now, not at their next idle heartbeat
            await _tell_siblings(rt, "lanes")  # and so do the lanes other workers hold
        return jsonify(result)

    @bp.get("/services")
    async def services() -> Response:
        names = list(rt.config.services)
        return jsonify(await _on_store(rt, partial(pauses.list_services, services=names)))

    @bp.post("/services/<name>/pause")
    async def pause(name: str) -> Response:
        raw = await _json_body(empty={})
        reason = _object(raw, _PAUSE_KEYS).get("reason", "")
        names = list(rt.config.services)
        _check(partial(pauses.check_pause, name, names, reason))
        changed = await _on_store(
            rt, partial(pauses.pause, name=name, services=names, reason=reason, now=rt.wall_clock())
        )
        return jsonify(await _applied(rt, name, changed))

    @bp.post("/services/<name>/resume")
    async def resume(name: str) -> Response:
        _object(await _json_body(empty={}), set())
        names = list(rt.config.services)
        changed = await _on_store(rt, partial(pauses.resume, name=name, services=names))
        return jsonify(await _applied(rt, name, changed))

    @bp.get("/local/<what>")
    async def local(what: str) -> Response:
        """A sibling worker's word after an operator's change (`_tell_siblings`); not an operator's
        route: without `LOCAL_HEADER` it does not exist."""
        if LOCAL_HEADER not in request.headers or what not in LOCAL_CHANGES:
            raise AdminError(404, "not_found")
        if what == "pauses":
            with trio.move_on_after(PAUSE_APPLY_S):
                await rt.pauses.refreshed()
        elif what == "retrier":
            rt.wake_retrier()
        else:
            rt.wake_lanes()
        return jsonify({"ok": True})

    @bp.route("/", defaults={"rest": ""}, methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    @bp.route("/<path:rest>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def unknown(rest: str) -> Response:
        # Only reached once authorized: an unknown path must not answer before the token is checked.
        raise AdminError(404, "not_found")

    return bp


def _authorize(token: str, header: str) -> None:
    """Raise unless `header` is ``Bearer <token>``; with no token the API does not exist."""
    if not token:
        raise AdminError(404, "not_found")
    scheme, _, presented = header.partition(" ")
    # compare_digest: the time taken must not tell how much of a guess was right.
    if scheme.lower() != "bearer" or not secrets.compare_digest(presented.strip().encode(), token.encode()):
        log.warning(
            "admin request refused: missing or wrong bearer token",
            extra={
                "event": "admin_unauthorized",
                "method": request.method,
                "path": request.path,
                "remote": request.remote_addr,
            },
        )
        raise AdminError(401, "unauthorized")


def _check(check: Callable[[], None]) -> None:
    """Run a pure check of the request; what `pauses` refuses becomes a 404 or a 400."""
    try:
        check()
    except pauses.PauseRefused as exc:
        raise _refused(exc) from None


def _refused(exc: pauses.PauseRefused) -> AdminError:
    if isinstance(exc, pauses.UnknownService):
        return AdminError(404, "not_found", str(exc))
    return _bad_request(str(exc))


async def _applied(rt: Runtime, name: str, changed: bool) -> dict[str, Any]:
    """The service's pause state once the daemon's pause watcher has read the store (or after
    `PAUSE_APPLY_S`: the change is stored either way), and whether this request changed it."""
    with trio.move_on_after(PAUSE_APPLY_S) as waited:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rt.pauses.refreshed)
            # Under ``[server] processes = N`` every worker delivers: each must have read the change
            # before the answer, not at its watcher's next poll (a second later).
            nursery.start_soon(_tell_siblings, rt, "pauses")
    if waited.cancelled_caught:
        log.warning(
            "the pause watcher has not read the change yet: it applies at its next read",
            extra={"event": "admin_pause_pending", "service": name},
        )
    log.info(
        "service pause changed by the admin API",
        extra={"event": "admin_pause", "service": name, "paused": name in rt.pauses.paused, "changed": changed},
    )
    return {**pauses.service_state(name, rt.pauses.paused.get(name)), "changed": changed}


def _store_refusals() -> tuple[type[Exception], ...]:
    """The store refusing or unreadable: a 503 (read when caught: see `ops.refusals`)."""
    return (*ops.refusals(), OSError)


LOCAL_CHANGES = ("pauses", "retrier", "lanes")
"""What a worker tells its siblings after an operator's change: read the pauses (answered once read),
wake the DLQ retrier, wake the lanes."""


async def _tell_siblings(rt: Runtime, what: str) -> None:
    """Under ``[server] processes = N``, tell every other worker `what` (``GET /admin/local/WHAT``
    on its private socket) and wait for their answers. Not when this request is itself a sibling's
    (`LOCAL_HEADER`). A sibling that does not answer is being restarted: it reads the pauses before
    its forwarders start, and its retrier and lanes read the store when they start."""
    if rt.siblings.place.siblings and LOCAL_HEADER not in request.headers:
        await rt.siblings.ask(f"/admin/local/{what}", {"Authorization": f"Bearer {rt.config.admin.token}"})


async def _on_store(rt: Runtime, work: Callable[[OpsConnection], T]) -> T:
    """`work` in a worker thread, on a connection of its own to the store of the current config."""
    try:
        return await trio.to_thread.run_sync(_with_connection, rt.config.store, work)
    except pauses.PauseRefused as exc:
        raise _refused(exc) from None
    except _store_refusals() as exc:
        log.warning("admin: store unavailable", extra={"event": "admin_store_error", "error": str(exc)})
        lines = str(exc).strip().splitlines()  # psycopg's run over several lines: the first says what failed
        raise AdminError(503, "store_unavailable", lines[0] if lines else type(exc).__name__) from exc


class UnreadableValue(ops.OperationsError):
    """The store holds a value of a type or range wacored never writes (a hand-edited or damaged file)."""


def _with_connection(store: StoreConfig, work: Callable[[OpsConnection], T]) -> T:
    conn = open_ops(store)
    try:
        return work(conn)
    except (TypeError, ValueError, OverflowError) as exc:
        # The input was validated before any connection opened, so this comes from what was read:
        # the store's fault, not the request's. Logged with its traceback in case it is ours.
        log.exception("admin: unreadable value in the store", extra={"event": "admin_store_unreadable"})
        raise UnreadableValue(f"the store holds a value wacored cannot read ({type(exc).__name__}: {exc})") from exc
    finally:
        conn.close()


def _listed(conn: OpsConnection, *, state: str | None, service: str | None) -> list[dict[str, Any]]:
    """The dead letters as JSON objects, made in the worker thread: an unreadable row is the store's."""
    return [e.to_json() for e in ops.list_dead_letters(conn, state=state, service=service)]


async def _json_body(*, empty: Any = None) -> Any:
    """The request body as JSON: bounded in size (413) and in depth, and valid (400); `empty`, when
    given, stands for a body that is empty or only whitespace."""
    if (request.content_length or 0) > MAX_BODY:
        raise AdminError(413, "too_large", f"a body of at most {MAX_BODY} bytes")
    try:
        raw = await request.get_data(cache=False, as_text=False, parse_form_data=False)
    except RequestEntityTooLarge:  # sent without a Content-Length, and longer than MAX_BODY
        raise AdminError(413, "too_large", f"a body of at most {MAX_BODY} bytes") from None
    assert isinstance(raw, bytes)  # as_text=False
    if empty is not None and not raw.strip():
        return empty
    if json_depth(raw) > MAX_DEPTH:
        raise _bad_request(f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(raw)
    except ValueError:  # not JSON, not UTF-8, or an integer of more digits than Python converts
        raise _bad_request("the body is not valid JSON") from None


def json_depth(raw: bytes) -> int:
    """How deeply `raw`'s arrays and objects nest, counted without parsing (brackets inside strings
    do not count), so a hostile body never reaches the recursive parser."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


def _object(body: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _bad_request("expected a JSON object")
    if extra := sorted(set(body) - allowed):
        raise _bad_request(f"unknown key(s): {', '.join(extra)}")
    return body


def _replay_request(body: dict[str, Any], now: float) -> Callable[[OpsConnection], dict[str, Any]]:
    """The replay that ``{"ids": [...]}`` or ``{"all": true, ...}`` asks for, validated before any
    connection is opened."""
    ids, replay_all = body.get("ids"), body.get("all", False)
    if not isinstance(replay_all, bool):
        raise _bad_request('"all" must be true or false')
    if (ids is None) == (not replay_all):
        raise _bad_request('give "ids" (a list of dead letter ids or wamids) or "all": true')
    if replay_all:
        state, service = body.get("state", "abandoned"), body.get("service")
        if state not in ops.REPLAYABLE:
            raise _bad_request(f'"state" must be one of {", ".join(ops.REPLAYABLE)}')
        if service is not None and not isinstance(service, str):
            raise _bad_request('"service" must be a string')
        return lambda conn: {"replayed": ops.replay_all(conn, now, state=state, service=service)}
    if "state" in body or "service" in body:
        raise _bad_request('"state" and "service" go with "all": true')
    if not isinstance(ids, list) or not ids or not all(_is_id(i) for i in ids):
        raise _bad_request('"ids" must be a non-empty list of dead letter ids (integers) or wamids (strings)')
    if not all(_in_range(i) for i in ids):
        raise _bad_request(f"a dead letter id is an integer from {SQLITE_INT[0]} to {SQLITE_INT[1]}")
    return lambda conn: ops.replay(conn, ids, now).to_json()


def _is_id(value: Any) -> bool:
    # bool is an int in Python, but `true` is not a row id.
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and bool(value.strip()))


def _in_range(ident: int | str) -> bool:
    """Whether a row id (an integer, or the digits `operations.replay` reads as one) fits SQLite."""
    if isinstance(ident, str):
        text = ident.strip()
        if not text.isdigit():
            return True  # a wamid
        if not text.isascii():
            return False  # digits such as "²" that `int` refuses
        ident = int(text) if len(text) <= 20 else SQLITE_INT[1] + 1
    return SQLITE_INT[0] <= ident <= SQLITE_INT[1]


def _message_selection(
    values: dict[str, Any], now: float, *, with_limit: bool, states: tuple[str, ...] = msgs.STATE_FILTERS
) -> msgs.Selection:
    """The `messages.Selection` that query arguments or a body ask for, checked (400 otherwise)."""
    allowed = _SELECTION_KEYS | ({"limit"} if with_limit else set())
    if extra := sorted(set(values) - allowed):
        raise _bad_request(f"unknown parameter(s): {', '.join(extra)}")
    if not all(isinstance(v, str) for v in values.values()):
        raise _bad_request(f"{', '.join(sorted(values))}: must be strings")
    try:
        return msgs.selection(
            now,
            since=values.get("since") or None,
            until=values.get("until") or None,
            service=values.get("service") or None,
            state=values.get("state") or None,
            kind=values.get("kind") or None,
            limit=values.get("limit") or None,
            states=states,
        )
    except ValueError as exc:
        raise _bad_request(str(exc)) from None


def _message_replay_request(body: dict[str, Any], now: float) -> Callable[[OpsConnection], dict[str, Any]]:
    """The replay that ``{"ids": [...]}`` or ``{"service": S, "since": T, ...}`` asks for, validated
    before any connection is opened."""
    ids = body.get("ids")
    filters = {k: v for k, v in body.items() if k != "ids"}
    if ids is not None:
        if filters:
            raise _bad_request('give "ids", or "service" and "since" (not both)')
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i.strip() for i in ids):
            raise _bad_request('"ids" must be a non-empty list of message keys (wamids)')
        keys = [i.strip() for i in ids]
        return lambda conn: msgs.replay(conn, msgs.plan_replay(conn, keys), now).to_json()
    if not (isinstance(filters.get("service"), str) and filters["service"] and filters.get("since")):
        raise _bad_request('give "ids", or "service" and "since" (with "until", "state", "kind" optional)')
    sel = _message_selection(filters, now, with_limit=False, states=msgs.REPLAY_STATES)
    return lambda conn: {"replayed": msgs.replay(conn, msgs.plan_matching(conn, sel), now).replayed}


def _purge_request(body: dict[str, Any]) -> tuple[str, float]:
    state, older_than = body.get("state"), body.get("older_than")
    if state not in ops.PURGEABLE:
        raise _bad_request(f'"state" must be one of {", ".join(ops.PURGEABLE)} (pending entries are never purged)')
    if not isinstance(older_than, str):
        raise _bad_request('"older_than" must be a duration such as "7d", "12h", "30m" or "90s"')
    try:
        return state, ops.parse_duration(older_than)
    except ValueError as exc:
        raise _bad_request(str(exc)) from None
