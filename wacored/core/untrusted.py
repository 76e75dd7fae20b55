"""What wacored makes of values it does not control, before they leave the process (pure, no I/O).

Ids from a signed webhook become headers (``Idempotency-Key``), log fields, span attributes and
store keys; bytes from a downstream's error answer become log lines, span statuses and the admin
API's ``error``. Neither is trusted because it was signed or came from "our" service: an id is
checked once, at parse time, and an excerpt is made safe once, where it is read.

- `id_problem`: an id that leaves wacored is visible ASCII (``!`` to ``~``), at most `MAX_ID_LENGTH`
  characters. Anything else could not be sent as an HTTP header at all (a non-ASCII or control
  character makes httpx raise while building the request) or could split a log line.
- `excerpt`: a downstream's bytes as text: UTF-8 with replacement whatever charset the service names
  (a charset such as ``base64`` makes Python's codec lookup raise), control characters replaced,
  phone-number-like digit runs masked, cut to a bounded length.
- `token`: a short header value of a downstream's (``Content-Encoding``) fit to quote.
"""

from __future__ import annotations

import re

MAX_ID_LENGTH = 256
"""Real wamids are about 60 characters, status ids the same; 256 leaves room without letting an id
become a body."""
EXCERPT = 200
"""Characters of a downstream's answer kept with a failed attempt: enough to tell what it said."""
TOKEN = 40

_VISIBLE_ASCII = re.compile(r"[!-~]+")
_DIGITS = re.compile(r"\d{8,}")


def mask_phone(value: str) -> str:
    """``250788000001`` -> ``2507****001``; too short to keep 7 characters of -> ``****``."""
    return f"{value[:4]}****{value[-3:]}" if len(value) > 7 else "****"


def mask_digits(text: str) -> str:
    """Every run of 8 or more digits in `text` masked like a phone number (logs use it too)."""
    return _DIGITS.sub(lambda m: mask_phone(m.group()), text)


def id_problem(value: str) -> str | None:
    """Why `value` cannot be an id that leaves wacored, or None when it can."""
    if len(value) > MAX_ID_LENGTH:
        return f"longer than {MAX_ID_LENGTH} characters"
    if not _VISIBLE_ASCII.fullmatch(value):
        return "not printable ASCII (letters, digits and punctuation, no spaces or control characters)"
    return None


def clean(text: str, limit: int = EXCERPT) -> str:
    """`text` on one line, every unprintable character (controls, line and paragraph separators,
    bidirectional overrides) replaced, digit runs masked, at most `limit` characters (cut with '…')."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else "\N{REPLACEMENT CHARACTER}" for c in text)
    text = mask_digits(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def excerpt(raw: bytes, limit: int = EXCERPT) -> str:
    """The head of a downstream's answer as safe text (see the module docstring)."""
    # Decoding at most 4 bytes a character is enough for `limit` characters.
    return clean(raw[: limit * 4].decode("utf-8", "replace"), limit)


def token(value: str, limit: int = TOKEN) -> str:
    """A short header value (``Content-Encoding``) fit to quote."""
    return clean(value, limit)
