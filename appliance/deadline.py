"""TimeOut for every wait of a connection, with no timer per wait, and none per connection either.

`asyncio.timeout()` around each read and write makes a Timeout, a TimerHandle pushed on the loop's
heap (Python-level comparisons against every other pending timer) and a cancel, for waits that
last a fraction of a millisecond: the relay's busiest overhead at 1 KB a message
(docs/performance.md). Here a wait only writes down when it must end (`Deadline`), in the
`SharedDeadlines` of its loop, which keeps one TimerHandle for all of them: when it fires, it
calls `on_expiry` for the waits past their end and goes back on the heap for the earliest of the
others. So short waits cost a dict entry each, and the loop one timer per TimeOut period.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

#: A timer that fires this close to the end counts as on time (the loop runs timers a little
#: early, within its clock resolution).
_SLACK = 0.001


class Deadline:
    """The end of the current wait of one connection; `on_expiry` is called once it passes
    while the wait is still on."""

    __slots__ = ("_loop", "_on_expiry", "_shared", "_expire", "expired")

    def __init__(self, loop: asyncio.AbstractEventLoop, on_expiry: Callable[[], None]) -> None:
        self._loop = loop
        self._on_expiry = on_expiry
        self._shared = shared_deadlines(loop)
        self._expire = self._expired  # (bound once, not at each start)
        #: the current wait's time is up. A wait made of several awaits (a reply over several
        #: reads) must look: its end may pass just as one await was woken, between two of them.
        self.expired = False

    def start(self, seconds: float) -> None:
        """A wait begins that may last `seconds`."""
        self.expired = False
        self._shared.arm(self, self._loop.time() + seconds, self._expire)

    def stop(self) -> None:
        """The wait ended in time (or with an error of its own)."""
        self.expired = False
        self._shared.disarm(self)

    def _expired(self) -> None:
        self.expired = True
        self._on_expiry()

    def close(self) -> None:
        """The connection is gone: no more waits."""
        self._shared.disarm(self)


class Expiry:
    """What `asyncio.timeout()` does when its time is up, without its context manager (a
    Timeout and two coroutines per use, measured at 1 % of a 1 KB message each): `expire()`
    cancels the task; `timed_out()`, in that task's `except CancelledError`, says whether the
    cancellation was this expiry's (the caller then raises TimeoutError) or someone else's (it
    goes on), with asyncio.timeout's own test. `expire` is the `on_expiry` of a Deadline or of a
    SharedDeadlines entry."""

    __slots__ = ("_task", "_cancelling", "_expired")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self._task = task
        self._cancelling = task.cancelling()
        self._expired = False

    def expire(self) -> None:
        if not self._expired:
            self._expired = True
            self._task.cancel()

    def timed_out(self) -> bool:
        return self._expired and self._task.uncancel() <= self._cancelling


def current_expiry(loop: asyncio.AbstractEventLoop) -> Expiry:
    """An Expiry for the task running now on `loop`."""
    task = asyncio.current_task(loop)  # (with the loop: no get_running_loop, no getpid)
    assert task is not None, "not in a task"
    return Expiry(task)


_local = threading.local()


def shared_deadlines(loop: asyncio.AbstractEventLoop) -> SharedDeadlines:
    """The SharedDeadlines of `loop`: one per loop, kept per thread (a thread runs one loop at a
    time; one made for an earlier loop of this thread is dropped with that loop's waits)."""
    shared: SharedDeadlines | None = getattr(_local, "shared", None)
    if shared is None or shared.loop is not loop:
        shared = _local.shared = SharedDeadlines(loop)
    return shared


class SharedDeadlines:
    """The ends of many waits on one loop (every connection's, every scan's), one TimerHandle.

    A TimerHandle per wait, or per connection, is pushed on the loop's heap and left there
    cancelled, among the other sessions' cancelled ones, for the heap's comparisons (Python-level
    `TimerHandle.__lt__`) to step over until it is cleaned out: measured, far more than its own
    few calls. Here a wait writes down its end (`arm`), moves it, and forgets it (`disarm`); the
    one handle, when it fires, calls `on_expiry` for each wait past its end and is set again for
    the earliest left (or at once for an earlier end than the one it is set for).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._waits: dict[object, tuple[float, Callable[[], None]]] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0  # when the handle fires

    def arm(self, key: object, when: float, on_expiry: Callable[[], None]) -> None:
        """`key`'s wait ends at `when` (loop time): `on_expiry()` then, unless disarmed first."""
        self._waits[key] = (when, on_expiry)
        self._fire_by(when)

    def disarm(self, key: object) -> None:
        """`key`'s wait is over (the handle stays: it finds nothing to do, or sets itself again)."""
        self._waits.pop(key, None)

    def __len__(self) -> int:
        return len(self._waits)

    def _fire(self) -> None:
        self._handle = None
        now = self.loop.time()
        expired = [key for key, (when, _) in self._waits.items() if when - now <= _SLACK]
        try:
            for key in expired:
                entry = self._waits.pop(key, None)  # (an earlier on_expiry may have disarmed it)
                if entry is not None:
                    entry[1]()
        finally:  # one on_expiry that raises must not leave every other wait without a timer
            if self._waits:
                # (an on_expiry that armed again set the handle for its own end, maybe later)
                self._fire_by(min(when for when, _ in self._waits.values()))

    def _fire_by(self, when: float) -> None:
        """The handle fires at `when` at the latest: set (again) unless it is set earlier."""
        if self._handle is None or when < self._due:
            if self._handle is not None:
                self._handle.cancel()
            self._handle = self.loop.call_at(when, self._fire)
            self._due = when
