"""How a delivery goes (pure): what an answer means, how long to wait before the next try, which lane
a sender's messages take.

2xx is delivered; 408, 425, 429 and 5xx are transient (tried again, then dead-lettered); any other
4xx is permanent (dead-lettered at once, never retried automatically). Retries wait a full-jitter
exponential backoff, or longer when the service asked for it (``Retry-After``, `retry_after.py`). A
sender always maps to the same lane, so one sender's messages reach a service in order.
"""

from __future__ import annotations

import random
import zlib
from enum import StrEnum


class Verdict(StrEnum):
    DELIVERED = "delivered"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


def classify(status: int) -> Verdict:
    """What an HTTP status means for a delivery (docs/contract.md, "Forwarding")."""
    if 200 <= status < 300:
        return Verdict.DELIVERED
    if status in (408, 425, 429) or status >= 500:
        return Verdict.TRANSIENT
    return Verdict.PERMANENT


def backoff_s(retry: int, base_s: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff before retry number `retry` (1-based)."""
    return rng.uniform(0.0, base_s * 2 ** (retry - 1))


def next_try_s(backoff: float, retry_after_s: float | None) -> float:
    """The wait before the next try: the backoff, or longer when the service asked for it."""
    return backoff if retry_after_s is None else max(backoff, retry_after_s)


def lane_of(sender: str, lanes: int) -> int:
    """A stable lane per sender (crc32: the same across restarts, unlike `hash`)."""
    return zlib.crc32(sender.encode()) % lanes


def settled(verdict: Verdict, tries: int, retries: int) -> bool:
    """Whether a first delivery ends after its `tries`-th attempt answered `verdict`: delivered,
    refused for good, or transient with its `retries` used up (then it is dead-lettered)."""
    return verdict is not Verdict.TRANSIENT or tries > retries


def dead_letter_reason(verdict: Verdict) -> str:
    """The reason a failed delivery is dead-lettered with."""
    return {Verdict.PERMANENT: "permanent", Verdict.TRANSIENT: "transient"}.get(verdict, "")
