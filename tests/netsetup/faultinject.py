"""Faults injected into clamsmtp-netsetup from outside the product (tests only).

The product reads no fault hook from anywhere: an admin's environment cannot make the firewall
tool fail on purpose.  The tests inject faults here instead, by patching, in the process that
runs netsetup, the one step every kernel change takes (``KernelChanges._make``, called by
``_apply`` after it has logged and counted the change):

- ``fail_after=N``: the change after N successful ones fails, once per KernelChanges object
  (the rollback after it must work).  A change that is not atomic fails before it is made,
  which is what a refusing kernel does; an atomic one (nft) is made with a statement the
  kernel rejects appended (``SPOILERS``), so the kernel really aborts the whole transaction.
- ``delay=S``: S seconds of sleep after each change that succeeded, so that a test that kills
  ``enable`` at change N knows change N+1 has not begun.

In-process (unit tests): ``inject(monkeypatch, fail_after=2)`` before the objects are made.
As a command (namespace tests), instead of ``python -m netsetup.cli``:

    python tests/netsetup/faultinject.py [--fail-after N] [--change-delay S] NETSETUP-ARGS...
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from typing import Any

from netsetup.backends.nft import NftBackend
from netsetup.changes import KernelChanges
from netsetup.errors import OperationFailed

INJECTED = "injected failure (test only)"
#: A statement nft rejects after taking the whole transaction before it.
NFT_INJECTED_FAILURE = "delete table ip clamsmtp-injected-failure"


def _spoil_nft(tx: Any) -> Any:
    return dataclasses.replace(tx, script=tx.script + NFT_INJECTED_FAILURE + "\n")


#: For each atomic KernelChanges class: its operation made so that the kernel refuses it.
SPOILERS: dict[type, Callable[[Any], Any]] = {NftBackend: _spoil_nft}


class Faults:
    """The injection of one KernelChanges object (the old per-object counters)."""

    def __init__(self, part: KernelChanges[Any], fail_after: int | None, delay: float):
        self.part = part
        self.fail_after = fail_after
        self.delay = delay
        self.made = 0  # changes that succeeded (fail_after counts these)

    def make(self, op: Any) -> None:
        real = type(self.part)._make  # looked up now: a test may have replaced it meanwhile
        if self.fail_after is not None and self.made >= self.fail_after:
            self.fail_after = None  # once: the rollback after it must work
            if not self.part.atomic:
                raise OperationFailed(op, INJECTED)
            spoil = next((f for cls, f in SPOILERS.items() if isinstance(self.part, cls)), None)
            if spoil is None:
                raise AssertionError(f"no SPOILERS entry for atomic {type(self.part).__name__}")
            try:
                real(self.part, spoil(op))
            except OperationFailed as error:
                raise OperationFailed(op, f"{INJECTED}: {error.reason}") from error
            raise AssertionError(f"the kernel took the spoiled {op}")
        real(self.part, op)
        self.made += 1
        if self.delay:
            time.sleep(self.delay)


def patch(setattr_: Callable[[object, str, object], None], *, fail_after: int | None = None,
          delay: float = 0.0) -> None:
    """Every KernelChanges made from now on gets the faults (``setattr_``: monkeypatch's, or
    the builtin for a process of its own)."""
    real_init = KernelChanges.__init__

    def init(self: KernelChanges[Any], *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        # an instance attribute: wins over every subclass's _make, which it then calls
        self._make = Faults(self, fail_after, delay).make  # type: ignore[method-assign]

    setattr_(KernelChanges, "__init__", init)


def inject(monkeypatch: Any, *, fail_after: int | None = None, delay: float = 0.0) -> None:
    """Faults for this test's KernelChanges objects (made after the call); undone after it."""
    patch(monkeypatch.setattr, fail_after=fail_after, delay=delay)


def argv(*args: str, fail_after: int | None = None, delay: float = 0.0) -> list[str]:
    """The command line that runs ``clamsmtp-netsetup ARGS`` with these faults."""
    faults = [] if fail_after is None else ["--fail-after", str(fail_after)]
    faults += ["--change-delay", str(delay)] if delay else []
    return [sys.executable, __file__, *faults, *args]


def main(args: list[str]) -> int:
    fail_after: int | None = None
    delay = 0.0
    while args[:1] in (["--fail-after"], ["--change-delay"]):
        option, value, args = args[0], args[1], args[2:]
        if option == "--fail-after":
            fail_after = int(value)
        else:
            delay = float(value)
    patch(setattr, fail_after=fail_after, delay=delay)
    from netsetup import cli

    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
