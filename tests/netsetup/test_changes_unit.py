"""The one apply path (netsetup.changes): what every backend and the policy routing share.

A small in-memory KernelChanges stands in for a mechanism, so these tests read as the exact
ordered list of what was made, shown and undone, whatever the mechanism.
"""

from __future__ import annotations

import faultinject
import pytest
from netsetup_fakes import PLAN

from netsetup.changes import KernelChanges, enable_in_order
from netsetup.errors import NetsetupError, OperationFailed
from netsetup.plan import RedirectPlan


class Recorder(KernelChanges[str]):
    """Objects "a", "b", ... as strings; ``refuse`` makes one change fail in the "kernel"."""

    def __init__(self, name: str, journal: list[str], *, atomic: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.name, self.atomic, self.journal = name, atomic, journal
        self.refuse: str | None = None
        self.raise_on_enable: BaseException | None = None
        self.objects: list[str] = []

    def enable(self, plan: RedirectPlan) -> None:
        self.disable(plan)
        if self.raise_on_enable is not None:
            raise self.raise_on_enable
        for op in (f"{self.name} add a", f"{self.name} add b"):
            self._apply(op)

    def disable(self, plan: RedirectPlan) -> None:
        self._each(list(self.objects), lambda obj: self._remove(f"{self.name} del {obj}"))

    def _make(self, op: str) -> None:
        self.journal.append(op)
        if op.endswith(" (failing)") or op == self.refuse:
            raise OSError("Invalid argument")
        verb, obj = op.split()[1:]
        if verb == "add":
            self.objects.append(obj)
        elif obj not in self.objects:
            raise OSError("No such file or directory")
        else:
            self.objects.remove(obj)

    def _already_gone(self, op: str, error: OperationFailed) -> bool:
        return error.reason.startswith("No such")


@pytest.fixture
def journal() -> list[str]:
    return []


def quiet(_line: str) -> None:
    pass


def test_apply_logs_counts_and_names_the_failed_operation(journal):
    shown: list[str] = []
    part = Recorder("r", journal, log=shown.append)
    part.refuse = "r add b"
    with pytest.raises(OperationFailed) as caught:
        part.enable(PLAN)
    assert (caught.value.op, caught.value.reason) == ("r add b", "Invalid argument")
    assert shown == ["  r add a", "  r add b"] and part.changes == 2
    assert journal == ["r add a", "r add b"]


def test_dry_run_shows_and_makes_nothing(journal):
    shown: list[str] = []
    part = Recorder("r", journal, dry_run=True, log=shown.append)
    part.enable(PLAN)
    assert shown == ["  r add a", "  r add b"] and journal == [] and part.changes == 2


def test_fail_after_fails_once_before_the_change_unless_atomic(journal, monkeypatch):
    """The tests' fault injection (faultinject.py) keeps the semantics the tests rely on."""
    faultinject.inject(monkeypatch, fail_after=1)
    # what the "kernel" of an atomic Recorder refuses (nft's is a statement it rejects)
    monkeypatch.setitem(faultinject.SPOILERS, Recorder, lambda op: op + " (failing)")
    part = Recorder("r", journal, log=quiet)
    with pytest.raises(OperationFailed, match=r"injected failure \(test only\)"):
        part.enable(PLAN)
    assert journal == ["r add a"]  # not atomic: the 2nd change is refused before it is made
    part.disable(PLAN)  # once only: the rollback works
    assert part.objects == []
    atomic = Recorder("t", journal, atomic=True, log=quiet)
    with pytest.raises(OperationFailed):
        atomic.enable(PLAN)
    assert journal[-1] == "t add b (failing)"  # atomic: the kernel must see it and abort


def test_remove_ignores_what_is_gone_and_each_runs_every_step(journal):
    shown: list[str] = []
    part = Recorder("r", journal, log=shown.append)
    part.objects = ["a", "gone", "b"]
    part.refuse = "r del a"
    real = part._make

    def vanish(op: str) -> None:
        if op == "r del gone":
            part.objects.remove("gone")  # someone else was faster
        real(op)

    part._make = vanish  # type: ignore[method-assign]
    with pytest.raises(OperationFailed, match="Invalid argument"):
        part.disable(PLAN)
    assert "  (ignored: No such file or directory)" in shown
    assert part.objects == ["a"]  # "b" was still removed after "a" failed


def test_a_non_atomic_failure_rolls_back_every_part_last_first(journal):
    lines: list[str] = []
    routing, rules = Recorder("route", journal, log=lines.append), Recorder("rule", journal,
                                                                            log=lines.append)
    rules.refuse = "rule add b"
    with pytest.raises(OperationFailed, match=r"Invalid argument \(rolled back\)"):
        enable_in_order([routing, rules], PLAN, log=lines.append, warn=lines.append)
    assert journal == ["route add a", "route add b", "rule add a", "rule add b",
                       "rule del a", "route del a", "route del b"]
    assert "enable failed; rolling back (removing our own chains, ip rules and routes):" in lines


def test_an_atomic_failure_undoes_nothing(journal):
    routing, table = Recorder("route", journal, log=quiet), Recorder("table", journal,
                                                                      atomic=True, log=quiet)
    table.refuse = "table add a"
    with pytest.raises(OperationFailed, match="Invalid argument$"):
        enable_in_order([routing, table], PLAN, log=quiet, warn=quiet)
    assert routing.objects == ["a", "b"]  # the earlier installation may need them
    warned: list[str] = []
    table.refuse, table.raise_on_enable = None, KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        enable_in_order([routing, table], PLAN, log=quiet, warn=warned.append)
    assert routing.objects == ["a", "b"]
    assert warned == ["interrupted during one table transaction, applied whole or not at all; "
                      "nothing is rolled back: state unknown: run status"]


def test_any_error_of_a_non_atomic_part_rolls_back_the_atomic_one_too(journal):
    """The routing refusing (say, foreign routes in its table) leaves no table of rules that
    would TPROXY without a route, whatever the backend."""
    routing, table = Recorder("route", journal, log=quiet), Recorder("table", journal,
                                                                      atomic=True, log=quiet)
    table.objects = ["a", "b"]  # an earlier installation
    routing.raise_on_enable = NetsetupError("routing table 10025 holds routes that are not ours")
    with pytest.raises(NetsetupError, match="not ours"):
        enable_in_order([routing, table], PLAN, log=quiet, warn=quiet)
    assert table.objects == [] and routing.objects == []
