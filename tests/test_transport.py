"""The forwarding lane's HTTP/1.1 transport against real servers on 127.0.0.1 (TLS included)."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import hypercorn.config
import hypercorn.trio
import pytest
import trio
import trustme

from wacored.actors.transport import MAX_BODY, LaneTransport

Handler = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


async def ok_app(scope: dict[str, Any], receive: Any, send: Any, chunks: list[bytes] | None = None) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    while (await receive()).get("more_body"):
        pass
    client = f"{scope['client'][1]}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"x-client-port", client)]})
    for chunk in chunks or [b"ok"]:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def serve(nursery: trio.Nursery, app: Handler = ok_app, scheme: str = "http", **options: Any) -> str:
    hc = hypercorn.config.Config()
    hc.bind = ["127.0.0.1:0"]
    hc.accesslog = None
    hc.graceful_timeout = 0.1
    for name, value in options.items():
        setattr(hc, name, value)
    urls = await nursery.start(partial(hypercorn.trio.serve, app, hc))
    return str(urls[0]).replace("http://", f"{scheme}://")


async def post(transport: LaneTransport, url: str, body: bytes = b"{}") -> httpx.Response:
    response = await transport.handle_async_request(httpx.Request("POST", url, content=body))
    await response.aread()
    return response


async def test_requests_share_one_kept_alive_connection(nursery: trio.Nursery) -> None:
    url = await serve(nursery)
    async with LaneTransport() as transport:
        ports = {(await post(transport, f"{url}/a")).headers["x-client-port"] for _ in range(5)}
    assert len(ports) == 1


async def test_a_connection_the_server_retires_is_replaced(nursery: trio.Nursery) -> None:
    url = await serve(nursery, keep_alive_max_requests=2)
    async with LaneTransport() as transport:
        responses = [await post(transport, f"{url}/a") for _ in range(5)]
    assert [r.status_code for r in responses] == [200] * 5
    assert len({r.headers["x-client-port"] for r in responses}) == 3


async def test_an_idle_connection_the_server_closed_is_not_reused(nursery: trio.Nursery) -> None:
    url = await serve(nursery, keep_alive_timeout=0.05)
    async with LaneTransport() as transport:
        first = await post(transport, f"{url}/a")
        await trio.sleep(0.3)  # the server drops the idle connection meanwhile
        second = await post(transport, f"{url}/a")
    assert second.status_code == 200
    assert first.headers["x-client-port"] != second.headers["x-client-port"]


async def test_a_chunked_body_is_read_whole(nursery: trio.Nursery) -> None:
    url = await serve(nursery, partial(ok_app, chunks=[b"abc", b"def", b"ghi"]))
    async with LaneTransport() as transport:
        response = await post(transport, f"{url}/a")
    assert response.headers.get("transfer-encoding") == "chunked"
    assert response.content == b"abcdefghi"


async def test_a_huge_body_is_cut_and_its_connection_dropped(nursery: trio.Nursery) -> None:
    url = await serve(nursery, partial(ok_app, chunks=[b"x" * 50_000] * 4))
    async with LaneTransport() as transport:
        big = await post(transport, f"{url}/a")
        after = await post(transport, f"{url}/a")
    assert big.content == b"x" * MAX_BODY
    assert after.status_code == 200
    assert big.headers["x-client-port"] != after.headers["x-client-port"]


async def test_nobody_listening_is_a_connect_error() -> None:
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: refused
        async with LaneTransport() as transport:
            with pytest.raises(httpx.ConnectError):
                await post(transport, f"http://127.0.0.1:{port}/a")


async def test_a_server_that_hangs_up_mid_answer_is_a_protocol_error(nursery: trio.Nursery) -> None:
    async def half_answer(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await stream.aclose()

    [listener] = await nursery.start(partial(trio.serve_tcp, half_answer, 0, host="127.0.0.1"))
    port = listener.socket.getsockname()[1]
    async with LaneTransport() as transport:
        with pytest.raises(httpx.RemoteProtocolError):
            await post(transport, f"http://127.0.0.1:{port}/a")


async def test_a_cancelled_request_drops_its_connection(nursery: trio.Nursery) -> None:
    release = trio.Event()

    async def slow(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/slow":
            await release.wait()
        await ok_app(scope, receive, send)

    url = await serve(nursery, slow)
    async with LaneTransport() as transport:
        first = await post(transport, f"{url}/a")
        with trio.move_on_after(0.2):
            await post(transport, f"{url}/slow")
        after = await post(transport, f"{url}/a")
        release.set()
    assert after.status_code == 200
    assert first.headers["x-client-port"] != after.headers["x-client-port"]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_https_with_a_trusted_certificate(nursery: trio.Nursery, ca: trustme.CA, tmp_path: Path) -> None:
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    url = await serve(nursery, scheme="https", certfile=str(tmp_path / "cert.pem"), keyfile=str(tmp_path / "key.pem"))
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    async with LaneTransport(trusted) as transport:
        ports = {(await post(transport, f"{url}/a")).headers["x-client-port"] for _ in range(3)}
    assert len(ports) == 1
    async with LaneTransport(ssl.create_default_context()) as untrusting:
        with pytest.raises(httpx.ConnectError, match="TLS handshake"):
            await post(untrusting, f"{url}/a")
