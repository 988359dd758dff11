"""Unit tests of the iptables backend: exact operation lists, _apply, rollback and status."""

from __future__ import annotations

import dataclasses

import faultinject
import pytest
from netsetup_fakes import FULL, PLAN, FakeNat, quiet

from netsetup.backends.iptables import (
    IptablesBackend,
    NatState,
    disable_ops,
    enable_ops,
)
from netsetup.errors import KernelSupportError, OperationFailed
from netsetup.plan import Rule

# -- exact operation lists -------------------------------------------------------------------


def test_enable_ops_ipv4_and_ipv6():
    assert [str(op) for fam in (4, 6) for op in enable_ops(PLAN, fam)] == [
        "iptables-legacy -t nat -N CLAMSMTP-10025",
        "iptables-legacy -t nat -A CLAMSMTP-10025 -m addrtype --dst-type LOCAL -j RETURN",
        "iptables-legacy -t nat -A CLAMSMTP-10025 -i lan0 -p tcp -m tcp --dport 25 "
        "-j REDIRECT --to-ports 10025",
        "iptables-legacy -t nat -I PREROUTING 1 -j CLAMSMTP-10025",
        "ip6tables-legacy -t nat -N CLAMSMTP-10025",
        "ip6tables-legacy -t nat -A CLAMSMTP-10025 -m addrtype --dst-type LOCAL -j RETURN",
        "ip6tables-legacy -t nat -A CLAMSMTP-10025 -i lan0 -p tcp -m tcp --dport 25 "
        "-j REDIRECT --to-ports 10025",
        "ip6tables-legacy -t nat -I PREROUTING 1 -j CLAMSMTP-10025",
    ]


def test_enable_ops_local_ipv6_keeps_only_ipv6_exemptions():
    assert [str(op) for op in enable_ops(FULL, 6)] == [
        "ip6tables-legacy -t nat -N CLAMSMTP-10026",
        "ip6tables-legacy -t nat -A CLAMSMTP-10026 -s 2001:db8:ff::/48 -j RETURN",
        "ip6tables-legacy -t nat -A CLAMSMTP-10026 -m addrtype --dst-type LOCAL -j RETURN",
        "ip6tables-legacy -t nat -A CLAMSMTP-10026 -i lan0 -p tcp -m tcp --dport 25 "
        "-j REDIRECT --to-ports 10026",
        "ip6tables-legacy -t nat -A CLAMSMTP-10026 -i lan0 -p tcp -m tcp --dport 587 "
        "-j REDIRECT --to-ports 10026",
        "ip6tables-legacy -t nat -A CLAMSMTP-10026 -i dmz0 -p tcp -m tcp --dport 25 "
        "-j REDIRECT --to-ports 10026",
        "ip6tables-legacy -t nat -A CLAMSMTP-10026 -i dmz0 -p tcp -m tcp --dport 587 "
        "-j REDIRECT --to-ports 10026",
        "ip6tables-legacy -t nat -I PREROUTING 1 -j CLAMSMTP-10026",
        "ip6tables-legacy -t nat -N CLAMSMTP-10026-LOCAL",
        "ip6tables-legacy -t nat -A CLAMSMTP-10026-LOCAL -m owner --uid-owner 105 -j RETURN",
        "ip6tables-legacy -t nat -A CLAMSMTP-10026-LOCAL -s 2001:db8:ff::/48 -j RETURN",
        "ip6tables-legacy -t nat -A CLAMSMTP-10026-LOCAL -m addrtype --dst-type LOCAL -j RETURN",
        "ip6tables-legacy -t nat -A CLAMSMTP-10026-LOCAL -p tcp -m tcp --dport 25 "
        "-j REDIRECT --to-ports 10026",
        "ip6tables-legacy -t nat -A CLAMSMTP-10026-LOCAL -p tcp -m tcp --dport 587 "
        "-j REDIRECT --to-ports 10026",
        "ip6tables-legacy -t nat -I OUTPUT 1 -j CLAMSMTP-10026-LOCAL",
    ]


def test_disable_ops_remove_only_our_objects_found():
    state = NatState(
        chains=frozenset(
            {
                "PREROUTING",
                "OUTPUT",
                "CLAMSMTP-10025",
                "CLAMSMTP-10025-LOCAL",
                "CLAMSMTP-10026",
                "MINE",
            }
        ),
        jumps={
            # a duplicate jump (crash between two runs), other instances' and the admin's own
            "PREROUTING": ("MINE", "CLAMSMTP-10025", "CLAMSMTP-10026", "CLAMSMTP-10025"),
            "OUTPUT": ("CLAMSMTP-10025-LOCAL",),
        },
    )
    assert [str(op) for op in disable_ops(PLAN, 4, state)] == [
        "iptables-legacy -t nat -D PREROUTING -j CLAMSMTP-10025",
        "iptables-legacy -t nat -D PREROUTING -j CLAMSMTP-10025",
        "iptables-legacy -t nat -D OUTPUT -j CLAMSMTP-10025-LOCAL",
        "iptables-legacy -t nat -F CLAMSMTP-10025",
        "iptables-legacy -t nat -F CLAMSMTP-10025-LOCAL",
        "iptables-legacy -t nat -X CLAMSMTP-10025",
        "iptables-legacy -t nat -X CLAMSMTP-10025-LOCAL",
    ]


def test_disable_ops_partial_enable_chain_without_jump():
    state = NatState(frozenset({"CLAMSMTP-10025"}), {"PREROUTING": (), "OUTPUT": ()})
    assert [str(op) for op in disable_ops(PLAN, 6, state)] == [
        "ip6tables-legacy -t nat -F CLAMSMTP-10025",
        "ip6tables-legacy -t nat -X CLAMSMTP-10025",
    ]
    assert disable_ops(PLAN, 6, NatState()) == []


# -- the backend through _apply --------------------------------------------------------------


def test_enable_starts_with_disable_and_twice_converges(nat):
    backend = IptablesBackend(log=quiet)
    backend.enable(PLAN)
    first = nat.snapshot()
    nat.applied.clear()
    backend.enable(PLAN)
    assert nat.snapshot() == first
    assert nat.applied == [
        "iptables-legacy -t nat -D PREROUTING -j CLAMSMTP-10025",
        "iptables-legacy -t nat -F CLAMSMTP-10025",
        "iptables-legacy -t nat -X CLAMSMTP-10025",
        "ip6tables-legacy -t nat -D PREROUTING -j CLAMSMTP-10025",
        "ip6tables-legacy -t nat -F CLAMSMTP-10025",
        "ip6tables-legacy -t nat -X CLAMSMTP-10025",
        *[str(op) for fam in (4, 6) for op in enable_ops(PLAN, fam)],
    ]


def test_disable_restores_the_table_and_keeps_foreign_rules(nat):
    nat.tables[4]["PREROUTING"].append(Rule("ACCEPT", in_interface="wan0"))
    nat.tables[4]["OTHER"] = [Rule("RETURN")]
    nat.tables[4]["CLAMSMTP-10026"] = []  # another instance
    before = nat.snapshot()
    backend = IptablesBackend(log=quiet)
    backend.enable(dataclasses.replace(FULL, proxy_port=10025))
    backend.disable(PLAN)  # disable needs no --local: it removes both chains
    assert nat.snapshot() == before


def test_jump_inserted_at_position_one(nat):
    nat.tables[4]["PREROUTING"].append(Rule("DNAT", dport=25))
    IptablesBackend(log=quiet).enable(PLAN)
    assert [r.target for r in nat.tables[4]["PREROUTING"]] == ["CLAMSMTP-10025", "DNAT"]


def test_apply_wraps_kernel_errors_with_the_operation(nat):
    nat.fail_on = "iptables-legacy -t nat -I PREROUTING 1 -j CLAMSMTP-10025"
    with pytest.raises(OperationFailed) as caught:
        IptablesBackend(log=quiet).enable(PLAN)
    assert str(caught.value.op) == nat.fail_on
    assert caught.value.reason == "Invalid argument"


def test_fail_after_injects_one_failure(nat, monkeypatch):
    faultinject.inject(monkeypatch, fail_after=2)
    backend = IptablesBackend(log=quiet)
    with pytest.raises(OperationFailed, match="injected failure") as caught:
        backend.enable(PLAN)
    assert str(caught.value.op) == str(enable_ops(PLAN, 4)[2])
    backend.disable(PLAN)  # the injection fired once: the rollback works
    assert nat.snapshot() == FakeNat().snapshot()


def test_disable_ignores_a_jump_that_vanished(nat):
    IptablesBackend(log=quiet).enable(PLAN)
    nat.race_on = "iptables-legacy -t nat -D PREROUTING -j CLAMSMTP-10025"
    lines = []
    IptablesBackend(log=lines.append).disable(PLAN)
    assert "  (ignored: No such file or directory)" in lines
    assert nat.snapshot() == FakeNat().snapshot()


def test_disable_fatal_error_still_cleans_the_other_family(nat):
    IptablesBackend(log=quiet).enable(PLAN)
    nat.fail_on = "iptables-legacy -t nat -X CLAMSMTP-10025"
    with pytest.raises(OperationFailed, match="Invalid argument"):
        IptablesBackend(log=quiet).disable(PLAN)
    assert "CLAMSMTP-10025" not in nat.tables[6]  # IPv6 was still cleaned
    nat.fail_on = None
    IptablesBackend(log=quiet).disable(PLAN)
    assert nat.snapshot() == FakeNat().snapshot()


def test_dry_run_changes_nothing_and_prints_commands(nat):
    lines = []
    backend = IptablesBackend(dry_run=True, log=lines.append)
    backend.enable(PLAN)
    assert nat.snapshot() == FakeNat().snapshot()
    assert lines == [f"  {op}" for fam in (4, 6) for op in enable_ops(PLAN, fam)]
    assert backend.changes == len(lines)


def test_status_reports_counters_and_drift(nat):
    backend = IptablesBackend(log=quiet)
    backend.enable(PLAN)
    lines = backend.status(PLAN)
    assert lines[0] == "IPv4 (iptables-legacy, table nat): installed"
    assert any("-A PREROUTING -j CLAMSMTP-10025   [rule 1 of 1 in PREROUTING]" in x for x in lines)
    del nat.tables[4]["CLAMSMTP-10025"][-1]  # someone deleted the REDIRECT rule by hand
    lines = backend.status(PLAN)
    assert lines[0] == "IPv4 (iptables-legacy, table nat): installed, NOT as planned"
    assert "CLAMSMTP-10025 differs from the plan" in lines[1]
    backend.enable(PLAN)
    assert backend.status(PLAN)[0].endswith(": installed")


# -- kernel support -------------------------------------------------------------------------


class FakeWorker:
    def __init__(self):
        self.calls = []

    def call(self, method, *args):
        self.calls.append(method)


def test_check_names_missing_kernel_modules(monkeypatch):
    import netsetup.backends.iptables as module

    worker = FakeWorker()
    monkeypatch.setattr(IptablesBackend, "is_supported", classmethod(lambda cls: True))
    monkeypatch.setattr(IptablesBackend, "_worker", lambda self, family: worker)
    monkeypatch.setattr(module, "kernel_xt_names", lambda family, kind: frozenset({"tcp"}))
    with pytest.raises(KernelSupportError, match="lacks xt_REDIRECT, xt_addrtype, xt_owner") as e:
        IptablesBackend(log=quiet).check(FULL)
    assert e.value.family == 4
    assert worker.calls[:3] == ["check_rules", "check_rules", "open_nat"]
    assert worker.calls.count("load_module") == 3  # tried modprobe before giving up
    lines = []
    IptablesBackend(dry_run=True, log=lines.append).check(FULL)  # a dry run only notes it
    assert lines[0].startswith("  (IPv4: the kernel does not list xt_REDIRECT")
