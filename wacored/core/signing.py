"""Standard Webhooks signatures for what wacored forwards (pure, no I/O).

Each downstream service verifies wacored with a secret of its own, never with Meta's app secret: a
service holding the app secret could forge webhooks that wacored's own ``/webhook`` accepts. The
scheme is the open Standard Webhooks one (standardwebhooks.com, as Svix and others sign):

- ``webhook-id``: the message's id (the same value as ``Idempotency-Key``);
- ``webhook-timestamp``: Unix seconds at sending;
- ``webhook-signature``: ``v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>``, one
  space-separated entry per configured secret, so a service rotates by adding its new secret first
  and removing the old one once it verifies with the new one.

A secret is ``whsec_`` + base64 of the key bytes (24 to 64 bytes, as the specification recommends).

Error handling:
    `secret_problem` says what is wrong with a configured secret (config validation refuses it);
    `key_of` raises `ValueError` for a secret that `secret_problem` would refuse.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Sequence

PREFIX = "whsec_"
MIN_KEY_BYTES = 24
MAX_KEY_BYTES = 64
NEW_KEY_BYTES = 32


def secret_problem(secret: str) -> str | None:
    """Why `secret` is not a usable Standard Webhooks secret, or None. Never quotes the secret."""
    if not secret.startswith(PREFIX):
        return f"must start with {PREFIX!r} (make one with `wacored secrets new`)"
    try:
        key = base64.b64decode(secret.removeprefix(PREFIX), validate=True)
    except (binascii.Error, ValueError):
        return f"what follows {PREFIX!r} must be base64"
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        return f"must hold {MIN_KEY_BYTES} to {MAX_KEY_BYTES} key bytes, holds {len(key)}"
    return None


def key_of(secret: str) -> bytes:
    """The key bytes of a valid secret."""
    if problem := secret_problem(secret):
        raise ValueError(problem)
    return base64.b64decode(secret.removeprefix(PREFIX), validate=True)


def new_secret() -> str:
    """A fresh secret: 32 random bytes."""
    return PREFIX + base64.b64encode(secrets.token_bytes(NEW_KEY_BYTES)).decode()


def signature(keys: Sequence[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: one ``v1,`` entry per key, in the order given."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join("v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode() for key in keys)
