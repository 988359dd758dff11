"""The kernel side of the iptables backend: python-iptables, one address family per process.

libxtables registers an extension (REDIRECT, owner, addrtype, ...) only for the family that was
current when its shared object was first loaded, so a process that built an IPv4 REDIRECT rule
can never build an IPv6 one ("can't find target REDIRECT"); python-iptables' maintainer advises
one address family per process.  So every read and write of the legacy tables runs in a worker
process per family (``FamilyWorker``, started with multiprocessing's ``spawn``), which serves
calls to ``XtablesFamily`` methods over a pipe.  The parent keeps the choke point
(``IptablesBackend._apply``), logging, dry run and the xtables lock.
"""

from __future__ import annotations

import contextlib
import ipaddress
import multiprocessing
import traceback
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from netsetup.discovery import legacy_tables
from netsetup.errors import KernelSupportError
from netsetup.plan import Rule

if TYPE_CHECKING:
    from netsetup.backends.iptables import Op

TABLE = "nat"
CALL_TIMEOUT = 60.0


def _iptc() -> Any:  # the iptc module (python-iptables has no type information)
    import iptc

    return iptc


def _negatable(flag: str, value: str | None, *, address: bool = False) -> list[str]:
    """python-iptables' "[!]value" as iptables-save arguments; [] for "any"."""
    if not value:
        return []
    negate = value.startswith("!")
    value = value.lstrip("!")
    if address:  # "a.b.c.d/m.m.m.m" or "v6/len" -> CIDR
        net = ipaddress.ip_network(value, strict=False)
        if net.prefixlen == 0 and not negate:
            return []
        value = str(net)
    return ["!", flag, value] if negate else [flag, value]


def render_installed(rule: Any) -> str:  # rule: iptc.Rule or iptc.Rule6
    """A python-iptables rule in iptables-save syntax (the order ``rule_args`` uses)."""
    args = _negatable("-s", rule.src, address=True) + _negatable("-d", rule.dst, address=True)
    args += _negatable("-i", rule.in_interface) + _negatable("-o", rule.out_interface)
    if rule.protocol not in (None, "ip", "all", "0"):
        args += ["-p", rule.protocol]
    for match in rule.matches:
        args += ["-m", match.name]
        for key, values in match.get_all_parameters().items():
            values = list(values)
            if values[:1] == ["!"]:
                args.append("!")
                values = values[1:]
            args += [f"--{key}", *values]
    target = rule.target
    if target is not None and target.name:
        args += ["-j", target.name]
        for key, values in target.get_all_parameters().items():
            args += [f"--{key}", *values]
    return " ".join(args)


class XtablesFamily:
    """python-iptables for one family; lives in that family's worker process."""

    def __init__(self, family: int):
        self.family = family

    def only_existing_tables(self) -> None:
        """Keep python-iptables from creating every legacy table in this namespace.

        To tell a jump to a user chain from an extension target, python-iptables opens all five
        tables (``Rule.tables``), and opening a table creates it: after that ``iptables``
        (iptables-nft) warns that legacy tables are present.  Its availability check is
        answered from /proc so that only the tables that already exist are opened.  The check
        is replaced, not its cache primed: python-iptables 1.0.1 (Debian 12) has no cache.
        """
        iptc = _iptc()
        existing = legacy_tables(self.family)

        def available(name: str) -> bool:
            return name in existing

        if self.family == 4:
            iptc.ip4tc.is_table_available = available  # read by Rule.tables at each call
        else:
            iptc.ip6tc.is_table6_available = available

    def table(self, name: str = TABLE) -> Any:  # iptc.Table or iptc.Table6
        iptc = _iptc()
        table = iptc.Table(name) if self.family == 4 else iptc.Table6(name)
        table.refresh()
        return table

    def to_iptc(self, rule: Rule) -> Any:  # iptc.Rule or iptc.Rule6
        iptc = _iptc()
        entry = iptc.Rule() if self.family == 4 else iptc.Rule6()
        if rule.source is not None:
            entry.src = str(rule.source)
        if rule.destination is not None:
            entry.dst = str(rule.destination)
        if rule.in_interface:
            entry.in_interface = rule.in_interface
        if rule.protocol:
            entry.protocol = rule.protocol
        if rule.dport is not None:
            entry.create_match(rule.protocol or "tcp").dport = str(rule.dport)
        if rule.dst_local:
            entry.create_match("addrtype").dst_type = "LOCAL"
        if rule.uid_owner is not None:
            entry.create_match("owner").uid_owner = str(rule.uid_owner)
        if rule.socket:
            entry.create_match("socket").transparent = ""
        target = entry.create_target(rule.target)
        mark = f"0x{rule.mark[0]:x}/0x{rule.mark[1]:x}" if rule.mark else None
        if rule.target == "TPROXY":
            target.on_port = str(rule.to_port)
            if rule.on_ip:
                target.on_ip = rule.on_ip
            if mark:
                target.tproxy_mark = mark
        elif rule.target == "MARK":
            target.set_xmark = mark
        elif rule.to_port is not None:
            target.to_ports = str(rule.to_port)
        return entry

    # -- calls served to the parent ------------------------------------------------------

    def check_rules(self, rules: list[Rule]) -> None:
        """Build every rule in userspace (finds missing xtables extensions, changes nothing)."""
        for rule in rules:
            try:
                self.to_iptc(rule)
            except Exception as error:
                raise KernelSupportError(
                    f"IPv{self.family}: cannot build a {rule.target} rule: {error} "
                    "(xtables extension missing? needs the iptables package)",
                    self.family,
                ) from None

    def open_nat(self, name: str = TABLE) -> None:
        module = f"{'iptable' if self.family == 4 else 'ip6table'}_{name}"
        config = "NF_NAT" if name == TABLE else "NF_MANGLE"
        try:
            self.table(name)
        except Exception as error:
            raise KernelSupportError(
                f"IPv{self.family} legacy {name} table unavailable ({error}): the kernel needs "
                f"{module} (CONFIG_IP{'' if self.family == 4 else '6'}_{config})",
                self.family,
            ) from None

    def load_module(self, name: str) -> None:
        _iptc().util.load_kernel(name)

    def apply(self, op: Op) -> None:
        iptc = _iptc()
        table = self.table(op.table)
        if op.action == "new-chain":
            table.create_chain(op.chain)
        elif op.action == "append":
            iptc.Chain(table, op.chain).append_rule(self.to_iptc(op.the_rule))
        elif op.action == "insert":
            iptc.Chain(table, op.chain).insert_rule(self.to_iptc(op.the_rule), 0)
        elif op.action == "delete-jump":
            chain = iptc.Chain(table, op.chain)
            found = next((r for r in chain.rules if r.target.name == op.the_rule.target), None)
            if found is None:
                raise LookupError(f"no rule in {op.chain} jumps to {op.the_rule.target}")
            chain.delete_rule(found)
        elif op.action == "flush":
            table.flush_entries(op.chain)
        elif op.action == "delete-chain":
            table.delete_chain(op.chain)
        else:
            raise ValueError(f"unknown action {op.action!r}")

    def read_state(
        self, hooks: tuple[str, ...], name: str = TABLE
    ) -> tuple[frozenset[str], dict[str, tuple[str, ...]]]:
        iptc = _iptc()
        table = self.table(name)
        jumps = {
            hook: tuple(r.target.name for r in iptc.Chain(table, hook).rules) for hook in hooks
        }
        return frozenset(c.name for c in table.chains), jumps

    def rows(self, chain: str, name: str = TABLE) -> list[tuple[str, int, int]]:
        """[(rule in iptables-save syntax, packets, bytes)] of one chain, in order."""
        iptc = _iptc()
        table = self.table(name)
        return [
            (render_installed(rule), *rule.get_counters())
            for rule in iptc.Chain(table, chain).rules
        ]

    def host_rules(self, names: tuple[str, ...], prefix: str) -> dict[str, int]:
        """{table: rules} for existing tables, leaving out chains and jumps named ``prefix*``."""
        iptc = _iptc()
        counts = {}
        for name in names:
            table = self.table(name)
            counts[name] = sum(
                1
                for chain in table.chains
                if not chain.name.startswith(prefix)
                for rule in iptc.Chain(table, chain.name).rules
                if not rule.target.name.startswith(prefix)
            )
        return counts


class WorkerError(Exception):
    """A call failed in a worker; the message is the python-iptables error."""


def _serve(conn: Connection, family: int) -> None:
    """Worker main loop: (method, args) in; ("ok", result) or an error out; None ends it."""
    kernel = XtablesFamily(family)
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        method, args = request
        try:
            kernel.only_existing_tables()
            conn.send(("ok", getattr(kernel, method)(*args)))
        except KernelSupportError as error:
            conn.send(("kernel", str(error)))
        except Exception as error:
            detail = str(error) or type(error).__name__
            conn.send(("error", detail, traceback.format_exc(limit=3)))


class FamilyWorker:
    """The parent's handle on one family's worker process."""

    def __init__(self, family: int):
        self.family = family
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(child, family), name=f"xtables-ipv{family}", daemon=True
        )
        self._process.start()
        child.close()

    def call(self, method: str, *args: object) -> Any:
        try:
            self._conn.send((method, args))
            if not self._conn.poll(CALL_TIMEOUT):
                raise WorkerError(f"IPv{self.family} xtables worker: no answer to {method}")
            reply = self._conn.recv()
        except (EOFError, OSError) as error:
            code = self._process.exitcode
            raise WorkerError(
                f"IPv{self.family} xtables worker died during {method} (exit code {code})"
            ) from error
        if reply[0] == "ok":
            return reply[1]
        if reply[0] == "kernel":
            raise KernelSupportError(reply[1], self.family)
        raise WorkerError(reply[1])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(None)
        self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()
