"""Forwarding targets: where each forwarder delivers and how it authenticates (pure, no I/O).

A target is a downstream service (``[services.NAME] url``, the body re-signed with the app secret) or
the Graph API sender (``whatsapp``: replies such as the home menu, with the access token). Targets are
rebuilt from each config, so a reload changes URLs, keys and timeouts between two deliveries.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import httpx

from .config import GRAPH_SENDER, Config, ForwardingConfig
from .store import Delivery
from .version import VERSION
from .whatsapp import sign

USER_AGENT = f"wacored/{VERSION}"


@dataclass(frozen=True)
class Target:
    """Where one forwarder delivers, and how it authenticates."""

    name: str
    url: str
    forwarding: ForwardingConfig
    app_secret: str = ""
    access_token: str = ""

    @property
    def is_graph(self) -> bool:
        return self.name == GRAPH_SENDER

    @functools.cached_property
    def parsed_url(self) -> httpx.URL:
        """`url`, parsed once: every forward of the target reuses it."""
        return httpx.URL(self.url)

    def headers(self, d: Delivery, *, dlq_retry: bool = False) -> dict[str, str]:
        """The contract's headers for `d` (README, "Forwarding"); never a copied incoming one."""
        headers = {
            "Content-Type": "application/json",
            "Accept-Encoding": "identity",
            "User-Agent": USER_AGENT,
            "X-Correlation-ID": d.correlation_id,
            "X-Request-ID": d.request_id,
            "Idempotency-Key": d.key,
            "traceparent": d.traceparent,
        }
        if dlq_retry:
            headers["X-DLQ-Retry"] = "true"
        if self.is_graph:
            headers["Authorization"] = f"Bearer {self.access_token}"
            return headers
        headers.update({
            "X-Routed-From": "wacored",
            "X-Routed-Service": d.service,
            "X-Route-Reason": d.reason,
            "X-Hub-Signature-256": sign(self.app_secret, d.body),
        })
        return headers


def targets_of(config: Config) -> dict[str, Target]:
    """Every forwarding target of a config: each service, and the Graph API sender."""
    secret = config.whatsapp.app_secret
    targets = {
        name: Target(name=name, url=svc.url, forwarding=svc.forwarding, app_secret=secret)
        for name, svc in config.services.items()
    }
    targets[GRAPH_SENDER] = Target(
        name=GRAPH_SENDER,
        url=config.whatsapp.messages_url,
        forwarding=config.forwarding,
        access_token=config.whatsapp.access_token,
    )
    return targets
