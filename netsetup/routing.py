"""TPROXY's policy routing, through pyroute2: one ``ip rule`` and one local route per family.

A TPROXY'd connection is addressed to another host (the mail server), and so are the server's
replies to clamsmtpd's connection made from the client's address. Both arrive marked by our
mangle rules (``plan.fwmark``); this rule sends marked packets to our own table, whose only
route says "every address is local here", so they are delivered to clamsmtpd's sockets
instead of being forwarded:

    ip -4 rule add fwmark 0x2729/0xffff lookup 10025 priority 9025
    ip -4 route add local 0.0.0.0/0 dev lo table 10025      (and -6, ::/0)

Each change is a ``RouteOp``: it prints as that ``ip`` command, is what ``--dry-run`` shows, and
is all ``_apply`` (``netsetup.changes``, shared with the backends) ever gets. ``disable``
removes exactly ours (our mark, mask, table and priority; the local default route in our
table) and nothing else; ``enable`` starts with it.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from netsetup.changes import KernelChanges, print_line
from netsetup.errors import NetsetupError, OperationFailed
from netsetup.plan import MARK_MASK, RULE_PRIORITY, Mode, RedirectPlan

AF = {4: socket.AF_INET, 6: socket.AF_INET6}
ANY = {4: "0.0.0.0/0", 6: "::/0"}
RTN_LOCAL = 2
RT_SCOPE_HOST = 254
RTPROT_BOOT = 3


@dataclass(frozen=True)
class RouteOp:
    """One policy-routing change of one family."""

    action: str  # add-rule | del-rule | add-route | del-route
    family: int
    mark: int
    table: int
    priority: int = RULE_PRIORITY

    def __str__(self) -> str:
        verb = "add" if self.action.startswith("add") else "del"
        if self.action.endswith("rule"):
            return (f"ip -{self.family} rule {verb} fwmark 0x{self.mark:x}/0x{MARK_MASK:x} "
                    f"lookup {self.table} priority {self.priority}")
        return f"ip -{self.family} route {verb} local {ANY[self.family]} dev lo table {self.table}"


@dataclass(frozen=True)
class RouteState:
    rules: int  # our rules present (duplicates count)
    routes: int  # our local default routes present in our table
    other_routes: int  # other routes in our table (not ours: left alone, reported)


def enable_ops(plan: RedirectPlan, family: int) -> list[RouteOp]:
    return [RouteOp("add-route", family, plan.fwmark, plan.route_table),
            RouteOp("add-rule", family, plan.fwmark, plan.route_table)]


def disable_ops(plan: RedirectPlan, family: int, state: RouteState) -> list[RouteOp]:
    """The rule first (nothing is sent to the table any more), then the route."""
    return ([RouteOp("del-rule", family, plan.fwmark, plan.route_table)] * state.rules
            + [RouteOp("del-route", family, plan.fwmark, plan.route_table)] * state.routes)


class PolicyRouting(KernelChanges[RouteOp]):
    """The ip rules and routes of a TPROXY plan, with the backends' dry run and logging."""

    name = "policy routing"

    def __init__(self, *, dry_run: bool = False, log: Callable[[str], None] = print_line):
        super().__init__(dry_run=dry_run, log=log)
        # pyroute2.IPRoute (untyped): one netlink socket for the whole command (opening one is
        # slow)
        self._conn: Any = None

    # -- kernel access ---------------------------------------------------------------------

    def _ipr(self) -> Any:
        if self._conn is None:
            from pyroute2 import IPRoute

            self._conn = IPRoute()
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _make(self, op: RouteOp) -> None:
        ipr = self._ipr()
        family = AF[op.family]
        if op.action.endswith("rule"):
            ipr.rule(op.action[:3], family=family, priority=op.priority,
                     fwmark=op.mark, fwmask=MARK_MASK, table=op.table)
        else:
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.route(op.action[:3], family=family, type=RTN_LOCAL, oif=lo,
                      table=op.table, dst=ANY[op.family].split("/")[0], dst_len=0,
                      scope=RT_SCOPE_HOST if op.family == 4 else 0,
                      proto=RTPROT_BOOT)

    def _reason(self, error: Exception) -> str:
        """NetlinkError(code, text): the text ("No such file or directory")."""
        reason = error.args
        text = reason[1] if len(reason) > 1 and isinstance(reason[1], str) else str(error)
        return text or type(error).__name__

    def _already_gone(self, op: RouteOp, error: OperationFailed) -> bool:
        return error.reason.startswith("No such")

    def read(self, plan: RedirectPlan, family: int) -> RouteState:
        try:
            ipr = self._ipr()
            rules = sum(
                1 for r in ipr.get_rules(family=AF[family])
                if r.get_attr("FRA_FWMARK") == plan.fwmark
                and r.get_attr("FRA_FWMASK") == MARK_MASK
                and (r.get_attr("FRA_TABLE") or r["table"]) == plan.route_table
                and r.get_attr("FRA_PRIORITY") == RULE_PRIORITY
            )
            routes = ipr.get_routes(family=AF[family], table=plan.route_table)
        except Exception as error:
            raise NetsetupError(f"IPv{family}: cannot read ip rules and routes: {error}") from None
        ours = sum(1 for r in routes if r["type"] == RTN_LOCAL and r["dst_len"] == 0)
        return RouteState(rules, ours, len(routes) - ours)

    # -- what the CLI calls ----------------------------------------------------------------

    def enable(self, plan: RedirectPlan) -> None:
        self.disable(plan)
        if plan.mode is not Mode.TPROXY:
            return
        for family in plan.families:
            state = self.read(plan, family) if not self.dry_run else RouteState(0, 0, 0)
            if state.other_routes:
                raise NetsetupError(
                    f"IPv{family}: routing table {plan.route_table} holds routes that are not "
                    f"ours (ip -{family} route show table {plan.route_table}): TPROXY needs it "
                    "for itself; remove them or use another proxy port"
                )
            for op in enable_ops(plan, family):
                self._apply(op)

    def disable(self, plan: RedirectPlan) -> None:
        """Ours in every family of the plan, whatever the mode (one left from a tproxy run);
        each family, and each removal, in its own try."""
        self._each(plan.families, lambda family: self._disable_family(plan, family))

    def _disable_family(self, plan: RedirectPlan, family: int) -> None:
        try:
            state = self.read(plan, family)
        except NetsetupError:
            if self.dry_run:
                return
            raise
        self._each(disable_ops(plan, family, state), self._remove)

    def status(self, plan: RedirectPlan) -> list[str]:
        lines = []
        for family in plan.families:
            state = self.read(plan, family)
            rule, route = (str(op) for op in enable_ops(plan, family)[::-1])
            wanted = plan.mode is Mode.TPROXY
            if wanted and not (state.rules or state.routes):
                lines.append(f"  policy routing IPv{family}: not installed ({rule}; {route})"
                             .replace(" add ", " "))
                continue
            for what, count, text in (("rule", state.rules, rule), ("route", state.routes,
                                                                      route)):
                shown = text.replace(" add ", " ", 1)
                if count == 1 and wanted:
                    lines.append(f"  policy {what} IPv{family}: present: {shown}")
                elif count == 0 and wanted:
                    lines.append(f"  ! policy {what} IPv{family}: MISSING: {shown} "
                                 "(enable puts it back)")
                elif count and not wanted:
                    lines.append(f"  ! policy {what} IPv{family}: left from --mode tproxy: "
                                 f"{shown} (disable removes it)")
                elif count > 1:
                    lines.append(f"  ! policy {what} IPv{family}: {count} copies: {shown}")
            if state.other_routes and wanted:
                lines.append(f"  ! IPv{family}: table {plan.route_table} also holds "
                             f"{state.other_routes} route(s) that are not ours")
        return lines
