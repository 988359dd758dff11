"""nftables through the ``nft`` command (package nftables), one atomic transaction per change.

Everything lives in one table this backend owns, ``<family> clamsmtp-<port>`` (``inet`` for
both families, ``ip``/``ip6`` for one), with the same rule layout as the iptables backend.
``enable`` is one ``nft -f -`` script that creates (if missing) and deletes its own table, then
declares it afresh: the kernel applies it whole or not at all, so re-enabling replaces the
table in one step and a failure leaves the ruleset as it was.  ``disable`` deletes the tables
of ours that exist, also in one transaction.  ``status`` parses ``nft list table``.
No other table is read or written.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from netsetup import backends
from netsetup.discovery import NftTable
from netsetup.errors import KernelSupportError, NetsetupError, OperationFailed
from netsetup.plan import HOOK_FORWARDED, Mode, RedirectPlan, Rule, chain_layout

NAT_PRIORITY = -100  # dstnat
MANGLE_PRIORITY = "mangle"  # -150: TPROXY's chain (a filter chain at the mangle priority)
NFT = "/usr/sbin/nft"
TIMEOUT = 30.0
FAMILY_NAMES = {4: "ip", 6: "ip6"}
NFT_FAMILIES = ("ip", "ip6", "inet")  # the nftables families our tables can have
NFT_PREFIX = "clamsmtp-"
_COUNTER = re.compile(r"\bcounter packets (\d+) bytes (\d+)")
# a base chain as enable declares it, as `nft list` prints it back (-100 is "dstnat" there
# for prerouting, and stays -100 for output)
_PLANNED_BASE = re.compile(
    rf"type nat hook (prerouting|output) priority (dstnat|{NAT_PRIORITY}); policy accept;"
)
_PLANNED_TPROXY_BASE = re.compile(
    r"type filter hook prerouting priority (mangle|-150); policy accept;"
)


class NftTimeout(NetsetupError):
    """The nft command did not finish in TIMEOUT seconds and was killed."""


def is_our_table(table: NftTable, proxy_port: int | None = None) -> bool:
    """An ip/ip6/inet ``clamsmtp-<port>`` table (any port when ``proxy_port`` is None).

    A table of another family with such a name (``netdev clamsmtp-10025``) is not ours."""
    if table.family not in NFT_FAMILIES:
        return False
    if proxy_port is None:
        return table.name.startswith(NFT_PREFIX)
    return table.name == f"{NFT_PREFIX}{proxy_port}"


def table_family(plan: RedirectPlan) -> str:
    families = set(plan.families)
    return "inet" if families == {4, 6} else FAMILY_NAMES[plan.families[0]]


def table_name(plan: RedirectPlan) -> str:
    return f"{NFT_PREFIX}{plan.proxy_port}"


def overlapping_families(plan: RedirectPlan) -> tuple[str, ...]:
    """Table families that can hold this plan's rules: its own, and inet for either family."""
    return (*(FAMILY_NAMES[f] for f in sorted(plan.families)), "inet")


def _mark_statement(mark: tuple[int, int]) -> str:
    """Set our bits of the packet mark, keep the others (as nft lists it back)."""
    value, mask = mark
    keep = (~mask & 0xFFFFFFFF) | value
    return f"meta mark set meta mark & 0x{keep:08x} | 0x{value:08x}"


def rule_statement(rule: Rule) -> str:
    words = []
    for key, net in (("saddr", rule.source), ("daddr", rule.destination)):
        if net is not None:
            words.append(f"{'ip' if net.version == 4 else 'ip6'} {key} {net}")
    if rule.in_interface and rule.in_interface != "+":  # a bare "+" is every interface
        name = rule.in_interface
        name = name[:-1] + "*" if name.endswith("+") else name  # iptables' wildcard
        words.append(f'iifname "{name}"')
    if rule.dport is not None:
        words.append(f"{rule.protocol or 'tcp'} dport {rule.dport}")
    if rule.dst_local:
        words.append("fib daddr type local")
    if rule.uid_owner is not None:
        words.append(f"meta skuid {rule.uid_owner}")
    if rule.socket:
        words += [f"meta l4proto {rule.protocol or 'tcp'}", "socket transparent 1"]
    words.append("counter")
    if rule.target == "RETURN":
        words.append("return")
    elif rule.target == "REDIRECT":
        words.append(f"redirect to :{rule.to_port}")
    elif rule.target == "MARK" and rule.mark:
        words.append(_mark_statement(rule.mark))
    elif rule.target == "TPROXY":
        if rule.mark:
            words.append(_mark_statement(rule.mark))
        words += [f"tproxy to :{rule.to_port}", "accept"]
    else:
        words.append(f"jump {rule.target}")
    return " ".join(words)


def listed_statement(rule: Rule) -> str:
    """``rule_statement`` as ``nft list`` prints it back (a host prefix loses its /32, /128)."""

    def host(
        net: ipaddress.IPv4Network | ipaddress.IPv6Network | None,
    ) -> str | ipaddress.IPv4Network | ipaddress.IPv6Network | None:
        if net is not None and net.prefixlen == net.max_prefixlen:
            return str(net.network_address)
        return net

    text = rule_statement(rule)
    for net in (rule.source, rule.destination):
        if net is not None and host(net) != net:
            text = text.replace(f" {net}", f" {host(net)}", 1)
    return text


def hook_name(hook: str) -> str:
    return "prerouting" if hook == HOOK_FORWARDED else "output"


def base_chain(plan: RedirectPlan, nft_hook: str) -> str:
    if plan.mode is Mode.TPROXY:
        return f"type filter hook {nft_hook} priority {MANGLE_PRIORITY}; policy accept;"
    return f"type nat hook {nft_hook} priority {NAT_PRIORITY}; policy accept;"


def removal_command(plan: RedirectPlan) -> str:
    return f"nft delete table {table_family(plan)} {table_name(plan)}"


def render_script(plan: RedirectPlan, replaces: tuple[str, ...] = ()) -> str:
    """The ``nft -f`` script that installs ``plan``: one transaction.

    It starts by (creating and) deleting its own table, so applying it twice converges;
    ``replaces`` names more tables (``"ip clamsmtp-10025"``) of ours to remove in it.
    """
    family, name = table_family(plan), table_name(plan)
    layout = chain_layout(plan, None if family == "inet" else plan.families[0])
    lines = [
        "#!/usr/sbin/nft -f",
        f"# clamsmtp-netsetup: transparent SMTP {plan.mode.value} to port {plan.proxy_port}",
        f"# apply: nft -f FILE    remove: {removal_command(plan)}",
    ]
    for table in (*replaces, f"{family} {name}"):
        lines += [f"table {table}", f"delete table {table}"]
    lines.append(f"table {family} {name} {{")
    for hook, _chain, rules in layout:
        nft_hook = hook_name(hook)
        lines.append(f"\tchain {nft_hook} {{")
        lines.append(f"\t\t{base_chain(plan, nft_hook)}")
        lines += [f"\t\t{rule_statement(rule)}" for rule in rules]
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Transaction:
    """One ``nft -f -`` run: the kernel commits all of ``script`` or none of it."""

    what: str  # what it does, for messages
    script: str
    shown: tuple[str, ...]  # what is printed for it (the script, or the equivalent commands)

    def __str__(self) -> str:
        return f"nft -f - ({self.what}, one transaction)"


@dataclass(frozen=True)
class ListedTable:
    family: str
    name: str
    chains: dict[str, str]  # chain -> its "type ... hook ..." line
    rules: list[tuple[str, str, int, int]]  # (chain, statement without counts, pkts, bytes)
    flags: tuple[str, ...] = ()  # table flags ("dormant": its chains see no packets)


def parse_listing(text: str) -> ListedTable:
    """``nft list table FAMILY NAME`` output, with the counters taken out of each rule."""
    family = name = ""
    chains: dict[str, str] = {}
    rules: list[tuple[str, str, int, int]] = []
    chain = None
    flags: tuple[str, ...] = ()
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("table ") and line.endswith("{"):
            family, name = line.split()[1:3]
        elif line.startswith("chain ") and line.endswith("{"):
            chain = line.split()[1]
            chains[chain] = ""
        elif line == "}":
            chain = None
        elif chain is not None and line.startswith("type "):
            chains[chain] = line
        elif chain is None and line.startswith("flags "):
            flags += tuple(f.strip() for f in line[len("flags ") :].split(","))
        elif chain is not None:
            found = _COUNTER.search(line)
            pkts, nbytes = (int(found[1]), int(found[2])) if found else (0, 0)
            rules.append((chain, _COUNTER.sub("counter", line), pkts, nbytes))
    return ListedTable(family, name, chains, rules, flags)


class NftBackend(backends.Backend[Transaction]):
    name = "nft"
    description = "nftables through the nft command"
    mechanism = "nftables"
    ours_found = "our table already exists in nftables"
    ours_are = "our table is"
    missing = "the nft command is missing"
    install_hint = "apt-get install nftables"
    atomic = True  # a failed change changed nothing: there is nothing to roll back

    @classmethod
    def nft_path(cls) -> str | None:
        return shutil.which("nft") or (NFT if os.access(NFT, os.X_OK) else None)

    @classmethod
    def is_supported(cls) -> bool:
        return cls.nft_path() is not None

    # -- running nft -------------------------------------------------------------------------

    def _nft(self, *args: str, script: str | None = None) -> subprocess.CompletedProcess[str]:
        path = self.nft_path()
        if path is None:
            raise KernelSupportError(
                "the nft command is missing: install the nftables package "
                "(apt-get install nftables), or use --backend iptables"
            )
        try:
            return subprocess.run(
                [path, *args],
                input=script,
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            command = " ".join(["nft", *args])
            raise NftTimeout(f"`{command}` did not finish in {TIMEOUT:.0f}s") from None

    def _shown(self, tx: Transaction) -> Sequence[str]:
        return tx.shown

    def _make(self, tx: Transaction) -> None:
        """Run ``tx`` as one ``nft -f -``: the kernel takes all of it or none."""
        try:
            result = self._nft("-f", "-", script=tx.script)
        except NftTimeout as error:
            # killed before or after the kernel committed: never roll back (cli), just say so
            raise NetsetupError(
                f"{tx}: {error} and was killed; the kernel applies a transaction whole or not "
                "at all, so the ruleset is either as before or as planned: state unknown: "
                "run status"
            ) from None
        if result.returncode != 0:
            reason = " ".join(result.stderr.split()) or f"nft exited {result.returncode}"
            raise OperationFailed(tx, f"{reason}; the transaction was aborted, nothing changed")

    def _tables(self) -> list[tuple[str, str]]:
        """(family, name) of every ip, ip6 and inet table (the families ours can have)."""
        result = self._nft("-j", "list", "tables")
        if result.returncode != 0:
            raise NetsetupError(f"cannot list the nftables tables: {result.stderr.strip()}")
        try:
            items = json.loads(result.stdout or "{}").get("nftables", [])
            tables = [(i["table"]["family"], i["table"]["name"]) for i in items if "table" in i]
        except (ValueError, AttributeError, KeyError, TypeError) as error:
            raise NetsetupError(
                f"cannot read `nft -j list tables` (unexpected output: {error})"
            ) from None
        # only ip/ip6/inet tables can be ours: a "netdev clamsmtp-10025" is someone else's
        return [(f, n) for f, n in tables if f in NFT_FAMILIES]

    def _ours(self, plan: RedirectPlan, *, for_dry_run: bool = False) -> list[str]:
        """Our tables that hold rules of ``plan``'s families, as "family name"."""
        try:
            tables = self._tables()
        except NetsetupError as error:
            if not (self.dry_run and for_dry_run):
                raise
            self.log(f"  (cannot read the nftables tables ({error}); assuming none of ours)")
            return []
        families = overlapping_families(plan)
        return [f"{f} {n}" for f, n in tables if n == table_name(plan) and f in families]

    # -- Backend interface -------------------------------------------------------------------

    def check(self, plan: RedirectPlan) -> None:
        if not self.dry_run and not self.is_supported():
            self._nft("--version")  # raises the clear KernelSupportError

    def enable(self, plan: RedirectPlan) -> None:
        own = f"{table_family(plan)} {table_name(plan)}"
        others = tuple(t for t in self._ours(plan, for_dry_run=True) if t != own)
        for table in others:
            self.log(f"  (replacing {table}: this plan's rules go to {own})")
        script = render_script(plan, others)
        self._apply(Transaction(f"replace table {own}", script, tuple(script.splitlines())))

    def disable(self, plan: RedirectPlan) -> None:
        ours = self._ours(plan, for_dry_run=True)
        if not ours:
            return
        if any(t.startswith("inet ") for t in ours) and set(plan.families) != {4, 6}:
            self.log("  (the inet table holds IPv4 and IPv6 rules: removing it removes both)")
        # "add" first: deleting a table that vanished meanwhile cannot fail the transaction
        script = "".join(f"add table {t}\ndelete table {t}\n" for t in ours)
        shown = tuple(f"  nft delete table {t}" for t in ours)
        self._apply(Transaction(f"delete {', '.join(ours)}", script, shown))

    def survey(self, plan: RedirectPlan, nft: tuple[NftTable, ...] | None) -> backends.Presence:
        """From discovery's table list (netlink): no nft command needed to see ours."""
        host = [t for t in nft or () if t.chains and not is_our_table(t)]
        listed = ", ".join(f"{t} ({t.rules} rules)" for t in host) or "none"
        return backends.Presence(
            ours=any(is_our_table(t, plan.proxy_port) for t in nft or ()),
            rules={str(t): t.rules for t in host},
            in_use=bool(host),
            text=f"{self.mechanism}: "
            + ("unknown (cannot read nftables)" if nft is None else listed),
        )

    def beside(self, other: backends.Backend[Any], found: backends.Presence,
               host: str) -> str:
        return f"the host also has {other.mechanism} rules: {host}"

    def status(self, plan: RedirectPlan) -> list[str]:
        own = f"{table_family(plan)} {table_name(plan)}"
        try:
            tables = self._tables()
        except NetsetupError as error:
            if not self.dry_run:
                raise
            return [f"nftables: {error}"]
        ours = [f"{f} {n}" for f, n in tables if n == table_name(plan)]
        families = ", ".join(f"IPv{f}" for f in plan.families)
        lines = []
        if own not in ours:
            lines.append(f"nftables table {own} ({families}): not installed")
        for table in ours:
            lines += self._table_status(plan, table, own)
        others = sorted(
            f"{f} {n}" for f, n in tables if n.startswith(NFT_PREFIX) and n != table_name(plan)
        )
        if others:
            lines.append(
                f"  other clamsmtp-netsetup tables here: {', '.join(others)} (other --proxy-port)"
            )
        return lines

    def _table_status(self, plan: RedirectPlan, table: str, own: str) -> list[str]:
        result = self._nft("list", "table", *table.split())
        if result.returncode != 0:
            return [f"nftables table {table}: cannot list it: {result.stderr.strip()}"]
        listed = parse_listing(result.stdout)
        problems = []
        if table != own:
            problems.append(f"{table} is installed but the plan asks for table {own}")
        else:
            family = None if table_family(plan) == "inet" else plan.families[0]
            expected = {
                hook_name(hook): [listed_statement(r) for r in rules]
                for hook, _chain, rules in chain_layout(plan, family)
            }
            kind, base = ("filter", _PLANNED_TPROXY_BASE) if plan.mode is Mode.TPROXY else (
                "nat", _PLANNED_BASE)
            for chain, statements in expected.items():
                if chain not in listed.chains:
                    problems.append(f"chain {chain} is in the plan but not installed")
                elif f"type {kind} hook {chain} " not in listed.chains[chain] + " ":
                    problems.append(f"chain {chain} is not a {kind} {chain} hook")
                elif not base.fullmatch(listed.chains[chain]):
                    problems.append(
                        f"chain {chain} is `{listed.chains[chain]}`, not "
                        f"`{base_chain(plan, chain)}`"
                    )
                elif [s for c, s, _p, _b in listed.rules if c == chain] != statements:
                    problems.append(f"chain {chain} differs from the plan")
            problems += [
                f"chain {c} is installed but not in the plan"
                for c in listed.chains
                if c not in expected
            ]
        if "dormant" in listed.flags:
            problems.append("the table is dormant (flags dormant): its rules see no packets")
        state = "installed" if not problems else "installed, NOT as planned"
        lines = [f"nftables table {table} (nft list table {table}): {state}"]
        lines += [f"  ! {p}" for p in problems]
        if problems:
            lines.append("  (compared with the plan these options describe; enable converges)")
        lines.append(f"  {'pkts':>10} {'bytes':>12}  rule")
        for chain, hook in listed.chains.items():
            lines.append(f"  {'':>10} {'':>12}  chain {chain}: {hook}")
            lines += [f"  {p:>10} {b:>12}    {s}" for c, s, p, b in listed.rules if c == chain]
        return lines


Backend = NftBackend
