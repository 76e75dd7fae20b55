"""Bounded reads: how many requests may be in flight, how long a webhook body may take to arrive, and
how many body bytes may be held before anyone has proven who sent them.

A webhook POST is unverified until its whole body is in hand: the signature covers the raw bytes.
Until then the daemon holds memory and a file descriptor for a caller it knows nothing about. The
finding this module answers: 100 bodies stalled just under ``max_body_bytes`` took the daemon's RSS
from 59 to 372 MB, and with a low descriptor limit ``accept`` failed (EMFILE), so Meta's own POSTs and
``/health`` timed out. Three bounds, all read from the current config at each use (a reload applies
at the next request):

- ``[server] read_timeout_s``: a deadline for the whole body, set once when the read begins, so a
  trickle (1 byte/s) cannot extend it. Ingress answers 408 when it passes.
- ``[server] max_connections``: requests in flight, counted in the ASGI app. A newcomer arriving at
  the cap sheds the *oldest* unverified read (503) instead of being refused: whoever holds the cap
  with stalled bodies is displaced by each new caller, and Meta's POST, which completes its body in
  milliseconds, is never the oldest for long. Only when nothing is sheddable (every request in
  flight is past verification, or not a webhook read) is the newcomer refused, 503.
- ``[server] max_unverified_bytes``: the body bytes held across every unverified read. A chunk that
  would take the total past the budget sheds the oldest *other* unverified reads until it fits (the
  budget is at least ``max_body_bytes``, so one read alone always fits). Shedding the oldest rather
  than refusing the newest keeps the daemon taking new requests, a signed one included, while an
  attacker's stalled bodies fill the budget: each of them is dropped in turn.

Why in the app and not per TCP connection: hypercorn 0.18 builds its listeners inside
``worker_serve`` and hands each accepted stream straight to its ``TCPServer``; it has no seam to count
or close connections short of copying that function. What the app cannot see is bounded by hypercorn
itself: a connection that has not sent a whole request head (idle, or a slowloris on headers) is
closed after ``keep_alive_timeout`` (its idle timer runs until the head is parsed), and a head is at
most ``h11_max_incomplete_size`` bytes. The daemon also raises its soft ``RLIMIT_NOFILE`` at start so
the cap, not the descriptor limit, is what binds (`ensure_fd_limit`).

Error handling:
    A shed read or a passed deadline is not an error here: `Read.outcome` says which, and ingress
    answers it (503 or 408, ``Connection: close``, counted and logged). `ensure_fd_limit` logs, never
    raises, when the limit cannot be raised.

Cancellation:
    Each unverified read runs inside its own `trio.CancelScope` (deadline = the read deadline);
    shedding cancels that scope only, so the shed request still answers. Nothing here starts a task.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from itertools import count

import trio

from ..config import ServerConfig

log = logging.getLogger(__name__)

FD_HEADROOM = 256
"""Descriptors beyond ``max_connections``: the listener, SQLite files and their WAL, connections to the
services (lanes × services), idle keep-alive connections the app does not count, log files."""


class Outcome(Enum):
    READING = "reading"
    DONE = "done"
    TIMED_OUT = "read_timeout"
    SHED = "shed"


@dataclass(eq=False)
class Read:
    """One webhook body being read (unverified until it is whole)."""

    seq: int
    scope: trio.CancelScope
    size: int = 0
    outcome: Outcome = Outcome.READING


@dataclass
class Admission:
    """The daemon's bounded-reads state (see the module docstring); one per daemon, in `Runtime`."""

    in_flight: int = 0
    """HTTP requests being handled, every path (unlike `Runtime.in_flight`, counted while draining too)."""
    unverified_bytes: int = 0
    reads: dict[int, Read] = field(default_factory=dict)
    """Unverified reads by arrival, oldest first (dicts keep insertion order)."""
    _seq: Iterator[int] = field(default_factory=count)

    def admit(self, server: ServerConfig) -> bool:
        """Count a new request in: True, after shedding the oldest unverified read when at the cap;
        False when at the cap with nothing to shed (the caller refuses the request, uncounted)."""
        if self.in_flight >= server.max_connections and not self._shed_oldest(exclude=None):
            return False
        self.in_flight += 1
        return True

    def leave(self) -> None:
        self.in_flight -= 1

    @contextmanager
    def reading(self, timeout_s: float) -> Iterator[Read]:
        """An unverified read, cancelled when `timeout_s` has passed since now or when it is shed;
        afterwards its `outcome` says which (``DONE`` when the body was read whole)."""
        read = Read(next(self._seq), trio.CancelScope(deadline=trio.current_time() + timeout_s))
        self.reads[read.seq] = read
        try:
            with read.scope:
                yield read
        finally:
            self._forget(read)
        if read.scope.cancelled_caught and read.outcome is Outcome.READING:
            read.outcome = Outcome.TIMED_OUT
        elif read.outcome is Outcome.READING:
            read.outcome = Outcome.DONE

    def grow(self, read: Read, n: int, budget: int) -> None:
        """Account `n` more buffered bytes to `read`, first shedding the oldest other reads while the
        total would pass `budget`. A read shed earlier (its scope is cancelled) is not counted again."""
        if read.outcome is not Outcome.READING:
            return
        while self.unverified_bytes + n > budget and self._shed_oldest(exclude=read):
            pass
        read.size += n
        self.unverified_bytes += n

    def _shed_oldest(self, exclude: Read | None) -> bool:
        victim = next((r for r in self.reads.values() if r is not exclude), None)
        if victim is None:
            return False
        victim.outcome = Outcome.SHED
        victim.scope.cancel()
        # Its bytes are freed once its task unwinds, a moment later; counted free now so the reader
        # that shed it goes on.
        self._forget(victim)
        return True

    def _forget(self, read: Read) -> None:
        if self.reads.pop(read.seq, None) is not None:
            self.unverified_bytes -= read.size


def ensure_fd_limit(max_connections: int) -> None:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard one when it is below ``max_connections`` plus
    headroom, so the connection cap binds before ``accept`` fails with EMFILE; logged either way."""
    want = max_connections + FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning(
            "could not raise the open-files limit",
            extra={"event": "fd_limit_unchanged", "soft": soft, "hard": hard, "wanted": want, "error": str(exc)},
        )
        return
    reached = hard == resource.RLIM_INFINITY or hard >= want
    log.log(
        logging.INFO if reached else logging.WARNING,
        "raised the open-files limit",
        extra={"event": "fd_limit_raised", "soft": soft, "now": hard, "wanted": want},
    )
