"""A lean httpx transport for a forwarding lane: one kept-alive HTTP/1.1 connection, h11 on trio.

A lane sends one request at a time to one service, so it needs neither a pool nor httpcore's
generality; on this machine httpx's own transport (httpcore over anyio) cost ~600-750 us of CPU per
forward against ~400 us here, and forwarding shares the daemon's one thread with ingress
(bench/README.md). It is still an `httpx.AsyncBaseTransport`: forwarders speak `httpx.Request` and
`httpx.Response`, and tests swap in `httpx.MockTransport`.

What it does: ``http`` and ``https`` (TLS with the given context, SNI and hostname checks); reuses
the connection while both sides allow it, and opens a new one when the server closed it (after its
``keep_alive_max_requests``, an idle timeout, ``Connection: close``); reads the whole response body
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

import ssl
from collections.abc import AsyncIterator

import h11
import httpx
import trio

MAX_BODY = 64 * 1024
"""Response bytes kept; a forward only needs the status and an excerpt of an error body."""
RECEIVE_SIZE = 65536


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
        stream = await self._connection(request.url)
        try:
            await self._send(stream, request)
            response, body, complete = await self._receive(stream)
        except BaseException:
            await self._close()
            raise
        if complete and self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
        else:
            await self._close()
        return httpx.Response(
            response.status_code,
            headers=list(response.headers),
            stream=_Body(body),
            request=request,
            extensions={"http_version": b"HTTP/" + response.http_version},
        )

    async def aclose(self) -> None:
        await self._close()

    async def _connection(self, url: httpx.URL) -> trio.abc.Stream:
        origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
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

    async def _send(self, stream: trio.abc.Stream, request: httpx.Request) -> None:
        target = request.url.raw_path
        headers = [(k, v) for k, v in request.headers.raw if k.lower() != b"connection"]
        events = (
            h11.Request(method=request.method, target=target, headers=headers),
            h11.Data(data=request.content),
            h11.EndOfMessage(),
        )
        try:
            data = b"".join(self._h11.send(event) or b"" for event in events)
        except h11.LocalProtocolError as exc:
            raise httpx.LocalProtocolError(str(exc)) from exc
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise httpx.WriteError(f"connection broke while sending: {exc}") from exc

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
            try:
                data = await stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise httpx.ReadError(f"connection broke while receiving: {exc}") from exc
            self._h11.receive_data(bytes(data))

    async def _close(self) -> None:
        stream, self._stream, self._origin = self._stream, None, None
        self._h11 = h11.Connection(h11.CLIENT)
        if stream is not None:
            await trio.aclose_forcefully(stream)
