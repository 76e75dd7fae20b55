"""Forwarding targets: where each forwarder delivers and how it authenticates (pure, no I/O).

A target is a downstream service (``[services.NAME] url``, signed with that service's own Standard
Webhooks secrets, `signing.py`) or the Graph API sender (``whatsapp``: replies such as the home menu,
with the access token). Meta's app secret never leaves wacored: a service that held it could forge
webhooks that wacored's own ``/webhook`` accepts. Targets are rebuilt from each config, so a reload
changes URLs, secrets and timeouts between two deliveries.

The business number travels with each row (``Delivery.number``, a number key of `numbers.py`): a
service is told it in ``X-WA-Phone-Number-Id`` so it can answer from that number, and the Graph sender
posts each reply to ``{graph_api_url}/{that number's id}/messages`` with that number's token, so one
target serves every number.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import httpx

from ..config import GRAPH_SENDER, Config, ForwardingConfig
from ..core.numbers import number_tokens
from ..core.signing import key_of, signature
from ..core.whatsapp import sign
from ..store import Delivery
from ..version import VERSION
from .transport import Route, route_of

USER_AGENT = f"wacored/{VERSION}"

_FIELD_LINES = re.compile(r"(?:[!-~]+: (?:[!-~](?:[ -~]*[!-~])?)?\r\n)*")
"""Header lines of printable ASCII, one CRLF each: a strict subset of what h11 (and httpx) accept, so
a head that matches means the same on the wire as the one httpx would have built."""


@dataclass(frozen=True)
class Target:
    """Where one forwarder delivers, and how it authenticates."""

    name: str
    url: str
    forwarding: ForwardingConfig
    signing_secrets: tuple[str, ...] = ()
    legacy_signature: bool = False
    access_token: str = ""
    default_number: str = ""
    """``[whatsapp] phone_number_id``: the id of number key ``""``."""
    graph_api_url: str = ""
    number_tokens: tuple[tuple[str, str], ...] = ()
    """(number key, token) for the numbers whose token is not `access_token` (another WABA's)."""
    ca_file: str = ""
    """A private CA the service's certificate is signed by, trusted besides the system's (``[services.NAME]
    ca_file``)."""

    @property
    def is_graph(self) -> bool:
        return self.name == GRAPH_SENDER

    @functools.cached_property
    def parsed_url(self) -> httpx.URL:
        """`url`, parsed once: every forward of the target reuses it."""
        return httpx.URL(self.url)

    @functools.cached_property
    def signing_keys(self) -> tuple[bytes, ...]:
        """The key bytes of `signing_secrets`, decoded once (config validation has checked them)."""
        return tuple(key_of(secret) for secret in self.signing_secrets)

    @functools.cached_property
    def _tokens(self) -> dict[str, str]:
        return dict(self.number_tokens)

    def number_id(self, d: Delivery) -> str:
        """The id of the business number `d` was written to (or is sent from)."""
        return d.number or self.default_number

    def url_of(self, d: Delivery) -> httpx.URL:
        """Where `d` is POSTed: the Graph API path names the number a reply goes from."""
        if not self.is_graph or not d.number or d.number == self.default_number:
            return self.parsed_url
        return httpx.URL(f"{self.graph_api_url.rstrip('/')}/{d.number}/messages")

    def route_of(self, d: Delivery) -> Route:
        """`url_of(d)` as the lane transport sends to it, encoded once per target and URL: hashing an
        `httpx.URL` (it is rebuilt as a string) would cost ~3 us per forward."""
        if not self.is_graph or not d.number or d.number == self.default_number:
            return self._route
        route = self._routes.get(d.number)
        if route is None:
            route = self._routes[d.number] = route_of(self.url_of(d))
        return route

    @functools.cached_property
    def _route(self) -> Route:
        return route_of(self.parsed_url)

    @functools.cached_property
    def _routes(self) -> dict[str, Route]:
        """The Graph sender's routes by number; a number is the config's (`numbers.py`) or a digits-only
        id from a payload, so the map stays small."""
        return {}

    @functools.cached_property
    def _static(self) -> dict[str, str]:
        """The headers that do not depend on the message: built once per target (a reload makes new
        targets)."""
        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity", "User-Agent": USER_AGENT}
        if not self.is_graph:
            headers["X-Routed-From"] = "wacored"
        return headers

    @functools.cached_property
    def _static_head(self) -> bytes:
        return "".join(f"{name}: {value}\r\n" for name, value in self._static.items()).encode("ascii")

    def headers(
        self, d: Delivery, *, now: float, dlq_retry: bool = False, traceparent: str | None = None
    ) -> dict[str, str]:
        """The contract's headers for `d` sent at wall-clock `now` (docs/contract.md, "Forwarding");
        never a copied incoming one. ``traceparent`` is the stored one unless the attempt's span gives
        another."""
        return {
            **self._static,
            **self._dynamic(d, now, d.traceparent if traceparent is None else traceparent, dlq_retry),
        }

    def head(self, d: Delivery, *, now: float, traceparent: str, dlq_retry: bool = False) -> bytes | None:
        """`headers` as the header lines of an HTTP/1.1 request head (CRLF after each; no ``Host``,
        no ``Content-Length``), the static part encoded once per target. None when a value is not
        plain printable ASCII: the caller then goes through httpx, which validates (and refuses) it
        as before. Checked with one regex and a line count, rather than h11's ~70 regex matches and
        httpx's header objects per forward (bench/README.md, "What was cut")."""
        fields = self._dynamic(d, now, traceparent, dlq_retry)
        block = "".join(f"{name}: {value}\r\n" for name, value in fields.items())
        # The count catches a value holding CRLF, which would otherwise pass as two lines.
        if block.count("\n") != len(fields) or not _FIELD_LINES.fullmatch(block):
            return None
        return self._static_head + block.encode("ascii")

    def _dynamic(self, d: Delivery, now: float, traceparent: str, dlq_retry: bool) -> dict[str, str]:
        """The headers that depend on the message (and on `now`: the signature's timestamp)."""
        headers = {
            "X-Correlation-ID": d.correlation_id,
            "X-Request-ID": d.request_id,
            "Idempotency-Key": d.key,
            "traceparent": traceparent,
        }
        if dlq_retry:
            headers["X-DLQ-Retry"] = "true"
        if self.is_graph:
            headers["Authorization"] = f"Bearer {self._tokens.get(d.number, self.access_token)}"
            return headers
        headers["X-Routed-Service"] = d.service
        headers["X-Route-Reason"] = d.reason
        if number := self.number_id(d):
            # Digits only: a configured id, or one `numbers.Numbers.key_of` kept because it is digits.
            headers["X-WA-Phone-Number-Id"] = number
        if self.signing_keys:
            timestamp = int(now)
            headers["webhook-id"] = d.key
            headers["webhook-timestamp"] = str(timestamp)
            headers["webhook-signature"] = signature(self.signing_keys, d.key, timestamp, d.body)
        if self.legacy_signature:
            # For a handler written for Meta's header: keyed with the whole first secret string, as
            # such a handler keys with its "app secret" string.
            headers["X-Hub-Signature-256"] = sign(self.signing_secrets[0], d.body)
        return headers


def targets_of(config: Config) -> dict[str, Target]:
    """Every forwarding target of a config: each service, and the Graph API sender."""
    default = config.whatsapp.phone_number_id
    targets = {
        name: Target(
            name=name,
            url=svc.url,
            forwarding=svc.forwarding,
            signing_secrets=svc.signing_secrets,
            legacy_signature=svc.legacy_signature,
            default_number=default,
            ca_file=svc.ca_file,
        )
        for name, svc in config.services.items()
    }
    targets[GRAPH_SENDER] = Target(
        name=GRAPH_SENDER,
        url=config.whatsapp.messages_url,
        forwarding=config.forwarding,
        access_token=config.whatsapp.access_token,
        default_number=default,
        graph_api_url=config.whatsapp.graph_api_url,
        number_tokens=tuple(sorted(number_tokens(config).items())),
    )
    return targets
