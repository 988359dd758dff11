"""nftables: a clear refusal that hands over the equivalent ruleset.

This build writes no nftables rules (python-iptables only drives legacy xtables, and Debian's
python3-nftables bindings are not available to it).  When the host's rules live in nftables, or
``--backend nft`` is asked for, ``enable``/``disable`` raise NftablesHost (exit 6) carrying an
``nft -f`` script with the same layout as the iptables backend, in a table the script owns:
``<family> clamsmtp-<port>``.  Removing it is one ``delete table``.  ``status`` reads (through
pyroute2) whether such a table exists.
"""

from __future__ import annotations

from netsetup import backends
from netsetup.discovery import nft_tables
from netsetup.errors import NftablesHost
from netsetup.plan import HOOK_FORWARDED, RedirectPlan, Rule, chain_layout

NAT_PRIORITY = -100  # dstnat


def table_family(plan: RedirectPlan) -> str:
    families = set(plan.families)
    return "inet" if families == {4, 6} else ("ip" if families == {4} else "ip6")


def table_name(plan: RedirectPlan) -> str:
    return f"clamsmtp-{plan.proxy_port}"


def rule_statement(rule: Rule) -> str:
    words = []
    for key, net in (("saddr", rule.source), ("daddr", rule.destination)):
        if net is not None:
            words.append(f"{'ip' if net.version == 4 else 'ip6'} {key} {net}")
    if rule.in_interface:
        name = rule.in_interface
        name = name[:-1] + "*" if name.endswith("+") else name  # iptables' wildcard
        words.append(f'iifname "{name}"')
    if rule.dport is not None:
        words.append(f"{rule.protocol or 'tcp'} dport {rule.dport}")
    if rule.dst_local:
        words.append("fib daddr type local")
    if rule.uid_owner is not None:
        words.append(f"meta skuid {rule.uid_owner}")
    words.append("counter")
    if rule.target == "RETURN":
        words.append("return")
    elif rule.target == "REDIRECT":
        words.append(f"redirect to :{rule.to_port}")
    else:
        words.append(f"jump {rule.target}")
    return " ".join(words)


def removal_command(plan: RedirectPlan) -> str:
    return f"nft delete table {table_family(plan)} {table_name(plan)}"


def render_script(plan: RedirectPlan) -> str:
    """An ``nft -f`` script equivalent to what the iptables backend installs for ``plan``.

    It starts by (creating and) deleting its own table, so applying it twice converges.
    """
    family, name = table_family(plan), table_name(plan)
    layout = chain_layout(plan, None if family == "inet" else plan.families[0])
    lines = [
        "#!/usr/sbin/nft -f",
        f"# clamsmtp-netsetup: transparent SMTP redirect to port {plan.proxy_port}",
        f"# apply: nft -f FILE    remove: {removal_command(plan)}",
        f"table {family} {name}",
        f"delete table {family} {name}",
        f"table {family} {name} {{",
    ]
    for hook, _chain, rules in layout:
        nft_hook = "prerouting" if hook == HOOK_FORWARDED else "output"
        lines.append(f"\tchain {nft_hook} {{")
        lines.append(f"\t\ttype nat hook {nft_hook} priority {NAT_PRIORITY}; policy accept;")
        lines += [f"\t\t{rule_statement(rule)}" for rule in rules]
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"


class NftBackend(backends.Backend):
    name = "nft"
    description = "nftables; this build only prints the equivalent ruleset"

    @classmethod
    def is_supported(cls) -> bool:
        return False  # writes nothing; see the module docstring

    def _refuse(self, plan: RedirectPlan, what: str, script: str) -> None:
        raise NftablesHost(
            f"the nft backend cannot {what} here: this build writes legacy xtables only "
            "(python-iptables) and has no nftables bindings (Debian's python3-nftables). "
            "Apply the nft commands printed above with `nft -f`, or use --backend iptables "
            "to install legacy xtables rules next to the nftables ones",
            script,
        )

    def enable(self, plan: RedirectPlan) -> None:
        self._refuse(plan, "install rules", render_script(plan))

    def disable(self, plan: RedirectPlan) -> None:
        tables = nft_tables()
        if tables is not None and not any(t.name == table_name(plan) for t in tables):
            return  # nothing of ours to remove
        self._refuse(plan, "remove rules", removal_command(plan) + "\n")

    def status(self, plan: RedirectPlan) -> list[str]:
        family, name = table_family(plan), table_name(plan)
        tables = nft_tables()
        if tables is None:
            return [f"nftables: cannot read the ruleset; try: nft list table {family} {name}"]
        mine = [t for t in tables if t.name == name]
        if not mine:
            return [f"nftables table {family} {name}: not installed"]
        return [
            f"nftables table {t}: installed ({t.chains} chains, {t.rules} rules); "
            f"counters: nft list table {t}"
            for t in mine
        ]


Backend = NftBackend
