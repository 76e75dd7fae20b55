"""The dashboard and the alert rules against a real Prometheus scraping a real wacored.

A `wacored run` process gets real signed traffic (accepted, duplicate, bad signature, bad request,
handshakes, a status update, the home menu, a service that fails and one that refuses, which end as
dead letters); Prometheus (the `prometheus` binary, scraping every second, with the shipped rule file) scrapes
it. Then every query of every dashboard panel must return data, and every alert rule must evaluate
without error. A panel that shows nothing fails the test.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from wacored.core.whatsapp import sign, text_webhook

from .conftest import FIXTURES, SECRET, VERIFY_TOKEN, Downstream, Received
from .support import daemon_process, free_port

RULES_FILE = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "wacored.rules.yml"

DASHBOARD = Path(__file__).parent.parent / "dashboards" / "wacored.json"
# What Grafana would put in for the dashboard's variables and its interval macros.
VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "$instance": ".*",
    "$job": "wacored",
    "$number": ".*",
}

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (`make tools` installs it)")


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel, variables filled in, plus the queries
    behind the dashboard's template variables."""
    doc = json.loads(DASHBOARD.read_text())
    queries = [(panel["title"], target["expr"]) for panel in doc["panels"] for target in panel.get("targets", [])]
    for variable in doc["templating"]["list"]:
        if variable["type"] == "query":
            # label_values(SELECTOR, label) is Grafana's: the selector itself must match something.
            selector = re.fullmatch(r"label_values\((.*), \w+\)", variable["definition"])
            assert selector, variable["definition"]
            queries.append((f"variable {variable['name']}", selector[1]))
    for macro, value in VARIABLES.items():
        queries = [(title, expr.replace(macro, value)) for title, expr in queries]
    return queries


def test_the_dashboard_uses_the_datasource_variable_everywhere() -> None:
    doc = json.loads(DASHBOARD.read_text())
    [datasource] = [v for v in doc["templating"]["list"] if v["name"] == "datasource"]
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
    for panel in doc["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"], panel["title"]
    assert all("$" not in expr for _, expr in dashboard_queries()), "a variable left unsubstituted"


async def respond(request: Received) -> int:
    """insurance is down (503: transient, retried, then dead-lettered); jobs refuses (400: abandoned)."""
    return {"/insurance": 503, "/jobs": 400}.get(request.path, 200)


async def feed(url: str) -> None:
    """Traffic of every kind the catalogue counts."""
    async with httpx.AsyncClient(trust_env=False, base_url=url) as http:

        async def post(body: bytes, secret: str = SECRET) -> int:
            r = await http.post("/webhook", content=body, headers={"X-Hub-Signature-256": sign(secret, body)})
            return r.status_code

        def text(text: str, n: int, sender: str = "250788000500") -> bytes:
            return text_webhook(text=text, sender=sender, wamid=f"wamid.PROM{text}{n}", timestamp=1700000000)

        assert await post(text("rides", 1)) == 200
        assert await post(text("rides", 1)) == 200  # a duplicate
        assert await post(text("hello", 2)) == 200  # state: the session in rides
        assert await post(text("menu", 3, "250788000501")) == 200  # the home menu via the Graph API
        assert await post(text("insurance", 4, "250788000502")) == 200
        assert await post(text("jobs", 5, "250788000503")) == 200
        assert await post((FIXTURES / "status_delivered.json").read_bytes()) == 200
        assert await post(text("rides", 6), secret="wrong") == 401
        assert await post(b"not json") == 400
        handshake = {"hub.mode": "subscribe", "hub.challenge": "c"}
        assert (await http.get("/webhook", params={**handshake, "hub.verify_token": VERIFY_TOKEN})).status_code == 200
        assert (await http.get("/webhook", params={**handshake, "hub.verify_token": "no"})).status_code == 403


async def query(http: httpx.AsyncClient, promql: str) -> dict[str, Any]:
    r = await http.get("/api/v1/query", params={"query": promql})
    return r.json()  # type: ignore[no-any-return]


async def poll(http: httpx.AsyncClient, promql: str, what: str, within: float = 30) -> None:
    """Wait until `promql` returns something."""
    with trio.fail_after(within):
        while True:
            try:
                answer = await query(http, promql)
                if answer.get("status") == "success" and answer["data"]["result"]:
                    return
            except (httpx.TransportError, ValueError):
                pass  # not up yet
            await trio.sleep(0.2)
    raise AssertionError(what)  # pragma: no cover


async def run_prometheus(tmp_path: Path, target: str) -> tuple[trio.Process, str]:
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {RULES_FILE}\n"
        "scrape_configs:\n  - job_name: wacored\n    metrics_path: /metrics\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    port = free_port()
    with (tmp_path / "prometheus.log").open("wb") as log:
        process = await trio.lowlevel.open_process(
            [
                str(PROMETHEUS),
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=log,
        )
    return process, f"http://127.0.0.1:{port}"


async def test_every_dashboard_query_returns_data_and_every_alert_evaluates(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    services.respond = respond
    async with daemon_process(tmp_path, services, graph) as url:
        prometheus, api = await run_prometheus(tmp_path, url.removeprefix("http://"))
        try:
            async with httpx.AsyncClient(trust_env=False, base_url=api, timeout=10) as http:
                await poll(http, 'up{job="wacored"} == 1', "Prometheus never scraped wacored", within=15)
                await feed(url)
                await services.wait_for(1, "/rides")
                # rate() over the dashboard's 1m needs a few scrapes after the traffic.
                await poll(
                    http,
                    'sum(increase(wacored_webhook_requests_total{outcome="accepted"}[1m])) > 0',
                    "no accepted request in the scraped counters",
                )
                failures = []
                for title, promql in dashboard_queries():
                    answer = await query(http, promql)
                    if answer.get("status") != "success":
                        failures.append(f"{title}: {promql}: {answer.get('error')}")
                    elif not answer["data"]["result"]:
                        failures.append(f"{title}: {promql}: no data")
                rules = (await http.get("/api/v1/rules")).json()["data"]["groups"]
                loaded = [rule for group in rules for rule in group["rules"]]
                for rule in loaded:
                    answer = await query(http, rule["query"])
                    if answer.get("status") != "success" or rule["health"] == "err":
                        failures.append(f"alert {rule['name']}: {answer.get('error') or rule.get('lastError')}")
        finally:
            prometheus.send_signal(signal.SIGTERM)
            with trio.move_on_after(10):
                await prometheus.wait()
            if prometheus.returncode is None:
                prometheus.kill()
    assert failures == [], "\n".join(failures)
    assert {rule["name"] for rule in loaded} == set(re.findall(r"^      - alert: (\w+)$", RULES_FILE.read_text(), re.M))
