"""Downstreams trust wacored with their own secrets, never Meta's: Standard Webhooks signatures on every
forward (verified with the documented recipe, during a rotation too), the legacy header keyed with the
service's secret, and the previous app secret accepted while a rotation keeps it. Real daemon, real
HTTP, real store."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import trio

from wacored.config import Config
from wacored.core.signing import new_secret, secret_problem
from wacored.core.whatsapp import sign, signature_valid, text_webhook
from wacored.reloads import ReloadRequest

from .conftest import SECRET, Downstream, config_mapping, open_daemon
from .support import readme_verify

NEW = new_secret()
OLD = new_secret()


def with_secrets(tmp_path: Path, services: Downstream, graph: Downstream, *secrets: str, **rides: object) -> Config:
    data = config_mapping(tmp_path, services.url, graph.url)
    data["services"]["rides"].update(signing_secrets=list(secrets), **rides)
    return Config.from_mapping(data, {})


async def test_a_downstream_verifies_every_forward_with_its_own_secret_during_a_rotation(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    verify = readme_verify()
    async with open_daemon(with_secrets(tmp_path, services, graph, NEW, OLD)) as daemon:
        answer = await daemon.send_text("rides")
        [got] = await services.wait_for(1, "/rides")
    h = got.headers
    assert h["webhook-id"] == h["idempotency-key"] == answer.json()["routes"][0]["message_id"]
    assert abs(int(h["webhook-timestamp"]) - time.time()) < 60
    assert len(h["webhook-signature"].split(" ")) == 2
    assert verify(NEW, h, got.body)  # the service moved to the new secret
    assert verify(OLD, h, got.body)  # ... or not yet
    assert not verify(new_secret(), h, got.body)
    assert not verify(NEW, h, got.body + b" ")  # the body is covered
    assert not verify(NEW, {**h, "webhook-timestamp": str(int(h["webhook-timestamp"]) - 600)}, got.body)
    # Meta's app secret signs nothing that leaves wacored.
    assert "x-hub-signature-256" not in h
    assert not verify("whsec_" + base64.b64encode(SECRET.encode()).decode(), h, got.body)


async def test_legacy_signature_is_keyed_with_the_services_secret_never_the_app_secret(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    async with open_daemon(with_secrets(tmp_path, services, graph, NEW, legacy_signature=True)) as daemon:
        await daemon.send_text("rides")
        [got] = await services.wait_for(1, "/rides")
    assert signature_valid(NEW, got.body, got.headers["x-hub-signature-256"])
    assert not signature_valid(SECRET, got.body, got.headers["x-hub-signature-256"])
    assert readme_verify()(NEW, got.headers, got.body)


async def test_the_previous_app_secret_is_accepted_while_set_and_counted(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    send, receive = trio.open_memory_channel[ReloadRequest](1)
    data = config_mapping(tmp_path, services.url, graph.url)
    async with open_daemon(Config.from_mapping(data, {}), reloads=receive) as daemon:

        async def post(secret: str, n: int) -> int:
            body = text_webhook(text="rides", sender="250788000001", wamid=f"wamid.ROT{n}", timestamp=1)
            answer = await daemon.post(body, {"X-Hub-Signature-256": sign(secret, body)}, signed=False)
            return answer.status_code

        assert await post("old-app-secret", 1) == 401
        data["whatsapp"]["app_secret_previous"] = "old-app-secret"
        request = ReloadRequest(lambda: Config.from_mapping(data, {}))
        await send.send(request)
        assert await request.done.wait()
        assert await post("old-app-secret", 2) == 200
        assert await post(SECRET, 3) == 200
        assert await post("a-random-secret", 4) == 401
        exported = (await daemon.client.get(f"{daemon.url}/metrics")).text
    assert "wacored_webhook_previous_secret_total 1.0" in exported


def test_new_secrets_are_valid_and_distinct() -> None:
    made = {new_secret() for _ in range(5)}
    assert len(made) == 5
    assert all(secret_problem(s) is None for s in made)
