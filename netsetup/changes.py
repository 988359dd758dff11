"""The one path every kernel change takes, shared by both backends and the policy routing.

Each of them owns named objects (chains, a table, an ip rule and a route) and changes them one
operation at a time; an operation prints as the command that does the same.  What they have in
common lives here, as sshuttle's single ``ipt()`` does: ``_apply(op)`` logs the operation,
counts it, honours ``--dry-run``, makes it through the subclass's ``_make`` (the only line that
talks to the kernel) and names it in ``OperationFailed`` when it fails.  No fault hook: the tests
inject faults by patching ``_make`` in their own process (tests/netsetup/faultinject.py), so
nothing an admin's environment holds can make the firewall tool fail on purpose.
``_remove`` is a removal whose object may already be gone; ``_each`` runs steps that must not
skip each other (one per address family).  ``enable_in_order`` installs several of them and
undoes them all when a change that is not atomic fails, so the firewall is never left half
configured.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, Generic, TypeVar

from netsetup.errors import NetsetupError, OperationFailed
from netsetup.plan import RedirectPlan

Op = TypeVar("Op")
Item = TypeVar("Item")


def print_line(line: str) -> None:
    print(line, flush=True)


class KernelChanges(ABC, Generic[Op]):
    """Objects of ours in one kernel mechanism, changed only through ``_apply``."""

    name: ClassVar[str] = ""
    #: True: a failed change changed nothing (one transaction), so there is nothing to roll back
    atomic: ClassVar[bool] = False

    def __init__(self, *, dry_run: bool = False, log: Callable[[str], None] = print_line):
        self.dry_run = dry_run
        self.log = log
        self.changes = 0  # operations passed to _apply (made, or shown by a dry run)

    @abstractmethod
    def enable(self, plan: RedirectPlan) -> None:
        """Install the plan's objects; starts by removing this plan's own."""

    @abstractmethod
    def disable(self, plan: RedirectPlan) -> None:
        """Remove this plan's own objects (all families in the plan); never anything else."""

    @abstractmethod
    def _make(self, op: Op) -> None:
        """Make ``op`` in the kernel (the one line that talks to it); raise on failure."""

    def _shown(self, op: Op) -> Sequence[str]:
        """The lines logged for ``op`` before it is made (and all a dry run does)."""
        return (f"  {op}",)

    def _apply(self, op: Op) -> None:
        """Log ``op``, then (unless dry run) make it, or raise OperationFailed naming it."""
        for line in self._shown(op):
            self.log(line)
        self.changes += 1
        if self.dry_run:
            return
        try:
            self._make(op)
        except NetsetupError:
            raise
        except Exception as error:  # IPTCError, NetlinkError, OSError... from the libraries
            raise OperationFailed(op, self._reason(error)) from error

    def _reason(self, error: Exception) -> str:
        """The words of a library's exception, for OperationFailed."""
        return str(error) or type(error).__name__

    def _already_gone(self, op: Op, error: OperationFailed) -> bool:
        """Whether a failed removal means its object was gone already (nothing to do)."""
        return False

    def _remove(self, op: Op) -> None:
        """``_apply`` a removal; if its object vanished meanwhile, say so and go on."""
        try:
            self._apply(op)
        except OperationFailed as error:
            if not self._already_gone(op, error):
                raise
            self.log(f"  (ignored: {error.reason})")

    def _each(self, items: Iterable[Item], step: Callable[[Item], None]) -> None:
        """``step(item)`` for every item, each in its own try: a failure in one does not skip
        the others; the first failure is raised once all have run."""
        first: NetsetupError | None = None
        for item in items:
            try:
                step(item)
            except NetsetupError as error:
                first = first or error
        if first is not None:
            raise first

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release helpers (worker processes, sockets); not used afterwards."""


def enable_in_order(
    parts: Sequence[KernelChanges[Any]],
    plan: RedirectPlan,
    *,
    log: Callable[[str], None],
    warn: Callable[[str], None],
) -> None:
    """``enable`` each part in order (the policy routing before the rules that need it).

    When a part that is not atomic fails, it may have made some of its changes: every part is
    disabled again, last first (rolled back), so no half-configured firewall stays.  When an
    atomic part fails, the kernel took its transaction whole or not at all and the parts
    before it were only re-applied: nothing is undone, since a rollback would delete the
    earlier, working installation too.
    """
    for part in parts:
        try:
            part.enable(plan)
        except OperationFailed as error:
            if part.atomic:
                raise  # one transaction, aborted by the kernel: nothing changed
            _roll_back(parts, plan, log, warn)
            raise OperationFailed(error.op, f"{error.reason} (rolled back)") from error
        except BaseException as error:
            if not part.atomic:
                _roll_back(parts, plan, log, warn)
            elif isinstance(error, KeyboardInterrupt):
                warn(
                    f"interrupted during one {part.name} transaction, "
                    "applied whole or not at all; nothing is rolled back: state unknown: "
                    "run status"
                )
            raise


def _roll_back(
    parts: Sequence[KernelChanges[Any]],
    plan: RedirectPlan,
    log: Callable[[str], None],
    warn: Callable[[str], None],
) -> None:
    log("enable failed; rolling back (removing our own chains, ip rules and routes):")
    for part in reversed(parts):
        try:
            part.disable(plan)
        except NetsetupError as undo:
            warn(f"rollback incomplete: {undo}")
