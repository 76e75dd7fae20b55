"""wacored.actors.forwarder, pure parts: status classification, backoff, lanes, targets, headers, `deliver`."""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
import sqlite3
from collections.abc import Callable, Coroutine
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from wacored.actors.forwarder import Target, deliver, targets_of
from wacored.actors.transport import route_of
from wacored.config import Config, ForwardingConfig
from wacored.core.delivery import Verdict, backoff_s, classify, lane_of
from wacored.core.signing import key_of
from wacored.core.whatsapp import signature_valid
from wacored.store import Delivery, Outcome

from .conftest import SIGNING_SECRET, bare_runtime, rows
from .support import add_message, held_lanes, make_delivery

SHIPPED = Path(__file__).resolve().parent.parent / "wacored.toml"
SECRET = "app-secret"
BODY = b'{"object":"whatsapp_business_account","entry":[]}'


def delivery(**overrides: object) -> Delivery:
    fields: dict[str, object] = {
        "id": 7,
        "key": "wamid.ABC",
        "body": BODY,
        "request_id": "req-1",
        "correlation_id": "corr-1",
        "received_at": 1700000000.0,
    }
    return make_delivery(**{**fields, **overrides})


def service_target(retries: int = 2) -> Target:
    fwd = ForwardingConfig(timeout_ms=1000, retries=retries, retry_base_ms=200, concurrency=1)
    return Target(name="rides", url="http://rides.test/webhook", forwarding=fwd, signing_secrets=(SIGNING_SECRET,))


# -- classify, backoff, lanes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, Verdict.DELIVERED),
        (204, Verdict.DELIVERED),
        (400, Verdict.PERMANENT),
        (401, Verdict.PERMANENT),
        (404, Verdict.PERMANENT),
        (408, Verdict.TRANSIENT),
        (425, Verdict.TRANSIENT),
        (429, Verdict.TRANSIENT),
        (500, Verdict.TRANSIENT),
        (503, Verdict.TRANSIENT),
    ],
)
def test_classify(status: int, verdict: Verdict) -> None:
    assert classify(status) is verdict


@pytest.mark.parametrize("retry", [1, 2, 3, 4, 5])
def test_backoff_is_full_jitter_within_the_exponential_cap(retry: int) -> None:
    rng = random.Random(retry)
    cap = 0.2 * 2 ** (retry - 1)
    samples = [backoff_s(retry, 0.2, rng) for _ in range(200)]
    assert all(0.0 <= s <= cap for s in samples)
    assert max(samples) > cap / 2  # jitter spans the range rather than sitting near zero


def test_backoff_is_deterministic_with_a_seeded_rng() -> None:
    first = [backoff_s(r, 0.2, random.Random(42)) for r in (1, 2, 3)]
    again = [backoff_s(r, 0.2, random.Random(42)) for r in (1, 2, 3)]
    assert first == again


def test_lane_of_is_stable_across_processes() -> None:
    # crc32 values, not `hash`: the same sender maps to the same lane after a restart.
    assert lane_of("250788000001", 16) == 7
    assert lane_of("US.13491208655302741918", 16) == 13


@pytest.mark.parametrize("lanes", [1, 3, 16])
def test_lane_of_is_within_range_and_spreads(lanes: int) -> None:
    used = {lane_of(f"2507880{i:05d}", lanes) for i in range(500)}
    assert used == set(range(lanes))


# -- targets and headers ---------------------------------------------------------------------------


def test_service_target_headers() -> None:
    d = delivery()
    headers = service_target().headers(d, now=1_700_000_000.7)
    assert headers == {
        "Content-Type": "application/json",
        "Accept-Encoding": "identity",
        "User-Agent": "wacored/0.1.0",
        "X-Correlation-ID": "corr-1",
        "X-Request-ID": "req-1",
        "Idempotency-Key": "wamid.ABC",
        "X-Routed-From": "wacored",
        "X-Routed-Service": "rides",
        "X-Route-Reason": "keyword",
        "traceparent": d.traceparent,
        "webhook-id": "wamid.ABC",
        "webhook-timestamp": "1700000000",
        "webhook-signature": headers["webhook-signature"],
    }
    expected = hmac.new(key_of(SIGNING_SECRET), b"wamid.ABC.1700000000." + BODY, hashlib.sha256).digest()
    assert headers["webhook-signature"] == "v1," + base64.b64encode(expected).decode()


def test_every_configured_secret_signs_newest_first_and_legacy_uses_the_first() -> None:
    old = "whsec_" + base64.b64encode(b"o" * 24).decode()
    target = Target(
        name="rides",
        url="http://rides.test/",
        forwarding=ForwardingConfig(),
        signing_secrets=(SIGNING_SECRET, old),
        legacy_signature=True,
    )
    headers = target.headers(delivery(), now=1_700_000_000)
    new_sig, old_sig = headers["webhook-signature"].split(" ")
    signed = b"wamid.ABC.1700000000." + BODY
    for sig, key in ((new_sig, key_of(SIGNING_SECRET)), (old_sig, b"o" * 24)):
        assert sig == "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    assert signature_valid(SIGNING_SECRET, BODY, headers["X-Hub-Signature-256"])
    assert not signature_valid(SECRET, BODY, headers["X-Hub-Signature-256"])


def test_a_service_without_a_secret_gets_no_signature_at_all() -> None:
    target = Target(name="rides", url="http://rides.test/", forwarding=ForwardingConfig())
    headers = target.headers(delivery(), now=1_700_000_000)
    assert not {"webhook-signature", "webhook-timestamp", "X-Hub-Signature-256"} & set(headers)


def test_graph_target_headers_use_the_access_token_not_a_signature() -> None:
    graph = Target(
        name="whatsapp",
        url="https://graph.test/v21.0/1/messages",
        forwarding=ForwardingConfig(),
        access_token="EAAG-token",
    )
    headers = graph.headers(delivery(service="wacored", target="whatsapp"), now=0)
    assert headers["Authorization"] == "Bearer EAAG-token"
    assert headers["Content-Type"] == "application/json"
    assert headers["Idempotency-Key"] == "wamid.ABC"
    assert "X-Hub-Signature-256" not in headers


def test_targets_of_config() -> None:
    env = {
        "WACORED_APP_SECRET": SECRET,
        "WA_TOKEN": "EAAG-token",
        "WA_PHONE_ID": "106540352242922",
        "WACORED_SIGNING_SECRETS_RIDES": SIGNING_SECRET,
    }
    config = Config.load(SHIPPED, env)
    targets = targets_of(config)
    assert set(targets) == set(config.services) | {"whatsapp"}
    for name, svc in config.services.items():
        assert (targets[name].url, targets[name].forwarding, targets[name].signing_secrets) == (
            svc.url,
            svc.forwarding,
            (SIGNING_SECRET,) if name == "rides" else (),
        )
        assert not targets[name].is_graph
    graph = targets["whatsapp"]
    assert graph.is_graph
    assert graph.url == "https://graph.facebook.com/v21.0/106540352242922/messages"
    assert graph.access_token == "EAAG-token"


def test_graph_url_with_a_trailing_slash() -> None:
    data = {
        "whatsapp": {"graph_api_url": "https://graph.test/v21.0/", "phone_number_id": "42"},
        "services": {"rides": {"url": "http://127.0.0.1:9001/rides", "keys": ["rides"]}},
    }
    assert targets_of(Config.from_mapping(data, {}))["whatsapp"].url == "https://graph.test/v21.0/42/messages"


# -- deliver() over httpx.MockTransport ------------------------------------------------------------

Step = int | tuple[int, str] | type[httpx.TransportError]


Handler = Callable[[httpx.Request], Coroutine[None, None, httpx.Response]]


def scripted(steps: list[Step], seen: list[httpx.Request]) -> Handler:
    """A MockTransport handler answering each request with the next step: a status or an error."""
    script = iter(steps)

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        step = next(script)
        if isinstance(step, type):
            raise step("simulated", request=request)
        status, text = step if isinstance(step, tuple) else (step, "")
        return httpx.Response(status, text=text)

    return handler


async def deliver_to(tmp_path: Path, target: Target, transport: httpx.AsyncBaseTransport) -> Outcome:
    outcome = await deliver(bare_runtime(tmp_path, target), target.name, transport, delivery(), random.Random(0))
    assert outcome is not None
    return outcome


async def run_deliver(
    tmp_path: Path, steps: list[Step], retries: int = 2
) -> tuple[Outcome, list[httpx.Request], float]:
    seen: list[httpx.Request] = []
    start = trio.current_time()
    transport = httpx.MockTransport(scripted(steps, seen))
    outcome = await deliver_to(tmp_path, service_target(retries), transport)
    return outcome, seen, trio.current_time() - start


async def test_transient_then_success_is_delivered(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    outcome, seen, elapsed = await run_deliver(tmp_path, [503, 503, 200])
    assert (outcome.delivered, outcome.attempts, outcome.permanent) == (True, 3, False)
    assert (outcome.message_id, outcome.target, outcome.key) == (7, "rides", "wamid.ABC")
    assert outcome.status_code == 200
    assert outcome.error == ""
    assert 0 < elapsed <= 0.2 + 0.4  # two backoffs, each within its cap
    assert {(r.url, r.content, r.headers["Idempotency-Key"]) for r in seen} == {
        (httpx.URL("http://rides.test/webhook"), BODY, "wamid.ABC"),
    }


async def test_transient_until_out_of_retries(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    outcome, seen, _ = await run_deliver(tmp_path, [503, 503, 503])
    assert (outcome.delivered, outcome.attempts, outcome.permanent) == (False, 3, False)
    assert outcome.status_code == 503
    assert "503" in outcome.error
    assert len(seen) == 3


async def test_no_retries_means_one_attempt(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    outcome, seen, _ = await run_deliver(tmp_path, [503], retries=0)
    assert (outcome.delivered, outcome.attempts, len(seen)) == (False, 1, 1)


async def test_permanent_error_is_not_retried(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    outcome, seen, elapsed = await run_deliver(tmp_path, [(404, "no such route: /webhook")])
    assert (outcome.delivered, outcome.attempts, outcome.permanent) == (False, 1, True)
    assert outcome.status_code == 404
    assert "404" in outcome.error
    assert "no such route: /webhook" in outcome.error
    assert (len(seen), elapsed) == (1, 0)


async def test_permanent_error_body_is_an_excerpt(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    outcome, _, _ = await run_deliver(tmp_path, [(400, "x" * 5000)])
    assert "x" * 100 in outcome.error
    assert len(outcome.error) < 300


async def test_connection_error_is_transient(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    outcome, seen, _ = await run_deliver(tmp_path, [httpx.ConnectError] * 3)
    assert (outcome.delivered, outcome.attempts, outcome.permanent) == (False, 3, False)
    assert outcome.status_code is None
    assert "ConnectError" in outcome.error


async def test_connection_error_then_success(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    outcome, _, _ = await run_deliver(tmp_path, [httpx.ConnectError, 204])
    assert (outcome.delivered, outcome.attempts, outcome.status_code) == (True, 2, 204)


async def test_timeout_is_transient(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    outcome, _, _ = await run_deliver(tmp_path, [httpx.ReadTimeout] * 3)
    assert (outcome.delivered, outcome.attempts, outcome.permanent) == (False, 3, False)
    assert "timeout" in outcome.error


@pytest.mark.parametrize(
    ("status", "delivered", "attempts"),
    [pytest.param(200, True, 1, id="2xx-is-delivered"), pytest.param(502, False, 3, id="5xx-is-transient")],
)
async def test_undecodable_response_body_is_classified_by_status(
    tmp_path: Path, autojump_clock: trio.abc.Clock, status: int, delivered: bool, attempts: int
) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        # A stream, so the mock does not decode the body while building the response.
        return httpx.Response(status, headers={"Content-Encoding": "gzip"}, stream=httpx.ByteStream(b"not gzip"))

    transport = httpx.MockTransport(handler)
    outcome = await deliver_to(tmp_path, service_target(), transport)
    assert (outcome.delivered, outcome.attempts, outcome.permanent) == (delivered, attempts, False)


async def test_a_service_that_never_answers_times_out_per_attempt(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await trio.sleep_forever()
        raise AssertionError

    start = trio.current_time()
    target = service_target()
    outcome = await deliver_to(tmp_path, target, httpx.MockTransport(hang))
    assert (outcome.delivered, outcome.attempts, outcome.permanent) == (False, 3, False)
    assert "timeout" in outcome.error
    # Three attempts of timeout_ms each, plus at most the two backoffs.
    timeout_s = target.forwarding.timeout_ms / 1000
    assert 3 * timeout_s <= trio.current_time() - start <= 3 * timeout_s + 3 * target.forwarding.retry_base_ms / 1000


async def test_a_forwarder_behind_a_slow_service_keeps_beating(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    """Its lane busy with a slow service and more rows behind, the forwarder still shows life: a slow
    service must not trip the watchdog."""
    from wacored.actors.forwarder import PAGE, run_forwarder
    from wacored.runtime import HEARTBEAT_S
    from wacored.store import LaneReader
    from wacored.store.writer import WriteOp

    async def slow(request: httpx.Request) -> httpx.Response:
        await trio.sleep(30)
        return httpx.Response(200)

    writes, outcomes = trio.open_memory_channel[WriteOp](1000)
    target = Target(
        name="rides",
        url="http://rides.test/",
        signing_secrets=(SIGNING_SECRET,),
        forwarding=ForwardingConfig(timeout_ms=60_000, concurrency=1),
    )
    rt = bare_runtime(tmp_path, target, writes=writes)
    path = tmp_path / "bare.db"
    with sqlite3.connect(path) as db:
        for i in range(PAGE + 10):
            add_message(db, f"wamid.{i}", target="rides")
    lanes = held_lanes(rt.lanes, "rides")
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(
                run_forwarder,
                rt,
                "rides",
                lanes,
                LaneReader(path),
                writes.clone(),
                transport=lambda: httpx.MockTransport(slow),
            )
        )
        await trio.sleep(120)
        assert rows(path, "SELECT COUNT(*) FROM messages WHERE state = 'queued'") == [(PAGE + 10,)]
        assert trio.current_time() - rt.actors["forwarder.rides"].heartbeat <= HEARTBEAT_S
        nursery.cancel_scope.cancel()
    outcomes.close()


async def test_a_failed_probe_reopens_the_breaker_for_another_period(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    seen: list[httpx.Request] = []

    async def down(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(503)

    fwd = ForwardingConfig(timeout_ms=1000, retries=0, breaker_failures=2, breaker_open_s=10.0)
    target = Target(name="rides", url="http://rides.test/", forwarding=fwd, signing_secrets=(SIGNING_SECRET,))
    rt = bare_runtime(tmp_path, target)
    transport = httpx.MockTransport(down)

    async def reason() -> str:
        outcome = await deliver(rt, "rides", transport, delivery(), random.Random(0))
        assert outcome is not None
        return outcome.reason

    assert [await reason(), await reason()] == ["transient", "transient"]  # the second one opens it
    assert await reason() == "breaker_open"
    await trio.sleep(10)
    assert await reason() == "transient"  # the probe, which fails...
    assert await reason() == "breaker_open"  # ...so the breaker is open again, not half-open
    await trio.sleep(9.9)
    assert await reason() == "breaker_open"
    assert len(seen) == 3
    assert rt.attempt_counts.forwards == {("rides", "transient"): 3, ("rides", "breaker_open"): 3}


@pytest.mark.parametrize(
    ("verdict", "tries", "retries", "settled_now"),
    [
        (Verdict.DELIVERED, 1, 2, True),
        (Verdict.PERMANENT, 1, 2, True),
        (Verdict.TRANSIENT, 1, 2, False),
        (Verdict.TRANSIENT, 3, 2, True),
        (Verdict.TRANSIENT, 1, 0, True),
    ],
)
def test_a_first_delivery_settles_when_answered_or_out_of_retries(
    verdict: Verdict, tries: int, retries: int, settled_now: bool
) -> None:
    from wacored.core.delivery import settled

    assert settled(verdict, tries, retries) is settled_now


def _head_fields(head: bytes) -> dict[str, str]:
    lines = head.decode("ascii").split("\r\n")
    assert lines[-1] == ""  # every line ends in CRLF
    return dict(line.split(": ", 1) for line in lines[:-1])


@pytest.mark.parametrize("dlq_retry", [False, True])
def test_a_pre_encoded_head_holds_exactly_the_contract_headers(dlq_retry: bool) -> None:
    legacy = Target(
        name="rides",
        url="http://rides.test/",
        forwarding=ForwardingConfig(),
        signing_secrets=(SIGNING_SECRET,),
        legacy_signature=True,
        default_number="106540352242922",
    )
    graph = Target(
        name="whatsapp", url="https://graph.test/v21.0/1/messages", forwarding=ForwardingConfig(), access_token="EAAG-t"
    )
    for target in (service_target(), legacy, graph):
        d = delivery()
        head = target.head(d, now=1_700_000_000.7, traceparent="00-span-01", dlq_retry=dlq_retry)
        assert head is not None
        expected = target.headers(d, now=1_700_000_000.7, dlq_retry=dlq_retry, traceparent="00-span-01")
        assert _head_fields(head) == expected
        assert expected["traceparent"] == "00-span-01"


@pytest.mark.parametrize(
    "overrides",
    [
        {"correlation_id": "c\r\nX-Injected: 1"},
        {"request_id": "r\nX-Injected: 1"},
        {"reason": "caf\u00e9"},
        {"service": "rides\x00"},
    ],
)
def test_a_value_a_head_cannot_carry_plainly_is_left_to_httpx(overrides: dict[str, str]) -> None:
    """`Target.head` declines (None) rather than encode a value outside printable ASCII; the forward
    then goes through `httpx.Request`, which validates (and refuses) it as it always did."""
    d = delivery(**overrides)
    assert service_target().head(d, now=0, traceparent=d.traceparent) is None


def test_a_target_keeps_the_route_of_each_url_it_posts_to() -> None:
    graph = Target(
        name="whatsapp",
        url="https://graph.test/v21.0/1/messages",
        forwarding=ForwardingConfig(),
        default_number="1",
        graph_api_url="https://graph.test:8443/v21.0/",
    )
    for number in ("", "1", "106540352242922", "106540352242922"):
        d = delivery(service="wacored", target="whatsapp", number=number)
        assert graph.route_of(d) == route_of(graph.url_of(d))
    other = graph.route_of(delivery(number="106540352242922"))
    assert other.origin == ("https", "graph.test", 8443)
    assert other.start == b"POST /v21.0/106540352242922/messages HTTP/1.1\r\nHost: graph.test:8443\r\n"
    assert service_target().route_of(delivery()).start == b"POST /webhook HTTP/1.1\r\nHost: rides.test\r\n"
