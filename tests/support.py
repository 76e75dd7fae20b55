"""Helpers shared by several test modules: raw HTTP/1.1 over trio sockets, for what httpx will not do
(a body that stalls or trickles, a connection held open on purpose), and waiting on /health."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import trio

from .conftest import Daemon

POLL_S = 0.01


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool
    """The server closed the connection after the answer."""

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class RawConnection:
    """One HTTP/1.1 connection to the daemon, driven by hand."""

    stream: trio.SocketStream
    buffered: bytearray = field(default_factory=bytearray)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _more(self) -> bytes:
        try:
            return bytes(await self.stream.receive_some(65536))
        except trio.BrokenResourceError:  # reset by the server after it answered and closed
            return b""

    async def response(self) -> RawResponse:
        """Read one whole answer (bodies have a Content-Length here), and whether the server closed."""
        while b"\r\n\r\n" not in self.buffered:
            chunk = await self._more()
            if not chunk:
                raise AssertionError(f"connection closed before an answer: {bytes(self.buffered)!r}")
            self.buffered += chunk
        head, _, rest = bytes(self.buffered).partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
        length = int(headers.get("content-length", "0"))
        body = bytearray(rest)
        while len(body) < length:
            chunk = await self._more()
            if not chunk:
                break
            body += chunk
        self.buffered = bytearray(body[length:])
        closed = headers.get("connection", "").lower() == "close" and await self._more() == b""
        return RawResponse(int(status_line.split()[1]), headers, bytes(body[:length]), closed)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def connect(daemon: Daemon) -> RawConnection:
    url = urlsplit(daemon.url)
    assert url.hostname == "127.0.0.1"
    assert url.port is not None
    return RawConnection(await trio.open_tcp_stream(url.hostname, url.port))


def post_head(content_length: int, headers: dict[str, str] | None = None, path: str = "/webhook") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
             f"Content-Length: {content_length}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def open_stalled(daemon: Daemon, content_length: int, sent: bytes) -> RawConnection:
    """A webhook POST declaring `content_length` bytes that sends only `sent`, then nothing."""
    conn = await connect(daemon)
    await conn.send(post_head(content_length) + sent)
    return conn


async def health(daemon: Daemon) -> dict[str, Any]:
    r = await daemon.client.get(f"{daemon.url}/health")
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def wait_for_health(daemon: Daemon, ready: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Poll /health until `ready(body)` (the caller bounds the wait with `trio.fail_after`)."""
    while not ready(body := await health(daemon)):  # noqa: ASYNC110 -- state seen over HTTP, as a caller sees it
        await trio.sleep(POLL_S)
    return body
