"""Log lines as one JSON object per line on stderr (journald keeps them as they are).

Fields: ``timestamp``, ``level``, ``logger``, ``event`` and ``msg``, plus the ids that apply: those a
call passes in ``extra`` (message_id, service, ...) and those bound to the current task with `bound`
(ingress binds request_id and correlation_id for the whole request).

Privacy, enforced here rather than trusted to every call site: a phone-number-like field (``sender``,
``phone``, ``to``, ``recipient``, ``wa_id``, ...) is masked to its first 4 and last 3 characters, and
so is every run of 8 or more digits in the message and in free-text fields (``error``, ``detail``:
a downstream's answer may quote a number). Fields that could hold message text or credentials
(``text``, ``body``, ``token``, ``secret``, ``authorization``, ...) are dropped whole. Call sites still
never pass them: this is the net, not the rule.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any

from ..core.untrusted import mask_digits, mask_phone

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_NO_IDS: Mapping[str, str] = MappingProxyType({})
_IDS: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar("wacored_log_ids", default=_NO_IDS)

PHONE_FIELDS = frozenset(
    {"sender", "phone", "to", "recipient", "recipient_id", "from", "wa_id", "msisdn", "from_user_id", "bsuid"}
)
SECRET_FIELDS = frozenset(
    {
        "text",
        "body",
        "caption",
        "token",
        "access_token",
        "app_secret",
        "secret",
        "verify_token",
        "authorization",
        "password",
        "signature",
        "payload",
    }
)
FREE_TEXT_FIELDS = frozenset({"error", "detail", "reason_text"})
REDACTED = "[redacted]"


def scrub(key: str, value: Any) -> Any:
    """What of `value` may be logged under `key` (`REDACTED` for fields that must never be)."""
    name = key.lower()
    if name in SECRET_FIELDS or name.endswith(("_token", "_secret")):
        return REDACTED
    if name in PHONE_FIELDS and value is not None:
        return mask_phone(str(value))
    if isinstance(value, str) and (name in FREE_TEXT_FIELDS or name == "msg"):
        return mask_digits(value)
    return value


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", None) or record.name,
            "msg": mask_digits(record.getMessage()),
        }
        for key, value in (*_IDS.get().items(), *vars(record).items()):
            if key not in _STANDARD and key not in line:
                line[key] = scrub(key, value)
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


@contextmanager
def bound(**ids: str) -> Iterator[None]:
    """Add `ids` to every line logged by the current task (and tasks it starts) inside the block."""
    token = _IDS.set({**_IDS.get(), **ids})
    try:
        yield
    finally:
        _IDS.reset(token)


JOURNALD_PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}
"""syslog priorities: journald reads a leading ``<N>`` as the line's priority, so ``journalctl -p
warning`` shows warnings and worse."""


class JournaldFormatter(JsonFormatter):
    """A JSON line behind journald's ``<N>`` priority prefix (used when stderr is the journal)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{JOURNALD_PRIORITY.get(record.levelname, 6)}>{super().format(record)}"


def setup(level: str = "info", *, journald: bool = False) -> None:
    """JSON lines on stderr at `level`; with `journald` (systemd set ``JOURNAL_STREAM``: the caller
    reads the environment, not this module), each line carries its priority prefix."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournaldFormatter() if journald else JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)
