"""TimeOut for every wait of one connection, with one timer per connection instead of one per wait.

`asyncio.timeout()` around each read and write makes a Timeout, a TimerHandle pushed on the loop's
heap (Python-level comparisons against every other pending timer) and a cancel, for waits that
last a fraction of a millisecond: the relay's busiest overhead at 1 KB a message
(docs/performance.md). Here a wait only writes down when it must end; the one TimerHandle, when it
fires, either finds that the wait has not reached its end yet (and goes back on the heap for the
rest) or calls `on_expiry`. So a connection whose waits are short costs one timer per TimeOut
period, not one per wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

#: A timer that fires this close to the end counts as on time (the loop runs timers a little
#: early, within its clock resolution).
_SLACK = 0.001


class Deadline:
    """The end of the current wait of one connection; `on_expiry` is called once it passes
    while the wait is still on."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_expiry: Callable[[], None]) -> None:
        self._loop = loop
        self._on_expiry = on_expiry
        self._when = 0.0
        self._active = False
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0  # when the handle fires (its when(), without the method call)

    def start(self, seconds: float) -> None:
        """A wait begins that may last `seconds`."""
        when = self._loop.time() + seconds
        self._when = when
        self._active = True
        handle = self._handle
        if handle is None:
            self._handle = self._loop.call_at(when, self._fire)
            self._due = when
        elif self._due > when:  # (a shorter wait than the one the timer was set for)
            handle.cancel()
            self._handle = self._loop.call_at(when, self._fire)
            self._due = when

    def stop(self) -> None:
        """The wait ended in time (or with an error of its own)."""
        self._active = False

    def close(self) -> None:
        """The connection is gone: no more waits."""
        self._active = False
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        if not self._active:
            return  # re-armed by the next start()
        if self._when - self._loop.time() > _SLACK:  # the wait began after the timer was set
            self._handle = self._loop.call_at(self._when, self._fire)
            self._due = self._when
            return
        self._active = False
        self._on_expiry()


class SharedDeadlines:
    """The ends of many waits on one loop (scans in flight on one clamd), with one TimerHandle.

    `asyncio.timeout()` per scan pushes a TimerHandle on the loop's heap and leaves it there
    cancelled, among the other sessions' cancelled ones, for the heap's comparisons (Python-level
    `TimerHandle.__lt__`) to step over until it is cleaned out: 2.7 % of the instructions of a 1 KB
    message. Here a wait writes down its end (`arm`), moves it (only ever later: a wait's TimeOut
    counts again from each operation) and forgets it (`disarm`); the one handle, when it fires,
    calls `on_expiry` for each wait past its end and is set again for the earliest left.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._waits: dict[object, tuple[float, Callable[[], None]]] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0  # when the handle fires

    def arm(self, key: object, when: float, on_expiry: Callable[[], None]) -> None:
        """`key`'s wait ends at `when` (loop time): `on_expiry()` then, unless disarmed first."""
        self._waits[key] = (when, on_expiry)
        if self._handle is None or when < self._due:
            if self._handle is not None:
                self._handle.cancel()
            self._handle = self.loop.call_at(when, self._fire)
            self._due = when

    def disarm(self, key: object) -> None:
        """`key`'s wait is over (the handle stays: it finds nothing to do, or sets itself again)."""
        self._waits.pop(key, None)

    def __len__(self) -> int:
        return len(self._waits)

    def _fire(self) -> None:
        self._handle = None
        now = self.loop.time()
        expired = [key for key, (when, _) in self._waits.items() if when - now <= _SLACK]
        for key in expired:
            _, on_expiry = self._waits.pop(key)
            on_expiry()
        if self._waits and self._handle is None:  # (an on_expiry may have armed again)
            when = min(when for when, _ in self._waits.values())
            self._handle = self.loop.call_at(when, self._fire)
            self._due = when
