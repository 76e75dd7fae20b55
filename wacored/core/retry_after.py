"""A downstream's ``Retry-After``: when it asks to be tried again (pure, no I/O; `now` passed in).

Honoured on a 429 or 503 only (RFC 9110 gives it meaning there), in first deliveries and dead-letter
retries alike. Both of its forms are read: delay-seconds (``120``) and an HTTP date
(``Wed, 21 Oct 2026 07:28:00 GMT``). The wait is capped by ``[forwarding] retry_after_max_s``
(default 300): a service cannot park a lane, or a dead letter, for longer than the operator allows.
A value that is neither form, or is not ASCII, is ignored: the usual backoff applies.
"""

from __future__ import annotations

from email.utils import parsedate_to_datetime

HONOURED = frozenset({429, 503})
MAX_LENGTH = 64
"""A longer value is not a delay nor a date; it is not parsed at all."""


def retry_after_s(status: int, value: str | None, now: float, cap_s: float) -> float | None:
    """Seconds to wait before the next attempt, as the service asked; None when it did not ask."""
    if status not in HONOURED or not value or len(value) > MAX_LENGTH or not value.isascii():
        return None
    value = value.strip()
    if value.isdigit():
        wait = float(int(value))
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            return None  # RFC 9110 dates are GMT; a date without a zone is not one
        wait = max(0.0, when.timestamp() - now)
    return min(wait, cap_s)
