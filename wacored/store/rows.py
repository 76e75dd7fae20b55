"""The store's rows as the actors hold them, and its errors (plain data, no I/O).

`NewRow` (an accepted update about to be committed), `Delivery` (a committed one on its way),
`AttemptRow`, `Outcome`, `DeadLetter`, `Retried`; the states and kinds the store knows; and the two
errors every implementation raises: `StoreUnavailable` (nothing of a request was stored) and
`SchemaError` (a database newer than this code).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

DEAD_LETTER_STATES = ("pending", "abandoned", "delivered", "replayed")
"""A dead letter's states: owed a retry, given up on (kept for an operator), delivered (by a retry, or
by the forwarder after a replay), or ``replayed``: its message was queued again (``wacored messages
replay``) and is the forwarder's until that delivery ends, when the entry becomes ``delivered``, or
``pending``/``abandoned`` again with a fresh retry budget. The retrier only ever takes ``pending``."""

ATTEMPT_KINDS = ("delivery", "dlq_retry")
"""An attempt made by the forwarder (a first delivery, or a replayed one) or by the DLQ retrier."""


class StoreUnavailable(Exception):
    """The store could not commit; nothing of the request was stored."""


class SchemaError(Exception):
    """The database was written by a newer wacored: this one must not touch it."""


@dataclass(frozen=True)
class NewRow:
    """An accepted update, routed, about to be committed."""

    key: str
    kind: str
    sender: str
    service: str
    reason: str
    target: str
    body: bytes
    request_id: str
    correlation_id: str
    traceparent: str
    received_at: float
    number: str = field(default="", kw_only=True)
    """The business number written to, as a number key (`numbers.py`): ``""`` is the default number."""
    probe: bool = field(default=False, kw_only=True)
    """A probe (`probe.py`): routed to `target`, stored as ``probe``, never delivered."""
    lane: int = field(default=0, kw_only=True)
    """The lane of `target` that delivers it (`core.delivery.lane_of` of the sender over the target's
    lane count), stored with the row so any worker holding the lane's lease reads it (schema v8)."""

    @property
    def routed(self) -> bool:
        """False for a message kept only to dedupe it (no target: stored ``unrouted``)."""
        return bool(self.target)

    @property
    def delivers(self) -> bool:
        """Whether the row goes to its target's forwarder once committed (stored ``queued``)."""
        return self.routed and not self.probe

    @property
    def initial_state(self) -> str:
        """The ``messages.state`` it is inserted with."""
        return "queued" if self.delivers else "probe" if self.probe else "unrouted"


@dataclass(frozen=True)
class Delivery(NewRow):
    """A committed update on its way to its target (a service, or the Graph API sender)."""

    id: int
    """The ``messages`` row id: commit order, which is delivery order."""

    @classmethod
    def from_row(cls, row_id: int, row: NewRow) -> Delivery:
        return cls(**vars(row), id=row_id)


@dataclass(frozen=True)
class AttemptRow:
    """One delivery attempt, as the ``attempts`` table keeps it."""

    message_id: int
    """The ``messages`` row id."""
    service: str
    number: int
    """1-based: the try within its delivery, or for a DLQ retry the retry's number."""
    kind: str
    """``delivery`` or ``dlq_retry`` (`ATTEMPT_KINDS`)."""
    started_at: float
    """Wall-clock time the attempt began."""
    duration_s: float
    status_code: int | None
    error: str
    """Empty when delivered; else the masked error (``HTTP 503: ...``, ``timeout (...)``)."""
    node: str
    """The process that made it: ``host-pid``."""


@dataclass(frozen=True)
class Outcome:
    """How a delivery ended: delivered, or dead-lettered with why and when to retry it."""

    message_id: int
    delivered: bool
    attempts: int
    at: float
    error: str = ""
    permanent: bool = False
    status_code: int | None = None
    target: str = ""
    key: str = ""
    reason: str = "transient"
    """Why it was dead-lettered: ``transient``, ``permanent``, ``breaker_open`` or ``internal_error``."""
    retry_at: float | None = None
    """When the DLQ retrier first tries it again (None: abandoned at once)."""
    tries: tuple[AttemptRow, ...] = ()
    """The attempts this delivery made, committed with it (and held with it while the store fails)."""


@dataclass(frozen=True)
class DeadLetter:
    """A pending dead letter the retrier is about to try again, with the message to deliver."""

    id: int
    attempts: int
    delivery: Delivery


@dataclass(frozen=True)
class Retried:
    """What one retry of a dead letter decided (see `deadletters.after_retry`)."""

    dead_letter_id: int
    message_id: int
    state: str
    """``delivered``, ``pending`` or ``abandoned``."""
    counted: bool
    """Whether the retry counts towards ``max_attempts`` (a breaker-blocked one does not)."""
    next_attempt_at: float | None
    at: float
    error: str = ""
    status_code: int | None = None
    reason: str | None = None
    """A new ``reason`` for the dead letter (``internal_error``), or None to keep it."""
    attempt: AttemptRow | None = None
    """The retry's attempt, None when none was made (breaker open, service gone, it raised)."""


def _delivery_columns(table: str = "") -> str:
    """The columns of a `Delivery`, in its field order; ids the schema lets be NULL (a row written by
    hand) read as empty strings, so a header is never None."""
    t = f"{table}." if table else ""
    return ", ".join(
        [
            *(f"{t}{c}" for c in ("key", "kind", "sender", "service", "reason", "target", "body")),
            *(f"COALESCE({t}{c}, '')" for c in ("request_id", "correlation_id", "traceparent")),
            f"{t}received_at",
            f"{t}id",
            f"COALESCE({t}number, '')",
        ]
    )


def _delivery(row: Sequence[object]) -> Delivery:
    """A `Delivery` from the columns of `_delivery_columns` (the number is keyword-only)."""
    return Delivery(*row[:-1], number=row[-1])  # type: ignore[arg-type]  # the columns' types are the fields'
