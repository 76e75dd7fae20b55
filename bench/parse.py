"""How long parsing one POST body takes, and how many bytes it stores, at the size limit and in the
amplifying shapes an adversarial pass found: figures printed beside the baseline measured before the
parser was made linear (2026-11-29, this 2-core VM).

    .venv/bin/python bench/parse.py

Bounded: a handful of bodies, each parsed 3 times (the best time is shown). No network.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wacored.core.whatsapp import PayloadError, parse_webhook  # noqa: E402

LIMIT = 3 * 1024 * 1024
"""The default ``[server] max_body_bytes``."""

BASELINE = {
    # shape: (parse ms, stored MB, answer) before the linear parser
    "3 MB of short texts, one contact": (278, 9.6, "200"),
    "1000 messages x 1000 contacts": (752, 57.3, "200"),
    "2000 messages x 2000 contacts": (2993, 228.7, "200"),
    "20000 messages x 100 KB metadata": (None, None, "(not run: minutes, gigabytes)"),
}


def body(messages: int, contacts: int, **value: Any) -> bytes:
    msgs = [
        {
            "from": "250788000001",
            "id": f"wamid.{i:020d}",
            "timestamp": "1700000000",
            "type": "text",
            "text": {"body": "hello"},
        }
        for i in range(messages)
    ]
    people = [{"profile": {"name": "X" * 10}, "wa_id": "250788000001"} for _ in range(contacts)]
    inner = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "1555", "phone_number_id": "1"},
        "contacts": people,
        "messages": msgs,
        **value,
    }
    doc = {
        "object": "whatsapp_business_account",
        "entry": [{"id": "W", "changes": [{"value": inner, "field": "messages"}]}],
    }
    return json.dumps(doc).encode()


def largest(make: Callable[[int], bytes]) -> bytes:
    """The body with the most messages that stays under `LIMIT`."""
    lo, hi = 1, 2
    while len(make(hi)) < LIMIT:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if len(make(mid)) < LIMIT else (lo, mid)
    return make(lo)


def measure(raw: bytes) -> tuple[float, float | None, str]:
    best, stored, answer = float("inf"), None, "200"
    for _ in range(3):
        started = time.perf_counter()
        try:
            batch = parse_webhook(raw)
            stored = sum(len(m.body) for m in batch.messages) / 1e6
        except PayloadError:
            answer = "400"
        best = min(best, time.perf_counter() - started)
    return best * 1000, stored, answer


def main() -> None:
    bodies = {
        "3 MB of short texts, one contact": largest(lambda n: body(n, 1)),
        "1000 messages x 1000 contacts": body(1000, 1000),
        "2000 messages x 2000 contacts": body(2000, 2000),
        "20000 messages x 100 KB metadata": body(20000, 0, metadata={"pad": "x" * 100_000}),
    }
    print(
        f"{'shape':36} {'body MB':>8} | {'baseline ms':>11} {'stored MB':>9} {'answer':>6} |"
        f" {'now ms':>7} {'stored MB':>9} {'answer':>6}"
    )
    for name, raw in bodies.items():
        ms, stored, answer = measure(raw)
        b_ms, b_stored, b_answer = BASELINE[name]
        print(
            f"{name:36} {len(raw) / 1e6:8.2f} | {b_ms if b_ms is not None else '-':>11} "
            f"{b_stored if b_stored is not None else '-':>9} {b_answer:>6} | {ms:7.0f} "
            f"{stored if stored is not None else 0:9.1f} {answer:>6}"
        )


if __name__ == "__main__":
    main()
