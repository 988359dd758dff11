"""Fakes and plans shared by clamsmtp-netsetup's unit tests: no root, no kernel, no nft.

As sshuttle's tests/client/test_methods_nat.py does with its ``ipt`` function, the iptables
tests record every operation the single choke point ``_apply`` receives and compare the full
ordered list with the expected rule listing.  The kernel is a small in-memory model of the nat
table (``FakeNat``) standing in for the one line that talks to python-iptables (``_kernel``);
the ``nat`` fixture in conftest.py wires it in.  ``FakeNft`` stands in for the nft command.

Imported as ``from netsetup_fakes import ...`` (this folder is on sys.path through its conftest.py).
"""

from __future__ import annotations

import ipaddress
import os

from netsetup import discovery
from netsetup.backends.iptables import HOOKS, NatState, Op, rule_args
from netsetup.discovery import HostFacts, Interface, NftTable
from netsetup.plan import RedirectPlan

net = ipaddress.ip_network


# -- an in-memory nat table ------------------------------------------------------------------


class FakeNat:
    """Both families' nat tables as {chain: [Rule]}, changed only by Ops."""

    BUILTIN = ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")

    def __init__(self):
        self.tables = {f: {c: [] for c in self.BUILTIN} for f in (4, 6)}  # nat
        self.mangle = {f: {c: [] for c in self.BUILTIN} for f in (4, 6)}  # TPROXY's
        self.fail_on: str | None = None  # str(op) that fails, like a kernel refusal
        self.race_on: str | None = None  # str(op) that someone else does first: ENOENT

    def snapshot(self):
        return [{f: {c: list(rules) for c, rules in t.items()} for f, t in tables.items()}
                for tables in (self.tables, self.mangle)]

    def _table(self, family: int, name: str) -> dict:
        return (self.mangle if name == "mangle" else self.tables)[family]

    def apply(self, op: Op) -> None:
        if self.fail_on == str(op):
            raise OSError("Invalid argument")
        if self.race_on == str(op):
            self.race_on = None
            self.apply(op)
            raise OSError("No such file or directory")
        table = self._table(op.family, op.table)
        if op.action == "new-chain":
            if op.chain in table:
                raise OSError("File exists")
            table[op.chain] = []
        elif op.action == "append":
            table[op.chain].append(op.rule)
        elif op.action == "insert":
            table[op.chain].insert(0, op.rule)
        elif op.action == "delete-jump":
            rules = table[op.chain]
            index = next(i for i, r in enumerate(rules) if r.target == op.rule.target)
            del rules[index]
        elif op.action == "flush":
            table[op.chain] = []
        elif op.action == "delete-chain":
            referenced = any(r.target == op.chain for rules in table.values() for r in rules)
            if table[op.chain] or referenced or op.chain in self.BUILTIN:
                raise OSError("Device or resource busy")
            del table[op.chain]

    def state(self, family: int, name: str = "nat") -> NatState:
        table = self._table(family, name)
        return NatState(frozenset(table), {h: tuple(r.target for r in table[h]) for h in HOOKS})

    def rows(self, family: int, chain: str, name: str = "nat"):
        return [(rule_args(r), 0, 0) for r in self._table(family, name)[chain]]


class FakeRouting:
    """TPROXY's ip rules and local routes per family, changed only by RouteOps."""

    def __init__(self):
        self.rules = {4: 0, 6: 0}
        self.routes = {4: 0, 6: 0}
        self.other_routes = {4: 0, 6: 0}
        self.applied: list[str] = []
        self.fail_on: str | None = None

    def apply(self, op) -> None:
        self.applied.append(str(op))
        if self.fail_on == str(op):
            raise OSError("Invalid argument")
        store = self.rules if op.action.endswith("rule") else self.routes
        if op.action.startswith("add"):
            if op.action == "add-route" and store[op.family]:
                raise OSError("File exists")
            store[op.family] += 1
        else:
            if not store[op.family]:
                raise OSError("No such file or directory")
            store[op.family] -= 1

    def state(self, family: int):
        from netsetup.routing import RouteState

        return RouteState(self.rules[family], self.routes[family], self.other_routes[family])


def quiet(_line: str) -> None:
    pass


PLAN = RedirectPlan(proxy_port=10025, interfaces=("lan0",))
FULL = RedirectPlan(
    proxy_port=10026,
    interfaces=("lan0", "dmz0"),
    ports=(25, 587),
    exempt_sources=(net("203.0.113.0/24"), net("2001:db8:ff::/48")),
    exempt_destinations=(net("198.51.100.25/32"),),
    local=True,
    owner_uid=105,
    owner_name="clamsmtp",
)


# -- a fake nft command ---------------------------------------------------------------------


class FakeNft:
    """Stands in for the nft command: a table list, listings, and the scripts it was given."""

    def __init__(self, tables=(), listing="", fail=False):
        self.tables, self.listing, self.fail = list(tables), listing, fail
        self.scripts: list[str] = []

    def __call__(self, *args, script=None):  # set on the class: called without self
        import json
        import subprocess

        if args[:1] == ("-f",):
            self.scripts.append(script)
            failed = self.fail or "clamsmtp-injected-failure" in script  # as the kernel does
            return subprocess.CompletedProcess(args, int(failed), "", "Error: boom")
        if args == ("-j", "list", "tables"):
            items = [{"table": {"family": f, "name": n}} for f, n in self.tables]
            return subprocess.CompletedProcess(args, 0, json.dumps({"nftables": items}), "")
        return subprocess.CompletedProcess(args, 0, self.listing, "")


# -- hosts ----------------------------------------------------------------------------------

NFT_HOST = (NftTable("ip", "filter", 3, 12), NftTable("inet", "fw", 1, 2))


FACTS = HostFacts(
    interfaces=(
        Interface("lo", 1, True, True, None, ("127.0.0.1/8",), ()),
        Interface("lan0", 2, True, False, None, ("192.0.2.1/24", "2001:db8:1::1/64"), ()),
        Interface("wan0", 3, True, False, None, ("198.51.100.1/24",), (4, 6)),
        Interface("br0p1", 4, True, False, "br0", (), ()),
        Interface("br0", 5, True, False, None, ("203.0.113.1/24",), ()),
    ),
    forwarding={4: True, 6: False},
    ipv6=True,
)


def fake_root_host(nat, monkeypatch, tmp_path, config_text: str):
    """Root, the interfaces of FACTS, no nftables rules, and a clamsmtpd.conf of `config_text`
    that `nat` (a FakeNat) names as the command's config."""
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(discovery, "discover", lambda: FACTS)
    monkeypatch.setattr(discovery, "nft_tables", lambda: ())
    config = tmp_path / "clamsmtpd.conf"
    config.write_text(config_text)
    nat.config = str(config)
    return nat
