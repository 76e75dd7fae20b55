"""Fuzzing ``POST /webhook`` of one real daemon: bodies, headers, signatures and framing.

One daemon (hypercorn on 127.0.0.1 port 0, a real SQLite file, the real downstream servers of
conftest.py) serves every example. The test starts it, then runs the hypothesis search in a worker
thread (`trio.to_thread.run_sync`) while the daemon keeps running on the test's trio loop. Each example
is one request written byte by byte over a blocking socket (``Connection: close``), so the strategies
choose everything, ``Content-Length`` and chunking included, and no HTTP client tidies it up.

What is sent: random bytes; the real payloads of tests/fixtures/whatsapp (alone or several in one
batch) with fresh ids, as they are (valid) or mutated (keys deleted, values of the wrong type, huge or
unicode strings, deep nesting, raw JSON tokens such as lone surrogate escapes, NaN, huge numbers,
non-UTF-8 bytes, flipped bytes); signatures correct, missing, garbled, with a wrong prefix, in
uppercase hex, over other bytes or with another secret; odd request, correlation and trace ids.

Properties, per answer: never a 5xx (nothing here makes the store unavailable, so not even 503); JSON
with the contract's shape; ``X-Request-ID``/``X-Correlation-ID`` echoed when well-formed, else new
UUID4s; 413 over the size limit, else 401 unless the signature is exactly Meta's, else 400 for what the
parser refuses, else 200 with the counts of the batch (a valid payload, correctly signed, is always
200). After the run: ``/health`` is healthy with every actor running; the store holds exactly the rows
that 200 answers announced (nothing refused left a row); and every forward that reached a downstream
was one of those, with well-formed ids and trace context whatever the caller sent, and signed with
the service's own secret (never Meta's).

Settings: `derandomize` and no example database, so every run sends the same examples (CI is
deterministic); no deadline, since a request's time is the machine's, not the property's.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import re
import socket
import sqlite3
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wacored.actors.forwarder import Target, attempt, new_transport
from wacored.config import ForwardingConfig
from wacored.core.delivery import Verdict
from wacored.core.whatsapp import PayloadError, parse_webhook, sign

from .conftest import FIXTURES, SECRET, SIGNING_SECRET, Downstream, Received, World, make_config, open_daemon
from .support import RawDownstream, make_delivery, readme_verify

LIMIT = 16 * 1024
"""The fuzzed daemon's ``max_body_bytes``: small, so that huge strings cross it cheaply."""
EXAMPLES = 300
_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_LATENCY = re.compile(r"\d+ms")
_TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01")
_OWS = " \t"
"""HTTP strips this whitespace around header values before the application sees them."""

TEMPLATES = {p.name: json.loads(p.read_bytes()) for p in sorted(FIXTURES.glob("*.json"))}


# --- payloads -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """A JSON token written as is into the serialized body (JSON itself cannot express it)."""

    token: bytes


DEPTHS = st.sampled_from([2, 64, 500, 900, 1000, 5000, 50_000])
"""Nesting depths around Python's recursion limit (1000), which its json parser and writer obey."""
RAW_TOKENS = st.sampled_from(
    [
        b'"\\ud800"',
        b'"x\\udfffy"',
        b'"\\ud83d"',  # lone surrogate escapes
        b'"\xed\xa0\x80"',  # a surrogate in UTF-8 bytes (CESU-8)
        b'"\xff\xfe bad utf-8"',
        b'"\xc3"',  # not UTF-8
        b"NaN",
        b"-Infinity",
        b"1e999",
        b"-0",
        b"9" * 5000,  # numbers JSON parsers disagree on
        b'"\\u0000"',
        b"{}",
        b"[]",
        b"null",
        b'""',
    ]
) | DEPTHS.map(lambda n: b"[" * n + b"]" * n)  # deep nesting

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.integers(0, 3 * LIMIT).map(lambda n: "x" * n)
)
JUNK = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _nested(depth: int, leaf: Any) -> Raw:
    """`leaf` inside `depth` arrays and objects, as bytes: Python's own json would refuse to write it."""
    opening = b"".join(b"[" if i % 2 else b'{"n":' for i in range(depth))
    closing = b"".join(b"]" if i % 2 else b"}" for i in reversed(range(depth)))
    return Raw(opening + json.dumps(leaf).encode() + closing)


MUTATIONS = {
    "delete": st.none(),
    "junk": JUNK,
    "raw": RAW_TOKENS.map(Raw),
    "nest": st.tuples(DEPTHS, SCALARS).map(lambda t: _nested(*t)),
}


def _paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON document, the root's children first."""
    found = [path] if path else []
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        found += _paths(child, (*path, key))
    return found


def _parent(doc: Any, path: tuple[Any, ...]) -> Any:
    for key in path[:-1]:
        doc = doc[key]
    return doc


@st.composite
def templates(draw: st.DrawFn) -> Any:
    """One real payload, or several fixtures' entries in one batch (a duplicate wamid included, sometimes)."""
    names = draw(st.lists(st.sampled_from(sorted(TEMPLATES)), min_size=1, max_size=4))
    doc = copy.deepcopy(TEMPLATES[names[0]])
    for name in names[1:]:
        doc["entry"] += copy.deepcopy(TEMPLATES[name]["entry"])
    return doc


@st.composite
def mutated(draw: st.DrawFn) -> Any:
    """A real payload after 1-4 mutations (delete, junk of any type, an odd token, deep nesting), or junk."""
    doc = draw(templates())
    for _ in range(draw(st.integers(1, 4))):
        paths = _paths(doc)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = _parent(doc, path)
        kind = draw(st.sampled_from(sorted(MUTATIONS)))
        if kind == "delete":
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(MUTATIONS[kind])
    return draw(JUNK) if draw(st.integers(0, 19)) == 0 else doc


@st.composite
def tainted(draw: st.DrawFn) -> Any:
    """A real payload with one value replaced by an odd JSON token: the parser's deepest paths."""
    doc = draw(templates())
    path = draw(st.sampled_from(_paths(doc)))
    _parent(doc, path)[path[-1]] = draw(RAW_TOKENS.map(Raw))
    return doc


@dataclass(frozen=True)
class Payload:
    doc: Any
    """A JSON document that may hold `Raw` tokens; ids are made unique when it is sent."""
    valid: bool
    ensure_ascii: bool
    indent: int | None
    flips: tuple[tuple[float, int], ...] = ()
    """Bytes overwritten after serialization: (position as a fraction of the length, new byte)."""


def serialize(doc: Any, payload: Payload) -> bytes:
    tokens: list[bytes] = []

    def hide(node: Any) -> Any:
        if isinstance(node, Raw):
            tokens.append(node.token)
            return f"\x00RAW{len(tokens) - 1}\x00"
        if isinstance(node, dict):
            return {k: hide(v) for k, v in node.items()}
        if isinstance(node, list):
            return [hide(v) for v in node]
        return node

    body = json.dumps(hide(doc), ensure_ascii=payload.ensure_ascii, indent=payload.indent).encode(
        "utf-8", "surrogatepass"
    )
    for i, token in enumerate(tokens):
        body = body.replace(f'"\\u0000RAW{i}\\u0000"'.encode(), token)
    data = bytearray(body)
    for where, byte in payload.flips:
        if data:
            data[min(len(data) - 1, int(where * len(data)))] = byte
    return bytes(data)


FORMAT = {"ensure_ascii": st.booleans(), "indent": st.none() | st.just(2)}
FLIPS = st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=3).map(tuple)
ODD_IDS = st.text(max_size=40) | st.sampled_from(
    [
        "wamid.café",
        "wamid.\x00",
        "wamid.\r\nX-Injected: 1",
        "wamid with space",
        "w" * 300,
        "status:wamid.X:read",
        "wamid.\u2028",
        "wamid.\x7f",
        "\ufeffwamid",
        "wamid.%0d%0a",
    ]
)
"""Ids that must either be refused at parse time or go out as a header unchanged."""


@st.composite
def odd_ids(draw: st.DrawFn) -> Any:
    """A real payload whose updates' ids (and statuses' values) are odd strings."""
    doc = draw(templates())
    for entry in doc["entry"]:
        for change in entry.get("changes", []):
            for kind in ("messages", "statuses"):
                for update in change.get("value", {}).get(kind, []):
                    update["id"] = draw(ODD_IDS)
                    if kind == "statuses" and draw(st.booleans()):
                        update["status"] = draw(ODD_IDS)
    return doc


PAYLOADS = st.sampled_from(["valid", "valid", "mutated", "tainted", "odd_ids"]).flatmap(
    lambda kind: {
        "valid": st.builds(Payload, doc=templates(), valid=st.just(True), **FORMAT),
        "mutated": st.builds(Payload, doc=mutated(), valid=st.just(False), flips=FLIPS, **FORMAT),
        "tainted": st.builds(Payload, doc=tainted(), valid=st.just(False), **FORMAT),
        "odd_ids": st.builds(Payload, doc=odd_ids(), valid=st.just(False), **FORMAT),
    }[kind]
)


def fresh_ids(doc: Any, tag: str) -> Any:
    """`doc` with every string id of a message or status made unique to this example."""
    doc = copy.deepcopy(doc)
    for entry in doc.get("entry", []) if isinstance(doc, dict) and isinstance(doc.get("entry"), list) else []:
        changes = entry.get("changes") if isinstance(entry, dict) else None
        for change in changes if isinstance(changes, list) else []:
            value = change.get("value") if isinstance(change, dict) else None
            for kind in ("messages", "statuses"):
                updates = value.get(kind) if isinstance(value, dict) else None
                for update in updates if isinstance(updates, list) else []:
                    if isinstance(update, dict) and isinstance(update.get("id"), str):
                        update["id"] = f"{update['id']}.{tag}"
    return doc


# --- requests -------------------------------------------------------------------------------------

HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=160)
IDS = st.none() | HEADER_TEXT | st.from_regex(_ID, fullmatch=True) | st.just("x" * 129) | st.uuids().map(str)
TRACEPARENTS = (
    st.none()
    | HEADER_TEXT
    | st.sampled_from(
        [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-x-y-z",
        ]
    )
)
SIGNATURES = st.just("correct") | st.sampled_from(
    [  # half of them right, to reach the parser
        "missing",
        "empty",
        "garbled",
        "prefix",
        "uppercase",
        "other_bytes",
        "other_secret",
        "truncated",
        "extended",
        "padded",
        "non_ascii",
    ]
)
FRAMINGS = st.sampled_from(["length", "zero_padded", "chunked", "declared_over", "short", "truncated"])


@dataclass(frozen=True)
class Probe:
    payload: Payload | bytes
    signature: str
    garbled: str
    prefix: str
    framing: str
    chunks: tuple[int, ...]
    cut: int
    request_id: str | None
    correlation_id: str | None
    traceparent: str | None


PROBES = st.builds(
    Probe,
    payload=st.integers(0, 3).flatmap(lambda i: st.binary(max_size=2048) if i == 0 else PAYLOADS),
    signature=SIGNATURES,
    garbled=HEADER_TEXT,
    prefix=st.sampled_from(["sha1=", "SHA256=", "sha256:", "sha256 =", "", "sha512=", "sha256=sha256="]),
    framing=FRAMINGS,
    chunks=st.lists(st.integers(1, 5000), max_size=6).map(tuple),
    cut=st.integers(1, 64),
    request_id=IDS,
    correlation_id=IDS,
    traceparent=TRACEPARENTS,
)


def signature_header(probe: Probe, body: bytes) -> str | None:
    right = sign(SECRET, body)
    return {
        "correct": right,
        "missing": None,
        "empty": "",
        "garbled": probe.garbled,
        "prefix": probe.prefix + right.removeprefix("sha256="),
        "uppercase": "sha256=" + right[7:].upper(),
        "other_bytes": sign(SECRET, body + b" "),
        "other_secret": sign(SECRET + "x", body),
        "truncated": right[:-1],
        "extended": right + "0",
        "padded": f" \t{right} ",
        "non_ascii": right[:-2] + "\u00e9" + probe.garbled,
    }[probe.signature]


@dataclass(frozen=True)
class Request:
    raw: bytes
    read: bytes | None
    """The body bytes the daemon reads; None when it must refuse without reading (declared too long)."""
    answered: bool
    """False when the request never completes (the caller stops sending mid-body): no answer is owed."""


def body_read(probe: Probe, body: bytes) -> bytes:
    """The bytes the daemon takes as the body: a short ``Content-Length`` leaves the rest unread."""
    return body[: len(body) - probe.cut] if probe.framing == "short" and len(body) > probe.cut else body


def frame(probe: Probe, body: bytes, headers: list[tuple[str, str]]) -> Request:
    read = body_read(probe, body)
    if read != body:
        # What the short Content-Length leaves over is a second, pipelined request (garbage, which the
        # server refuses after answering the first; a close-delimited request may not be followed by
        # more bytes at all). The blank line ends the garbage's head so that nobody waits for more.
        head = "POST /webhook HTTP/1.1\r\nHost: fuzz\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
        return Request(enc(head + f"Content-Length: {len(read)}\r\n\r\n") + body + b"\r\n\r\n", read, True)
    head = "POST /webhook HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers)
    if probe.framing == "chunked":
        parts, rest = [], body
        for size in probe.chunks:
            parts.append(rest[:size])
            rest = rest[size:]
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in [*parts, rest] if p) + b"0\r\n\r\n"
        return Request(enc(head + "Transfer-Encoding: chunked\r\n\r\n") + chunked, body, True)
    declared = LIMIT + probe.cut if probe.framing == "declared_over" else len(read)
    if probe.framing == "truncated" and body and len(body) + probe.cut <= LIMIT:
        # Declares more than it sends, then stops sending: the daemon sees the caller leave mid-body.
        return Request(enc(head + f"Content-Length: {len(body) + probe.cut}\r\n\r\n") + body, body, False)
    length = f"000{declared}" if probe.framing == "zero_padded" else str(declared)
    if declared > LIMIT:
        # Refused before the body is read: sending it would only race the daemon's close.
        return Request(enc(head + f"Content-Length: {length}\r\n\r\n"), None, True)
    return Request(enc(head + f"Content-Length: {length}\r\n\r\n") + body, body, True)


def enc(text: str) -> bytes:
    return text.encode("latin-1")


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def exchange(address: tuple[str, int], request: Request) -> Answer | None:
    """Send the request and read until the connection ends; the first answer (None: no answer at all).

    A daemon that answers before reading all of a chunked body (413) closes with bytes unread, which
    resets the connection: the answer it sent first is still read.
    """
    data = b""
    with socket.create_connection(address, timeout=10) as sock:
        try:
            sock.sendall(request.raw)
            if not request.answered:
                sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                data += chunk
        except (BrokenPipeError, ConnectionResetError):
            with contextlib.suppress(OSError):
                while chunk := sock.recv(65536):
                    data += chunk
    if not data:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return Answer(int(status_line.split()[1]), headers, body[: int(headers.get("content-length", len(body)))])


# --- the oracle -----------------------------------------------------------------------------------


@dataclass
class Ledger:
    """What the run sent and was told, for the checks after it."""

    tags: itertools.count[int] = field(default_factory=itertools.count)
    examples: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    stored: set[tuple[str, str]] = field(default_factory=set)
    """(kind, key) of what 200 answers said was stored: routed messages, and the status updates of their
    batch (each kind dedupes in its own namespace)."""


def check_ids(answer: Answer, name: str, sent: str | None) -> None:
    value = answer.headers[name]
    given = (sent or "").strip(_OWS)
    if _ID.fullmatch(given):
        assert value == given, (name, sent, value)
    else:
        assert uuid.UUID(value).version == 4, (name, sent, value)


def expect(answer: Answer, read: bytes | None, signature: str | None, valid: bool, ledger: Ledger) -> None:
    """The contract's answer to a request whose body, as the daemon reads it, is `read`."""
    doc = json.loads(answer.body)
    assert isinstance(doc, dict)
    if read is None or len(read) > LIMIT:
        assert (answer.status, doc["error"]) == (413, "payload_too_large"), (answer.status, doc)
        return
    if signature is None or signature.strip(_OWS) != sign(SECRET, read):
        assert (answer.status, doc) == (401, {"error": "unauthorized"})
        return
    try:
        batch = parse_webhook(read)
    except PayloadError:
        assert not valid
        assert answer.status == 400, (answer.status, doc)
        assert doc["error"] == "bad_request", doc
        assert isinstance(doc["detail"], str), doc
        assert doc["detail"], doc
        return
    assert answer.status == 200, (answer.status, doc)
    assert set(doc) == {"accepted", "duplicates", "statuses", "routes"}, doc
    assert doc["accepted"] + doc["duplicates"] == len(batch.messages)
    assert doc["statuses"] == len(batch.statuses)
    assert [r["message_id"] for r in doc["routes"]] == list(
        dict.fromkeys(m.wamid for m in batch.messages if ("message", m.wamid) not in ledger.stored)
    )
    ledger.stored.update(("message", r["message_id"]) for r in doc["routes"])
    ledger.stored.update(("status", f"status:{s.key}") for s in batch.statuses)


def run_probe(address: tuple[str, int], probe: Probe, ledger: Ledger) -> None:
    payload = probe.payload
    if isinstance(payload, Payload):
        body, valid = serialize(fresh_ids(payload.doc, f"F{next(ledger.tags)}"), payload), payload.valid
    else:
        body, valid = payload, False
    read = body_read(probe, body)
    signature = signature_header(probe, read)
    headers = [("Content-Type", "application/json")]
    for name, value in (
        ("X-Hub-Signature-256", signature),
        ("X-Request-ID", probe.request_id),
        ("X-Correlation-ID", probe.correlation_id),
        ("traceparent", probe.traceparent),
    ):
        if value is not None:
            headers.append((name, value))
    request = frame(probe, body, headers)
    answer = exchange(address, request)
    ledger.examples += 1
    if not request.answered:
        # The caller stopped sending mid-body: ingress is told it left and answers nothing; hypercorn
        # may still write its own bodiless 400 to the half-closed connection. Either way nothing is stored.
        assert answer is None or (answer.status, answer.body) == (400, b""), answer
        return
    assert answer is not None, "the daemon closed the connection without an answer"
    ledger.statuses[answer.status] = ledger.statuses.get(answer.status, 0) + 1
    assert answer.status < 500, (answer.status, answer.body[:300])
    assert answer.headers["content-type"] == "application/json"
    assert _LATENCY.fullmatch(answer.headers["x-wa-core-latency"])
    check_ids(answer, "x-request-id", probe.request_id)
    check_ids(answer, "x-correlation-id", probe.correlation_id)
    expect(answer, request.read, signature, valid and read == body, ledger)


def check_forwards(received: list[Received], stored: set[tuple[str, str]], *, signed: bool) -> None:
    verify = readme_verify()
    """What reached the downstreams: only stored updates, with fresh well-formed ids and trace context
    whatever the callers sent, and (to services) Meta's signature over the forwarded bytes."""
    for got in received:
        h = got.headers
        assert h["idempotency-key"] in {key for _, key in stored}, h
        assert _TRACEPARENT.fullmatch(h["traceparent"]), h
        assert _ID.fullmatch(h["x-request-id"]), h
        assert _ID.fullmatch(h["x-correlation-id"]), h
        assert not signed or verify(SIGNING_SECRET, h, got.body), h
        assert "x-hub-signature-256" not in h, h  # Meta's app secret never leaves wacored


def store_keys(path: Path) -> set[tuple[str, str]]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {(kind, key) for (kind, key) in db.execute("SELECT kind, key FROM messages")}
    finally:
        db.close()


async def test_fuzzed_webhooks_never_break_the_daemon(tmp_path: Path, services: Downstream, graph: Downstream) -> None:
    config = make_config(
        tmp_path,
        services,
        graph,
        server={"max_body_bytes": LIMIT},
        ratelimit={"per_sender": 1_000_000},
        routing={"statuses": "wallet"},
    )
    ledger = Ledger()
    async with open_daemon(config) as daemon:
        host, port = daemon.url.removeprefix("http://").rsplit(":", 1)

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(probe=PROBES)
        def fuzz(probe: Probe) -> None:
            run_probe((host, int(port)), probe, ledger)

        await trio.to_thread.run_sync(fuzz)
        health = await daemon.client.get(f"{daemon.url}/health")
        assert health.status_code == 200
        assert health.json()["status"] == "healthy"
        assert {a["status"] for a in health.json()["checks"]["actors"].values()} == {"running"}
        check_forwards(services.received, ledger.stored, signed=True)
        check_forwards(graph.received, ledger.stored, signed=False)
    assert ledger.examples >= EXAMPLES
    assert {200, 400, 401, 413} <= set(ledger.statuses), ledger.statuses
    assert store_keys(tmp_path / "wacored.db") == ledger.stored


# --- what the fuzzer found, reduced ---------------------------------------------------------------

TEXT = (FIXTURES / "msg_text.json").read_bytes()


def _replace(old: bytes, new: bytes) -> bytes:
    assert TEXT.count(old) == 1, old
    return TEXT.replace(old, new)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(_replace(b'"Body Text"', b'"\\ud800"'), id="text-lone-surrogate-escape"),
        pytest.param(_replace(b'"Body Text"', b'"\xed\xa0\x80"'), id="text-surrogate-utf8-bytes"),
        pytest.param(_replace(b'"wamid.xyzxyz"', b'"wamid.\\udfff"'), id="wamid-lone-surrogate"),
        pytest.param(_replace(b'"from": "972987654321"', b'"from": "97298\\ud83d"'), id="sender-lone-surrogate"),
        pytest.param(_replace(b'"1234567890987654321"', b'"\\ud800"'), id="entry-id-lone-surrogate"),
    ],
)
async def test_a_signed_payload_with_a_lone_surrogate_is_not_a_server_error(world: World, body: bytes) -> None:
    # Python's json accepts an unpaired surrogate escape (and, from bytes, its UTF-8-style encoding),
    # but the str it gives cannot be encoded back to UTF-8.
    r = await world.daemon.post(body)
    assert r.status_code in (200, 400), (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"
    health = (await world.daemon.client.get(f"{world.daemon.url}/health")).json()
    assert health["status"] == "healthy"


async def test_a_signed_deeply_nested_body_is_a_bad_request(world: World) -> None:
    # json.loads raises RecursionError (not ValueError) past ~1000 levels of nesting.
    body = _replace(b'"Body Text"', b"[" * 5000 + b"]" * 5000)
    r = await world.daemon.post(body)
    assert r.status_code == 400, (r.status_code, r.text)
    assert r.json()["error"] == "bad_request"


# --- a downstream that answers anything -----------------------------------------------------------

_DIGIT_RUN = re.compile(r"\d{8,}")
ANSWER_STATUSES = st.integers(100, 999) | st.sampled_from([200, 204, 304, 400, 404, 408, 429, 500, 503])
HEADER_VALUES = st.binary(max_size=64).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")) | st.sampled_from(
    [
        b"text/plain; charset=base64",
        b"text/plain; charset=utf-16",
        b"text/html; charset=no-such",
        b"; charset=",
        b'application/json; charset="rot13"',
        b"gzip",
        b"br, gzip",
        b"deflate",
        b"chunked",
        b"close",
        b"\xff\xfe",
        b"12",
        b"-1",
        b"99999999999999999999",
        b"Wed, 21 Oct 2015 07:28:00 GMT",
        b"x" * 20_000,
    ]
)
ANSWER_HEADERS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                b"Content-Type",
                b"Content-Encoding",
                b"Retry-After",
                b"Connection",
                b"X-Odd",
                b"Content-Language",
            ]
        ),
        HEADER_VALUES,
    ),
    max_size=4,
)
ANSWER_BODIES = (
    st.binary(max_size=2048)
    | st.sampled_from(
        [
            b"",
            b"\x1f\x8b\x08\x00corrupt gzip",
            "refused 250788123456 \u2028\u202e".encode(),
            b"\x00" * 300,
        ]
    )
    | st.integers(0, 200_000).map(lambda n: b"9" * n)
)
ANSWER_FRAMINGS = st.sampled_from(["length", "close", "short", "chunked", "bad_chunked"])


@st.composite
def answers(draw: st.DrawFn) -> bytes:
    """Whatever a downstream may send back: any status, odd headers, any body, any framing."""
    status, headers, body = draw(ANSWER_STATUSES), draw(ANSWER_HEADERS), draw(ANSWER_BODIES)
    framing = draw(ANSWER_FRAMINGS)
    head = b"HTTP/1.1 %d Whatever\r\n" % status + b"".join(k + b": " + v + b"\r\n" for k, v in headers)
    if framing == "length":
        return head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    if framing == "short":
        return head + b"Content-Length: %d\r\n\r\n" % (len(body) + 10) + body
    if framing == "chunked":
        return head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    if framing == "bad_chunked":
        return head + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n" + body
    return head + b"\r\n" + body


async def test_a_downstream_answering_anything_never_breaks_a_lane(nursery: trio.Nursery) -> None:
    """One lane's real transport against a raw TCP server sending hypothesis's answers: every attempt
    is classified (never raises), and what it keeps of the answer is bounded, printable, masked text."""
    current = [b""]
    server = await RawDownstream(lambda _: current[0]).start(nursery)
    target = Target(name="rides", url=f"{server.url}/rides", forwarding=ForwardingConfig(timeout_ms=2000))
    d = make_delivery(key="wamid.FUZZ")
    seen: dict[str, int] = {}
    async with new_transport() as transport:

        @settings(
            max_examples=200,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(answer=answers())
        def fuzz(answer: bytes) -> None:
            current[0] = answer
            result = trio.from_thread.run(attempt, transport, target, d)
            seen[result.verdict.value] = seen.get(result.verdict.value, 0) + 1
            assert result.error.isprintable(), result.error
            assert len(result.error) <= 260, result.error
            assert not _DIGIT_RUN.search(result.error), result.error
            if result.verdict is Verdict.DELIVERED:
                assert result.status_code is not None
                assert 200 <= result.status_code < 300

        await trio.to_thread.run_sync(fuzz)
        current[0] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
        assert (await attempt(transport, target, d)).verdict is Verdict.DELIVERED
    assert set(seen) == {"delivered", "transient", "permanent"}, seen
