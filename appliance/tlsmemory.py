"""Next hops that just showed they offer no STARTTLS: a client that says HELO skips the probe.

With OutTLS: may the relay tries STARTTLS at the client's first HELO/EHLO. A client's EHLO is
itself the probe; a client's HELO is not (its reply lists no extensions), so the relay first
sends the next hop an EHLO in the client's name and, when that shows no STARTTLS, the client's
HELO: one round trip more per session, for every session of such a client (smtp-source and
many small senders say HELO). This remembers, for `MEMORY_SECONDS`, that a destination offered
no STARTTLS; meanwhile the relay sends a HELO client's HELO at once, as OutTLS: none would.
Never used for OutTLS: encrypt or verify, which must see STARTTLS every time. Why this shape:
docs/dev/tlsmemory.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .addresses import Address

#: How long "no STARTTLS there" is believed: a next hop that starts offering it is used with
#: TLS within this many seconds (at once after a SIGHUP, which starts with an empty memory).
MEMORY_SECONDS = 60.0
#: Destinations remembered at most (TransparentProxy: one per server the clients reach); past
#: it the oldest entry goes.
MAX_REMEMBERED = 1024


class ClearNextHops:
    """Destinations whose last EHLO reply offered no STARTTLS, and until when that holds."""

    def __init__(self, seconds: float = MEMORY_SECONDS, limit: int = MAX_REMEMBERED,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.limit = limit
        self._clock = clock
        self._until: dict[Address, float] = {}

    def remember(self, destination: Address) -> None:
        """Its EHLO reply just offered no STARTTLS (or it refused EHLO for good, 5xx)."""
        self._until.pop(destination, None)  # (re-inserted last: the oldest go first)
        self._until[destination] = self._clock() + self.seconds
        if len(self._until) > self.limit:
            del self._until[next(iter(self._until))]

    def forget(self, destination: Address) -> None:
        """It offered STARTTLS: every session tries it again."""
        self._until.pop(destination, None)

    def __contains__(self, destination: Address) -> bool:
        """It offered no STARTTLS less than `seconds` ago."""
        until = self._until.get(destination)
        if until is None:
            return False
        if self._clock() < until:
            return True
        del self._until[destination]
        return False

    def __len__(self) -> int:
        return len(self._until)
