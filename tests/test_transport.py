"""The forwarding lane's HTTP/1.1 transport against real servers on 127.0.0.1 (TLS included)."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, cast

import h11
import httpx
import hypercorn.config
import hypercorn.trio
import pytest
import trio
import trustme

from wacored.actors.targets import Target
from wacored.actors.transport import MAX_BODY, LaneTransport, route_of, simple_answer
from wacored.config import ForwardingConfig

from .conftest import SIGNING_SECRET
from .support import RawDownstream, http_answer, make_delivery

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


Post = Callable[[LaneTransport, str], Awaitable[httpx.Response]]


async def via_request(transport: LaneTransport, url: str) -> httpx.Response:
    response = await transport.handle_async_request(httpx.Request("POST", url, content=b"{}"))
    await response.aread()
    return response


async def via_post(transport: LaneTransport, url: str) -> httpx.Response:
    """The forwarders' way in: a pre-encoded head (`LaneTransport.post`), its `Answer` as a response."""
    answer = await transport.post(route_of(httpx.URL(url)), b"Content-Type: application/json\r\n", b"{}")
    return httpx.Response(answer.status_code, headers=list(answer.headers), content=answer.body)


@pytest.fixture(params=[via_request, via_post], ids=["handle_async_request", "post"])
def post(request: pytest.FixtureRequest) -> Post:
    """Both ways into the transport: they share its connection handling and its reading of answers."""
    return cast(Post, request.param)


async def test_requests_share_one_kept_alive_connection(nursery: trio.Nursery, post: Post) -> None:
    url = await serve(nursery)
    async with LaneTransport() as transport:
        ports = {(await post(transport, f"{url}/a")).headers["x-client-port"] for _ in range(5)}
    assert len(ports) == 1


async def test_a_connection_the_server_retires_is_replaced(nursery: trio.Nursery, post: Post) -> None:
    url = await serve(nursery, keep_alive_max_requests=2)
    async with LaneTransport() as transport:
        responses = [await post(transport, f"{url}/a") for _ in range(5)]
    assert [r.status_code for r in responses] == [200] * 5
    assert len({r.headers["x-client-port"] for r in responses}) == 3


async def test_an_idle_connection_the_server_closed_is_not_reused(nursery: trio.Nursery, post: Post) -> None:
    url = await serve(nursery, keep_alive_timeout=0.05)
    async with LaneTransport() as transport:
        first = await post(transport, f"{url}/a")
        await trio.sleep(0.3)  # the server drops the idle connection meanwhile
        second = await post(transport, f"{url}/a")
    assert second.status_code == 200
    assert first.headers["x-client-port"] != second.headers["x-client-port"]


async def test_a_request_on_a_connection_the_server_closes_meanwhile_goes_once_more_on_a_new_one(
    nursery: trio.Nursery, post: Post
) -> None:
    """The keep-alive race: the server's idle timeout closes the connection while the request is on
    its way (after the transport checked it was still open). No byte of an answer came: the request
    goes once more on a new connection instead of failing the attempt."""
    connections: list[int] = []

    async def answers_once(stream: trio.SocketStream) -> None:
        connections.append(len(connections))
        await stream.receive_some(65536)
        await stream.send_all(http_answer(200, [], b"ok"))
        await stream.receive_some(65536)  # the next request: read, then hung up on without an answer
        await stream.aclose()

    [listener] = await nursery.start(partial(trio.serve_tcp, answers_once, 0, host="127.0.0.1"))
    url = f"http://127.0.0.1:{listener.socket.getsockname()[1]}/a"
    async with LaneTransport() as transport:
        assert (await post(transport, url)).status_code == 200
        assert (await post(transport, url)).status_code == 200  # its first connection hung up: a second
    assert connections == [0, 1]


async def test_a_new_connection_closed_without_an_answer_is_not_tried_again(nursery: trio.Nursery, post: Post) -> None:
    connections: list[int] = []

    async def hangs_up(stream: trio.SocketStream) -> None:
        connections.append(len(connections))
        await stream.receive_some(65536)
        await stream.aclose()

    [listener] = await nursery.start(partial(trio.serve_tcp, hangs_up, 0, host="127.0.0.1"))
    async with LaneTransport() as transport:
        with pytest.raises(httpx.TransportError):
            await post(transport, f"http://127.0.0.1:{listener.socket.getsockname()[1]}/a")
    assert connections == [0]


async def test_a_chunked_body_is_read_whole(nursery: trio.Nursery, post: Post) -> None:
    url = await serve(nursery, partial(ok_app, chunks=[b"abc", b"def", b"ghi"]))
    async with LaneTransport() as transport:
        response = await post(transport, f"{url}/a")
    assert response.headers.get("transfer-encoding") == "chunked"
    assert response.content == b"abcdefghi"


async def test_a_huge_body_is_cut_and_its_connection_dropped(nursery: trio.Nursery, post: Post) -> None:
    url = await serve(nursery, partial(ok_app, chunks=[b"x" * 50_000] * 4))
    async with LaneTransport() as transport:
        big = await post(transport, f"{url}/a")
        after = await post(transport, f"{url}/a")
    assert big.content == b"x" * MAX_BODY
    assert after.status_code == 200
    assert big.headers["x-client-port"] != after.headers["x-client-port"]


async def test_nobody_listening_is_a_connect_error(post: Post) -> None:
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: refused
        async with LaneTransport() as transport:
            with pytest.raises(httpx.ConnectError):
                await post(transport, f"http://127.0.0.1:{port}/a")


async def test_a_server_that_hangs_up_mid_answer_is_a_protocol_error(nursery: trio.Nursery, post: Post) -> None:
    async def half_answer(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await stream.aclose()

    [listener] = await nursery.start(partial(trio.serve_tcp, half_answer, 0, host="127.0.0.1"))
    port = listener.socket.getsockname()[1]
    async with LaneTransport() as transport:
        with pytest.raises(httpx.RemoteProtocolError):
            await post(transport, f"http://127.0.0.1:{port}/a")


async def test_a_cancelled_request_drops_its_connection(nursery: trio.Nursery, post: Post) -> None:
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


async def test_https_with_a_trusted_certificate(
    nursery: trio.Nursery, ca: trustme.CA, tmp_path: Path, post: Post
) -> None:
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


def _h11_reads(data: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """How h11 reads `data` as the answer to a POST."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Content-Length", "0")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    status, headers, body = 0, [], b""
    while not isinstance(event := conn.next_event(), h11.EndOfMessage):
        if isinstance(event, h11.Response):
            status, headers = event.status_code, list(event.headers)
        elif isinstance(event, h11.Data):
            body += event.data
    return status, headers, body


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200\r\ncontent-length:0\r\n\r\n",
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After:  7 \r\nX-A: b  c\r\nContent-Length: 4\r\n\r\nbusy",
        b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Encoding: gzip\r\nContent-Length: 1\r\n\r\nx",
        b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nContent-Length: 2\r\nConnection: Keep-Alive\r\n\r\n{}",
    ],
)
def test_a_plain_answer_is_read_without_h11_as_h11_reads_it(data: bytes) -> None:
    answer = simple_answer(data)
    assert answer is not None
    assert (answer.status_code, list(answer.headers), answer.body) == _h11_reads(data)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{",  # not all there yet
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}HTTP/1.1",  # more than the answer
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n",  # head not ended
        b"HTTP/1.1 200 OK\r\n\r\n",  # no length: read to the close
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nConnection: upgrade\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 204 No Content\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nX-A: caf\xc3\xa9\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nX-A : b\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nX-A: b\r\n c\r\nContent-Length: 2\r\n\r\n{}",  # obs-fold
        b"HTTP/1.1 200 OK\r\nX-A: b\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: 65537\r\n\r\n" + b"x" * 65537,
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * 17_000 + b"\r\nContent-Length: 2\r\n\r\n{}",
    ],
)
def test_anything_but_a_whole_plain_answer_is_left_to_h11(data: bytes) -> None:
    assert simple_answer(data) is None


async def test_a_pre_encoded_post_sends_what_httpx_would(nursery: trio.Nursery) -> None:
    """The same forward through both ways into the transport: the request h11 reads off the wire is the
    same, header for header (order aside), and so is the body."""
    server = await RawDownstream(lambda _: http_answer(200, [], b"{}")).start(nursery)
    target = Target(
        name="rides",
        url=f"{server.url}/rides?x=1",
        forwarding=ForwardingConfig(),
        signing_secrets=(SIGNING_SECRET,),
        legacy_signature=True,
        default_number="106540352242922",
    )
    d = make_delivery(body=b'{"object":"whatsapp_business_account"}')
    head = target.head(d, now=1_700_000_000, traceparent=d.traceparent)
    assert head is not None
    async with LaneTransport() as transport:  # one each: the server closes every connection it answers
        answer = await transport.post(target.route_of(d), head, d.body)
    request = httpx.Request("POST", target.url_of(d), content=d.body, headers=target.headers(d, now=1_700_000_000))
    async with LaneTransport() as transport:
        response = await transport.handle_async_request(request)
    assert answer.status_code == response.status_code == 200
    fast, slow = (_h11_request(raw) for raw in server.requests)
    assert fast == slow
    assert {b"host", b"content-length", b"webhook-signature", b"x-hub-signature-256"} <= {k for k, _ in fast[2]}


def _h11_request(data: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    request = conn.next_event()
    assert isinstance(request, h11.Request)
    body = b""
    while isinstance(event := conn.next_event(), h11.Data):
        body += event.data
    return request.method, request.target, sorted(request.headers), body
