"""A lean httpx transport for a forwarding lane: one kept-alive HTTP/1.1 connection, h11 on trio.

A lane sends one request at a time to one service, so it needs neither a pool nor httpcore's
generality; on this machine httpx's own transport (httpcore over anyio) cost ~600-750 us of CPU per
forward against ~400 us here, and forwarding shares the daemon's one thread with ingress
(bench/README.md). It is still an `httpx.AsyncBaseTransport`: forwarders speak `httpx.Request` and
`httpx.Response`, and tests swap in `httpx.MockTransport`.

Two ways in: `handle_async_request` (any `httpx.Request`, validated by h11 as it is encoded), and
`post`, the forwarders' hot path, which takes a request head the caller has already encoded and
checked (`targets.Target.head`) and answers a plain `Answer`: no httpx model objects and no per-header
validation per forward (together ~a third of the lane's CPU per forward, bench/README.md "What was
cut"). Both share the connection handling and the reading of the answer below.

What it does: ``http`` and ``https`` (TLS with the given context, SNI and hostname checks); reuses
the connection while both sides allow it, and opens a new one when the server closed it (after its
``keep_alive_max_requests``, an idle timeout, ``Connection: close``), sending a request once more on
a new one when a kept-alive connection breaks before any byte of its answer (`_first_bytes`: the
keep-alive race); reads the whole response body
(up to `MAX_BODY`; past that the rest is dropped with the connection).

Error handling (the httpx tree, so callers classify one way)::

    httpx.TransportError
     +-- httpx.ConnectError        cannot connect, or the TLS handshake failed
     +-- httpx.WriteError          the connection broke while sending
     +-- httpx.ReadError           the connection broke while receiving
     +-- httpx.RemoteProtocolError the server broke HTTP/1.1 (or closed mid-response)

Cancellation:
    Timeouts are the caller's cancel scope (`trio.fail_after` around the attempt); the request's
    ``timeout`` extension is not read. A request cut short closes its connection, whose state is
    then unknown; the next request opens a new one.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import h11
import httpx
import trio

MAX_BODY = 64 * 1024
"""Response bytes kept; a forward only needs the status and an excerpt of an error body."""
RECEIVE_SIZE = 65536

Origin = tuple[str, str, int]
"""(scheme, host, port): what one kept-alive connection is to."""

_STATE_ONLY = (
    h11.Request(method=b"POST", target=b"/", headers=[(b"Host", b"-"), (b"Content-Length", b"0")]),
    h11.EndOfMessage(),
)
"""What `post` tells h11 it sent, so that h11 (which only reads an answer to a request it saw) parses
the answer and keeps the connection's state; the bytes on the wire are the caller's. Only the method
(the answer's framing), the version and the absence of ``Connection: close`` matter to h11 here, and
they are the real request's."""


_SIMPLE_HEAD = re.compile(
    rb"HTTP/1\.1 ([2-5][0-9][0-9])(?: [\t -~]*)?\r\n"
    rb"((?:[-!#$%&'*+.^_`|~0-9A-Za-z]+:[ \t]*(?:[!-~](?:[ \t!-~]*[!-~])?)?[ \t]*\r\n)*)\r\n"
)
"""The head of a plain HTTP/1.1 answer: a strict subset of what h11 accepts (printable ASCII only)."""
_FIELD = re.compile(rb"([^:]+):[ \t]*(.*?)[ \t]*\r\n")
SIMPLE_HEAD_MAX = 16 * 1024
"""h11's default bound on a head (``max_incomplete_event_size``); a longer one goes to h11, which
decides as before."""


def simple_answer(data: bytes) -> Answer | None:
    """`data` as an `Answer` when it is exactly one whole, plain answer (HTTP/1.1, a final status that
    may have a body, exactly one ``Content-Length`` and that many bytes after the head, up to
    `MAX_BODY`, no ``Transfer-Encoding``, no ``Connection`` but ``keep-alive``, printable ASCII head);
    else None, and h11
    reads it. What it accepts h11 reads the same way, and the connection stays reusable after it, so
    h11's state machine (~60 us of CPU per forward on this machine) is only paid for the rest."""
    match = _SIMPLE_HEAD.match(data)
    if match is None or match.end() > SIMPLE_HEAD_MAX:
        return None
    status = int(match[1])
    if status in (204, 304):  # no body whatever Content-Length says: h11's rule
        return None
    headers = tuple((name.lower(), value) for name, value in _FIELD.findall(match[2]))
    length: bytes | None = None
    for name, value in headers:
        if name == b"content-length":
            if length is not None:
                return None
            length = value
        elif name == b"transfer-encoding" or (name == b"connection" and value.lower() != b"keep-alive"):
            # nginx says ``Connection: keep-alive`` on every answer, which changes nothing in HTTP/1.1;
            # any other ``Connection`` (``close``, a list) is h11's to judge.
            return None
    body = data[match.end() :]
    if length is None or not length.isdigit() or int(length) != len(body) or len(body) > MAX_BODY:
        return None
    return Answer(status, headers, body)


@dataclass(frozen=True, slots=True)
class Answer:
    """A service's answer: its status, headers (names lowercased) and up to `MAX_BODY` of its body."""

    status_code: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    http_version: bytes = b"1.1"

    def header(self, name: str) -> str | None:
        """The value of header `name` (lowercase) as httpx's ``Headers.get`` gives it: every value
        joined with ", ", decoded as ASCII, else UTF-8, else Latin-1 (the whole set decides)."""
        key = name.encode("ascii")
        values = [v for k, v in self.headers if k == key]
        if not values:
            return None
        raw = b"".join(k + v for k, v in self.headers)
        for encoding in ("ascii", "utf-8"):
            try:
                raw.decode(encoding)
            except UnicodeDecodeError:
                continue
            break
        else:
            encoding = "iso-8859-1"
        return ", ".join(v.decode(encoding) for v in values)


@dataclass(frozen=True, slots=True)
class Route:
    """A URL as `post` needs it, encoded once: where to connect, and the request line with ``Host``."""

    origin: Origin
    start: bytes


def route_of(url: httpx.URL) -> Route:
    """`url`'s route, the same request line and ``Host`` value httpx would send (its ``netloc``, the
    port only when not the scheme's default). Callers keep it (`targets.Target.route_of`)."""
    return Route(_origin(url), b"POST " + url.raw_path + b" HTTP/1.1\r\nHost: " + url.netloc + b"\r\n")


def _origin(url: httpx.URL) -> Origin:
    return (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))


class _Body(httpx.AsyncByteStream):
    """The response body, already read: httpx must not decode it eagerly (a corrupt gzip body from a
    service must not turn a 2xx into an exception)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._data


class LaneTransport(httpx.AsyncBaseTransport):
    """One HTTP/1.1 connection at a time, to whatever origin the requests name."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self._tls = tls
        self._stream: trio.abc.Stream | None = None
        self._origin: tuple[str, str, int] | None = None
        self._h11 = h11.Connection(h11.CLIENT)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        headers = [(k, v) for k, v in request.headers.raw if k.lower() != b"connection"]
        # A header h11 will not send raises h11's own error here, as it always did: not an httpx error,
        # so the forwarder dead-letters that row alone as ``internal_error`` (tests/test_poison.py).
        events = (
            h11.Request(method=request.method, target=request.url.raw_path, headers=headers),
            h11.Data(data=request.content),
            h11.EndOfMessage(),
        )
        answer = await self._exchange(_origin(request.url), events, None)
        return httpx.Response(
            answer.status_code,
            headers=list(answer.headers),
            stream=_Body(answer.body),
            request=request,
            extensions={"http_version": b"HTTP/" + answer.http_version},
        )

    async def post(self, route: Route, head: bytes, body: bytes) -> Answer:
        """POST `body` to `route` (`route_of` a URL) with the header lines `head` (each ending in CRLF,
        printable ASCII, no ``Host``, ``Content-Length`` nor ``Connection``: the caller has checked
        them, as `targets.Target.head` does). Raises like `handle_async_request`.

        h11 is not told of the request unless the answer needs it: a plain answer that arrives whole
        in one read is taken as it is (`simple_answer`), and h11, still idle, needs no new cycle."""
        request = b"%s%sContent-Length: %d\r\n\r\n%s" % (route.start, head, len(body), body)
        stream, data = await self._first_bytes(route.origin, lambda stream: self._send_all(stream, request))
        try:
            if (answer := simple_answer(data)) is not None:
                return answer
            # Anything else h11 reads, as if it had sent the request (`_STATE_ONLY`).
            for event in _STATE_ONLY:
                self._h11.send(event)
            self._h11.receive_data(data)
            response, kept, complete = await self._receive(stream)
        except BaseException:
            await self._close()
            raise
        return await self._finish(response, kept, complete)

    async def _exchange(self, origin: Origin, events: tuple[h11.Event, ...], data: bytes | None) -> Answer:
        """Send `events` through h11, or `data` as it is when given (h11 then only sees `events`), on
        the connection to `origin`, and read the answer; reuse the connection when both sides allow."""
        stream, first = await self._first_bytes(origin, lambda stream: self._send(stream, events, data))
        try:
            self._h11.receive_data(first)
            response, body, complete = await self._receive(stream)
        except BaseException:
            await self._close()
            raise
        return await self._finish(response, body, complete)

    async def _first_bytes(
        self, origin: Origin, send: Callable[[trio.abc.Stream], Awaitable[None]]
    ) -> tuple[trio.abc.Stream, bytes]:
        """`send` the request on the connection to `origin` and read the first bytes of the answer.

        A kept-alive connection the server closes while the request is on its way (its idle timeout
        firing at that moment: 5 s in Node.js, as long as a lane's idle heartbeat) breaks before any
        byte of an answer: the request is sent once more on a new connection, as HTTP clients do,
        rather than counted as a failed attempt. Once is enough: a new connection that fails so
        raises. The server may have read the request before it closed: the repeat carries the same
        ``Idempotency-Key``, which is at-least-once as every retry is."""
        before = self._stream
        stream = await self._connection(origin)
        try:
            await send(stream)
            data = await self._receive_some(stream)
        except (httpx.WriteError, httpx.ReadError):
            await self._close()
            if stream is not before:
                raise
            data = b""
        except BaseException:
            await self._close()
            raise
        if data or stream is not before:
            return stream, data
        await self._close()  # a kept-alive connection closed under the request: once more, on a new one
        stream = await self._connection(origin)
        try:
            await send(stream)
            return stream, await self._receive_some(stream)
        except BaseException:
            await self._close()
            raise

    async def _finish(self, response: h11.Response, body: bytes, complete: bool) -> Answer:
        """Keep the connection for the next request when both sides allow it, else close it."""
        if complete and self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
        else:
            await self._close()
        return Answer(response.status_code, tuple(response.headers), body, response.http_version)

    async def aclose(self) -> None:
        await self._close()

    async def _connection(self, origin: Origin) -> trio.abc.Stream:
        if self._stream is not None and (origin != self._origin or self._closed_by_peer()):
            await self._close()
        if self._stream is None:
            self._stream = await self._connect(*origin)
            self._origin = origin
        return self._stream

    async def _connect(self, scheme: str, host: str, port: int) -> trio.abc.Stream:
        try:
            tcp = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
        if scheme != "https":
            return tcp
        tls = trio.SSLStream(
            tcp, self._tls or ssl.create_default_context(), server_hostname=host, https_compatible=True
        )
        try:
            await tls.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError) as exc:
            await trio.aclose_forcefully(tls)
            raise httpx.ConnectError(f"TLS handshake with {host}:{port} failed: {exc}") from exc
        return tls

    def _closed_by_peer(self) -> bool:
        # An idle connection that is readable has been closed (or broken) by the server: reusing it
        # would fail the request after sending it.
        stream = self._stream
        while isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        return isinstance(stream, trio.SocketStream) and stream.socket.is_readable()

    async def _send(self, stream: trio.abc.Stream, events: tuple[h11.Event, ...], data: bytes | None) -> None:
        try:
            encoded = b"".join(self._h11.send(event) or b"" for event in events)
        except h11.LocalProtocolError as exc:
            raise httpx.LocalProtocolError(str(exc)) from exc
        await self._send_all(stream, encoded if data is None else data)

    @staticmethod
    async def _send_all(stream: trio.abc.Stream, data: bytes) -> None:
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise httpx.WriteError(f"connection broke while sending: {exc}") from exc

    @staticmethod
    async def _receive_some(stream: trio.abc.Stream) -> bytes:
        try:
            return bytes(await stream.receive_some(RECEIVE_SIZE))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise httpx.ReadError(f"connection broke while receiving: {exc}") from exc

    async def _receive(self, stream: trio.abc.Stream) -> tuple[h11.Response, bytes, bool]:
        """The response, up to `MAX_BODY` of its body, and whether it was read to its end."""
        response: h11.Response | None = None
        body = bytearray()
        while True:
            event = await self._next_event(stream)
            if isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data) and response is not None:
                if len(body) + len(event.data) > MAX_BODY:
                    # Enough kept: the rest goes with the connection.
                    return response, bytes(body + event.data[: MAX_BODY - len(body)]), False
                body += event.data
            elif isinstance(event, h11.EndOfMessage) and response is not None:
                return response, bytes(body), True
            elif isinstance(event, h11.ConnectionClosed):
                raise httpx.RemoteProtocolError("server closed the connection without a response")

    async def _next_event(self, stream: trio.abc.Stream) -> object:
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise httpx.RemoteProtocolError(str(exc)) from exc
            if event is not h11.NEED_DATA:
                return event
            self._h11.receive_data(await self._receive_some(stream))

    async def _close(self) -> None:
        stream, self._stream, self._origin = self._stream, None, None
        self._h11 = h11.Connection(h11.CLIENT)
        if stream is not None:
            await trio.aclose_forcefully(stream)
