"""`EventLoop`: which asyncio event loop the daemon runs on, uvloop's or asyncio's own.

uvloop (libuv under asyncio's API) takes about a tenth off the CPU of a small message
(docs/performance.md); it is an optional accelerator, so the daemon runs without it. Only the
start-up of the loop knows which one runs (`run`): every other module sees an asyncio loop.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import importlib
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

#: What an admin is told when `EventLoop: uvloop` is asked for and cannot be had.
INSTALL_HINT = ("install it (Debian: apt-get install python3-uvloop; a venv: pip install "
                "'clamsmtp[uvloop]'), or use EventLoop: auto or asyncio")


class EventLoop(enum.StrEnum):
    """`EventLoop`: auto is uvloop when it can be imported, else asyncio."""

    AUTO = "auto"
    UVLOOP = "uvloop"
    ASYNCIO = "asyncio"


@functools.cache
def uvloop_problem() -> str | None:
    """Why uvloop cannot run here (not installed, or broken), or None when it can."""
    try:
        importlib.import_module("uvloop")
    except ImportError as error:
        if error.name == "uvloop":
            return "uvloop is not installed"
        return f"uvloop cannot be imported ({error})"
    return None


def resolve(choice: EventLoop) -> EventLoop:
    """`auto` made concrete: uvloop when it imports, else asyncio; the others as they are."""
    if choice is EventLoop.AUTO:
        return EventLoop.ASYNCIO if uvloop_problem() else EventLoop.UVLOOP
    return choice


def prepare(choice: EventLoop) -> None:
    """Import the chosen loop's library now, before the privilege drop: the interpreter's files
    may be closed to `User` (process.FIRST_USE_MODULES says why). No loop is made here, so this
    may run in the parent of workers, before the fork."""
    if resolve(choice) is EventLoop.UVLOOP:
        importlib.import_module("uvloop")


def version(choice: EventLoop) -> str:
    """The loop as the start-up log names it, e.g. `uvloop 0.17.0`, `asyncio`."""
    if resolve(choice) is EventLoop.UVLOOP:
        return f"uvloop {importlib.import_module('uvloop').__version__}"
    return "asyncio"


def _factory(choice: EventLoop) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The new-loop function for asyncio.Runner; None: asyncio's default (its own loop, and
    the policy's child watcher, exactly as asyncio.run makes it)."""
    if resolve(choice) is EventLoop.UVLOOP:
        factory: Callable[[], asyncio.AbstractEventLoop] = (
            importlib.import_module("uvloop").new_event_loop)
        return factory
    return None


def run(main: Coroutine[Any, Any, T], choice: EventLoop) -> T:
    """asyncio.run(main) on the chosen loop, made here, in this process (a worker makes its own
    after the fork: a loop never crosses a fork). The global event loop policy is left alone."""
    with asyncio.Runner(loop_factory=_factory(choice)) as runner:
        return runner.run(main)
