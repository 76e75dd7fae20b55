"""Probes: signed test messages that are stored and routed like any message, and never forwarded.

``deploy/verify.sh`` proves after a deploy that a message signed with the app secret is accepted,
stored and routed. A real message would then be forwarded (or answered with the home menu), and one
the downstream refuses ends as an abandoned dead letter that fires ``WacoredDeadLettersAbandoned``.
A probe is that message marked so that ingress stores it in the final state ``probe`` instead of
``queued``: its 200 shows the route it took, no forwarder, retrier or service ever sees it, and the
reaper drops it with the other finished rows.

The mark is the message's own id: a wamid starting with `PREFIX`. Why there and not in a header:
the wamid is inside the body, which ``X-Hub-Signature-256`` covers, so only a holder of the app
secret can make a probe (an unsigned or wrongly signed POST is refused 401 before it is parsed), and
nobody can turn a genuine message of Meta's into a probe by adding something to the request on its
way (a header is not signed: one replayed with an added header would be dropped silently). It is per
message, so a batch mixing probes and real messages is routed message by message. Meta's wamids are
``wamid.`` followed by base64, which never holds a ``.``; ``WACORED_PROBE.`` therefore cannot be
the start of one of them.

A probe changes no state that real traffic reads: its route uses the sender's session but does not
start, refresh or end it (verify.sh may send from an operator's own number). It does count in the
sender's rate-limit window, like any message of an accepted POST.
"""

from __future__ import annotations

PREFIX = "wamid.WACORED_PROBE."
"""A probe's wamid starts with this (the rest makes it unique, so it is never a duplicate)."""


def is_probe(wamid: str) -> bool:
    """Whether the message of `wamid` is a probe (see the module docstring for why this is safe)."""
    return wamid.startswith(PREFIX) and len(wamid) > len(PREFIX)
