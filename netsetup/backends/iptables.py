"""Legacy xtables through python-iptables (module ``iptc``).

python-iptables links libiptc, so it reads and writes the *legacy* tables (what
``iptables-legacy`` shows); on a Debian 12 host whose ``iptables`` is iptables-nft these rules
live next to the nftables ones.  Each kernel change is an ``Op``: it prints as the
``iptables-legacy`` command that does the same, it is what ``--dry-run`` shows, and it is all
``_apply`` (the one choke point, in ``netsetup.changes``) ever receives; ``_make`` hands it to
python-iptables.  ``enable_ops`` and ``disable_ops`` are pure:
the ordered operations for a plan and, for removal, the state read from the kernel.

python-iptables runs in one worker process per address family (see ``xtables``); this module
never imports it for real work, so planning and the unit tests need no libxtables.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from netsetup import backends
from netsetup.backends.xtables import TABLE, FamilyWorker
from netsetup.changes import print_line
from netsetup.discovery import NftTable, kernel_xt_names, legacy_tables
from netsetup.errors import KernelSupportError, NetsetupError, OperationFailed
from netsetup.plan import (
    CHAIN_PREFIX,
    HOOK_FORWARDED,
    HOOK_LOCAL,
    RedirectPlan,
    Rule,
    chain_layout,
)

HOOKS = (HOOK_FORWARDED, HOOK_LOCAL)
XTABLES_LOCK = "/run/xtables.lock"  # the lock iptables-legacy takes (XTABLES_LOCKFILE overrides)
LOCK_TIMEOUT = 10.0
TABLES = ("nat", "mangle")  # REDIRECT's and TPROXY's: disable looks in both
KERNEL_MODULES = {
    "TPROXY": "xt_TPROXY",
    "MARK": "xt_mark",
    "socket": "xt_socket",
    "REDIRECT": "xt_REDIRECT",
    "addrtype": "xt_addrtype",
    "owner": "xt_owner",
    "tcp": "xt_tcpudp",
}


def _command(family: int) -> str:
    return "iptables-legacy" if family == 4 else "ip6tables-legacy"


def rule_args(rule: Rule) -> str:
    """The rule in iptables-save syntax (the order iptables-legacy-save prints)."""
    args = []
    if rule.source is not None:
        args += ["-s", str(rule.source)]
    if rule.destination is not None:
        args += ["-d", str(rule.destination)]
    if rule.in_interface and rule.in_interface != "+":  # "-i +" is any: -save leaves it out
        args += ["-i", rule.in_interface]
    if rule.protocol:
        args += ["-p", rule.protocol]
    if rule.dport is not None:
        args += ["-m", rule.protocol or "tcp", "--dport", str(rule.dport)]
    if rule.dst_local:
        args += ["-m", "addrtype", "--dst-type", "LOCAL"]
    if rule.uid_owner is not None:
        args += ["-m", "owner", "--uid-owner", str(rule.uid_owner)]
    if rule.socket:
        args += ["-m", "socket", "--transparent"]
    args += ["-j", rule.target]
    mark = f"0x{rule.mark[0]:x}/0x{rule.mark[1]:x}" if rule.mark else None
    if rule.target == "TPROXY":
        args += ["--on-port", str(rule.to_port)]
        if rule.on_ip:
            args += ["--on-ip", rule.on_ip]
        if mark:
            args += ["--tproxy-mark", mark]
    elif rule.target == "MARK":
        args += ["--set-xmark", str(mark)]
    elif rule.to_port is not None:
        args += ["--to-ports", str(rule.to_port)]
    return " ".join(args)


@dataclass(frozen=True)
class Op:
    """One kernel change in one table (nat, or mangle for TPROXY) of one family."""

    action: str  # new-chain | append | insert | delete-jump | flush | delete-chain
    family: int
    chain: str
    rule: Rule | None = None
    nonfatal: bool = field(default=False, compare=False)  # removal of what may already be gone
    table: str = TABLE

    @property
    def the_rule(self) -> Rule:
        """The rule of an append, insert or delete-jump (the other actions have none)."""
        if self.rule is None:
            raise ValueError(f"{self.action} {self.chain}: no rule")
        return self.rule

    def __str__(self) -> str:
        head = f"{_command(self.family)} -t {self.table}"
        if self.action == "new-chain":
            return f"{head} -N {self.chain}"
        if self.action == "append":
            return f"{head} -A {self.chain} {rule_args(self.the_rule)}"
        if self.action == "insert":
            return f"{head} -I {self.chain} 1 {rule_args(self.the_rule)}"
        if self.action == "delete-jump":
            return f"{head} -D {self.chain} -j {self.the_rule.target}"
        if self.action == "flush":
            return f"{head} -F {self.chain}"
        if self.action == "delete-chain":
            return f"{head} -X {self.chain}"
        raise ValueError(f"unknown action {self.action!r}")


@dataclass(frozen=True)
class NatState:
    """What removal needs to know about one family's legacy nat (or mangle) table."""

    chains: frozenset[str] = frozenset()
    jumps: dict[str, tuple[str, ...]] = field(default_factory=dict)  # hook -> targets, in order


def enable_ops(plan: RedirectPlan, family: int) -> list[Op]:
    """Create and fill each chain, then jump to it from position 1 of its hook."""
    ops = []
    table = plan.table
    for hook, chain, rules in chain_layout(plan, family):
        ops.append(Op("new-chain", family, chain, table=table))
        ops += [Op("append", family, chain, rule, table=table) for rule in rules]
        ops.append(Op("insert", family, hook, Rule(chain), table=table))
    return ops


def disable_ops(plan: RedirectPlan, family: int, state: NatState, table: str = TABLE) -> list[Op]:
    """Remove every jump to our chains from the hooks, then flush and delete our chains."""
    owned = plan.owned_chains
    ops = [
        Op("delete-jump", family, hook, Rule(target), nonfatal=True, table=table)
        for hook in HOOKS
        for target in state.jumps.get(hook, ())
        if target in owned
    ]
    present = [chain for chain in owned if chain in state.chains]
    ops += [Op("flush", family, chain, nonfatal=True, table=table) for chain in present]
    ops += [Op("delete-chain", family, chain, table=table) for chain in present]
    return ops


class IptablesBackend(backends.Backend[Op]):
    name = "iptables"
    description = "legacy xtables through python-iptables"
    mechanism = "legacy xtables"
    ours_found = "our chains already exist in legacy xtables"
    ours_are = "our chains are"
    missing = "python-iptables cannot be imported"
    install_hint = "apt-get install python3-iptables iptables"

    def __init__(self, *, dry_run: bool = False, log: Callable[[str], None] = print_line):
        super().__init__(dry_run=dry_run, log=log)
        self._lock_depth = 0
        self._workers: dict[int, FamilyWorker] = {}

    @classmethod
    def is_supported(cls) -> bool:
        try:
            import iptc  # noqa: F401 - loads libiptc and libxtables, no extension
        except Exception:  # ImportError, or OSError/XTablesError when libxtables is missing
            return False
        return True

    # -- kernel access (python-iptables, in one worker process per family) ---------------

    def _worker(self, family: int) -> FamilyWorker:
        if family not in self._workers:
            self._workers[family] = FamilyWorker(family)
        return self._workers[family]

    def _make(self, op: Op) -> None:
        self._worker(op.family).call("apply", op)

    def _already_gone(self, op: Op, error: OperationFailed) -> bool:
        return op.nonfatal  # a jump or a chain removed meanwhile: what removal wanted

    def _read_state(self, family: int, table: str = TABLE) -> NatState:
        """Our view of one family's nat (or mangle) table; never creates the table just to
        look at it."""
        if table not in legacy_tables(family):
            return NatState()
        chains, jumps = self._worker(family).call("read_state", HOOKS, table)
        return NatState(chains, jumps)

    def _rows(self, family: int, chain: str, table: str = TABLE) -> list[tuple[str, int, int]]:
        rows: list[tuple[str, int, int]] = self._worker(family).call("rows", chain, table)
        return rows

    def close(self) -> None:
        for worker in self._workers.values():
            worker.close()
        self._workers.clear()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the xtables lock (as iptables-legacy does) around a whole enable/disable."""
        if self.dry_run or self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        path = os.environ.get("XTABLES_LOCKFILE", XTABLES_LOCK)
        with open(path, "a") as handle:
            deadline = time.monotonic() + LOCK_TIMEOUT
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise NetsetupError(
                            f"another process holds {path} (iptables-legacy?) "
                            f"for more than {LOCK_TIMEOUT:.0f}s"
                        ) from None
                    time.sleep(0.1)
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1

    # -- Backend interface ---------------------------------------------------------------

    def check(self, plan: RedirectPlan) -> None:
        if not self.is_supported():
            raise KernelSupportError(
                "python-iptables (module iptc) cannot be imported: install python-iptables "
                "and the iptables package (libxtables)"
            )
        for family in plan.families:
            rules = [r for _hook, _chain, rs in chain_layout(plan, family) for r in rs]
            self._worker(family).call("check_rules", rules)
        for family in plan.families:
            self._check_kernel(plan, family)

    def _check_kernel(self, plan: RedirectPlan, family: int) -> None:
        if not self.dry_run:  # opening the table creates it; a dry run changes nothing
            self._worker(family).call("open_nat", plan.table)
        needed = {"targets": ["REDIRECT"], "matches": ["tcp", "addrtype"]}
        if plan.table != TABLE:
            needed = {"targets": ["TPROXY", "MARK"], "matches": ["tcp", "addrtype", "socket"]}
        if plan.local:
            needed["matches"].append("owner")
        missing = []
        for kind, names in needed.items():
            for name in names:
                if name in kernel_xt_names(family, kind):
                    continue
                if not self.dry_run:
                    self._worker(family).call("load_module", KERNEL_MODULES[name])
                if name not in kernel_xt_names(family, kind):
                    missing.append(KERNEL_MODULES[name])
        if missing and self.dry_run:
            self.log(f"  (IPv{family}: the kernel does not list {', '.join(missing)} yet)")
        elif missing:
            raise KernelSupportError(
                f"IPv{family}: the kernel lacks {', '.join(missing)} (modprobe failed)", family
            )

    def enable(self, plan: RedirectPlan) -> None:
        with self._locked():
            self.disable(plan)
            for family in plan.families:
                for op in enable_ops(plan, family):
                    self._apply(op)

    def disable(self, plan: RedirectPlan) -> None:
        """Each family and table in its own try: a failure in one does not skip the others."""
        # both tables, whatever the mode: a plan's chains from a run in the other mode
        # (TransparentProxy changed since) are its own too
        tables = sorted(TABLES, key=lambda t: t != plan.table)
        with self._locked():
            self._each(
                [(family, table) for family in plan.families for table in tables],
                lambda where: self._disable_table(plan, *where),
            )

    def _disable_table(self, plan: RedirectPlan, family: int, table: str) -> None:
        try:
            state = self._state_or_empty(family, table)
        except NetsetupError:
            raise
        except Exception as error:  # reading the state failed
            raise NetsetupError(
                f"IPv{family}: cannot read the legacy {table} table: {error}"
            ) from None
        others = sorted(
            c for c in state.chains
            if c.startswith(CHAIN_PREFIX + "-") and c not in plan.owned_chains
        )
        if others and not set(plan.owned_chains) & state.chains and table == plan.table:
            self.log(
                f"  (IPv{family}: none of ours, but {', '.join(others)} exist: "
                "installed with another --proxy-port?)"
            )
        for op in disable_ops(plan, family, state, table):
            self._remove(op)

    def _state_or_empty(self, family: int, table: str = TABLE) -> NatState:
        try:
            return self._read_state(family, table)
        except Exception as error:
            if not self.dry_run:
                raise
            self.log(
                f"  (IPv{family}: cannot read the current rules ({error}); "
                "showing the changes from an empty table)"
            )
            return NatState()

    def survey(self, plan: RedirectPlan, nft: tuple[NftTable, ...] | None) -> backends.Presence:
        supported = self.is_supported()
        rules = self.host_rules() if supported else {}
        text = ", ".join(f"{t} ({n} rules)" for t, n in rules.items()) or "none"
        return backends.Presence(
            ours=supported and self.owns_objects(plan),
            rules=rules,
            in_use=any(rules.values()),
            text=f"{self.mechanism}: {text}",
        )

    def beside(self, other: backends.Backend[Any], found: backends.Presence,
               host: str) -> str:
        return (
            f"the host's rules are in {other.mechanism} ({', '.join(found.rules)}); these "
            "legacy xtables rules work next to them, but `iptables` (iptables-nft) does not "
            "list them and warns that legacy tables are present: see them with "
            "iptables-legacy-save -t nat / ip6tables-legacy-save -t nat"
        )

    def owns_objects(self, plan: RedirectPlan) -> bool:
        try:
            return any(
                set(plan.owned_chains) & self._read_state(family, table).chains
                for family in (4, 6)
                for table in TABLES
            )
        except Exception:
            return False

    def host_rules(self) -> dict[str, int]:
        """Rules in the legacy tables that exist already, not counting our own chains."""
        counts: dict[str, int] = {}
        for family in (4, 6):
            names = legacy_tables(family)
            if not names:
                continue
            try:
                found = self._worker(family).call("host_rules", names, CHAIN_PREFIX + "-")
            except Exception:
                continue
            prefix = "ip" if family == 4 else "ip6"
            counts.update({f"{prefix} {name}": n for name, n in found.items()})
        return counts

    def status(self, plan: RedirectPlan) -> list[str]:
        lines = []
        for family in plan.families:
            lines += self._family_status(plan, family)
        return lines

    def _family_status(self, plan: RedirectPlan, family: int) -> list[str]:
        title = f"IPv{family} ({_command(family)}, table {plan.table})"
        state = self._read_state(family, plan.table)
        ours = [c for c in plan.owned_chains if c in state.chains]
        others = sorted(
            c for c in state.chains if c.startswith(CHAIN_PREFIX + "-") and c not in ours
        )
        lines = []
        if not ours:
            lines.append(f"{title}: not installed")
        else:
            layout = chain_layout(plan, family)
            expected = {
                chain: [f"-A {chain} {rule_args(r)}" for r in rules] for _, chain, rules in layout
            }
            problems = []
            body = []
            for hook in HOOKS:
                rows = self._rows(family, hook, plan.table)
                for number, (text, packets, nbytes) in enumerate(rows, start=1):
                    if text.split()[-1] in ours:
                        where = f"   [rule {number} of {len(rows)} in {hook}]"
                        body.append(_counted(f"-A {hook} {text}{where}", packets, nbytes))
            for chain in ours:
                jumps = sum(state.jumps.get(h, ()).count(chain) for h in HOOKS)
                if jumps != 1:
                    problems.append(f"{chain} is jumped to {jumps} times, not once")
                installed = []
                for text, packets, nbytes in self._rows(family, chain, plan.table):
                    installed.append(f"-A {chain} {text}")
                    body.append(_counted(installed[-1], packets, nbytes))
                if chain not in expected:
                    problems.append(f"{chain} is installed but not in the plan")
                elif installed != expected[chain]:
                    problems.append(f"{chain} differs from the plan")
            problems += [f"{c} is in the plan but not installed" for c in expected if c not in ours]
            lines.append(f"{title}: {'installed' if not problems else 'installed, NOT as planned'}")
            lines += [f"  ! {p}" for p in problems]
            if problems:
                lines.append("  (compared with the plan these options describe; enable converges)")
            lines.append(f"  {'pkts':>10} {'bytes':>12}  rule")
            lines += body
        if others:
            lines.append(
                f"  other clamsmtp-netsetup chains here: {', '.join(others)} (other --proxy-port)"
            )
        for table in TABLES:
            if table != plan.table and set(plan.owned_chains) & self._read_state(family,
                                                                                 table).chains:
                lines.append(f"  ! our chains are also in table {table} (the other --mode): "
                             "disable removes them, enable replaces them")
        return lines


def _counted(text: str, packets: int, nbytes: int) -> str:
    return f"  {packets:>10} {nbytes:>12}  {text}"


Backend = IptablesBackend
