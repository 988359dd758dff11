"""What to install, as plain frozen data, and the rule layout every backend renders.

A RedirectPlan is built once from options, the daemon's Listen line and discovery; it is
validated here and never changes.  ``chain_layout`` is the backend-independent rule layout: a
list of ``Rule`` values per hook.  The iptables backend renders them as python-iptables rules,
the nft backend as an nftables script, so both install the same thing.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass, field

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

FAMILIES = (4, 6)
CHAIN_PREFIX = "CLAMSMTP"
HOOK_FORWARDED = "PREROUTING"  # connections routed through the gateway
HOOK_LOCAL = "OUTPUT"  # connections made on the gateway itself (--local)
DEFAULT_PORTS = (25,)
DEFAULT_USER = "clamsmtp"
#: TPROXY: the ip rule sending marked packets to our local route table comes before "main"
RULE_PRIORITY = 9025
MARK_MASK = 0xFFFF  # TPROXY: the mark bits netsetup owns (the value is the proxy port)


class Mode(enum.Enum):
    """How intercepted connections reach clamsmtpd (TransparentProxy: on -> redirect, full ->
    tproxy, or --mode)."""

    REDIRECT = "redirect"  # nat REDIRECT: the server sees the gateway's address
    TPROXY = "tproxy"  # mangle TPROXY + policy routing: the server sees the client's address

# Letters, digits and _ . @ - only, with an optional trailing "+" (iptables' wildcard; a bare
# "+" is every interface), 1-15 characters (IFNAMSIZ - 1).  Nothing that could end a quoted
# string or start a comment in an nft script, or an option in an iptables command.
_IFNAME = re.compile(r"[A-Za-z0-9_.@-]{0,14}[A-Za-z0-9_.@+-]")
IFNAME_RULE = "letters, digits, _ . @ - and an optional trailing +, 1 to 15 characters"


def check_interface_name(name: str) -> None:
    """Raise ValueError naming ``name`` unless it is a safe interface name or wildcard."""
    if not isinstance(name, str) or not _IFNAME.fullmatch(name):
        raise ValueError(f"invalid interface name {name!r} (allowed: {IFNAME_RULE})")


def chain_names(proxy_port: int) -> tuple[str, str]:
    """(forwarded chain, local chain) owned by the instance redirecting to ``proxy_port``."""
    return f"{CHAIN_PREFIX}-{proxy_port}", f"{CHAIN_PREFIX}-{proxy_port}-LOCAL"


def _check_port(port: int, what: str) -> None:
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"{what} must be 1..65535, not {port!r}")


@dataclass(frozen=True)
class RedirectPlan:
    proxy_port: int
    interfaces: tuple[str, ...] = ()
    ports: tuple[int, ...] = DEFAULT_PORTS
    families: tuple[int, ...] = FAMILIES
    exempt_sources: tuple[Network, ...] = ()
    exempt_destinations: tuple[Network, ...] = ()
    local: bool = False
    owner_uid: int | None = None  # the daemon's uid, exempt from the --local redirect
    owner_name: str | None = None
    mode: Mode = Mode.REDIRECT
    notes: tuple[str, ...] = field(default=(), compare=False)  # where values came from

    def __post_init__(self) -> None:
        _check_port(self.proxy_port, "the proxy port")
        if not self.ports:
            raise ValueError("at least one --port is needed")
        for port in self.ports:
            _check_port(port, "--port")
        if len(set(self.ports)) != len(self.ports):
            raise ValueError(f"--port given twice: {self.ports}")
        if not self.families or set(self.families) - set(FAMILIES):
            raise ValueError(f"families must be a non-empty subset of {FAMILIES}")
        for name in self.interfaces:
            check_interface_name(name)
        if len(set(self.interfaces)) != len(self.interfaces):
            raise ValueError(f"interface given twice: {self.interfaces}")
        for net in (*self.exempt_sources, *self.exempt_destinations):
            if not isinstance(net, ipaddress.IPv4Network | ipaddress.IPv6Network):
                raise ValueError(f"exemptions must be networks, not {net!r}")
        if self.local and self.owner_uid is None:
            raise ValueError("--local needs the daemon's uid (--user)")
        if self.local and self.mode is Mode.TPROXY:
            raise ValueError(
                "--local cannot work with --mode tproxy: TPROXY only sees packets arriving "
                "from another host (PREROUTING), not the gateway's own mail; use --mode "
                "redirect for that, or run clamsmtpd with TransparentProxy: on"
            )

    @property
    def table(self) -> str:
        """The netfilter table of this mode's rules."""
        return "mangle" if self.mode is Mode.TPROXY else "nat"

    @property
    def fwmark(self) -> int:
        """TPROXY: the mark of packets for our sockets (the proxy port, in MARK_MASK)."""
        return self.proxy_port & MARK_MASK

    @property
    def route_table(self) -> int:
        """TPROXY: the routing table that delivers marked packets locally (the proxy port)."""
        return self.proxy_port

    @property
    def chain(self) -> str:
        return chain_names(self.proxy_port)[0]

    @property
    def local_chain(self) -> str:
        return chain_names(self.proxy_port)[1]

    @property
    def owned_chains(self) -> tuple[str, str]:
        return chain_names(self.proxy_port)

    def hooks(self) -> tuple[tuple[str, str], ...]:
        """(hook, chain) pairs this plan jumps from."""
        pairs = [(HOOK_FORWARDED, self.chain)]
        if self.local:
            pairs.append((HOOK_LOCAL, self.local_chain))
        return tuple(pairs)


@dataclass(frozen=True)
class Rule:
    """One rule of the layout; a field left at None is not matched."""

    target: str  # "RETURN", "REDIRECT" or a chain name
    in_interface: str | None = None
    source: Network | None = None
    destination: Network | None = None
    protocol: str | None = None
    dport: int | None = None
    dst_local: bool = False  # -m addrtype --dst-type LOCAL / fib daddr type local
    uid_owner: int | None = None  # -m owner --uid-owner UID / meta skuid UID
    to_port: int | None = None  # REDIRECT --to-ports, TPROXY --on-port
    socket: bool = False  # -m socket --transparent / socket transparent 1
    mark: tuple[int, int] | None = None  # (value, mask): MARK --set-xmark, TPROXY --tproxy-mark
    on_ip: str | None = None  # TPROXY --on-ip (the family's any-address; nft: none)


def _exemptions(plan: RedirectPlan, family: int | None) -> list[Rule]:
    def wanted(net: Network) -> bool:
        return family is None or net.version == family

    rules = [Rule("RETURN", source=n) for n in plan.exempt_sources if wanted(n)]
    rules += [Rule("RETURN", destination=n) for n in plan.exempt_destinations if wanted(n)]
    # Mail addressed to the gateway itself (its own MTA) is not intercepted; this also keeps a
    # connection to the proxy's own address from being redirected again.
    rules.append(Rule("RETURN", dst_local=True))
    return rules


def chain_layout(plan: RedirectPlan, family: int | None) -> list[tuple[str, str, list[Rule]]]:
    """[(hook, chain, rules)] for one family (None: both, for nftables' inet), in order.

    Forwarded chain: exemptions, RETURN for local destinations, then one REDIRECT per
    interface and port.  Local chain (--local): RETURN for the daemon's uid first (its own
    forwarded mail must leave, not loop back), the same exemptions, then one REDIRECT per port.
    """
    if plan.mode is Mode.TPROXY:
        return [(HOOK_FORWARDED, plan.chain, _tproxy_rules(plan, family))]
    forwarded = _exemptions(plan, family) + [
        Rule("REDIRECT", in_interface=name, protocol="tcp", dport=port, to_port=plan.proxy_port)
        for name in plan.interfaces
        for port in plan.ports
    ]
    layout = [(HOOK_FORWARDED, plan.chain, forwarded)]
    if plan.local:
        local = [Rule("RETURN", uid_owner=plan.owner_uid), *_exemptions(plan, family)]
        local += [
            Rule("REDIRECT", protocol="tcp", dport=port, to_port=plan.proxy_port)
            for port in plan.ports
        ]
        layout.append((HOOK_LOCAL, plan.local_chain, local))
    return layout


def _tproxy_rules(plan: RedirectPlan, family: int | None) -> list[Rule]:
    """mangle PREROUTING: packets of a flow that already has one of our transparent sockets
    (the server's replies to the client's address, the client's next packets) are marked for
    local delivery and left alone; then the exemptions; then TPROXY for new connections."""
    mark = (plan.fwmark, MARK_MASK)
    on_ip = {4: "0.0.0.0", 6: "::", None: None}[family]
    return [
        Rule("MARK", protocol="tcp", socket=True, mark=mark),
        Rule("RETURN", protocol="tcp", socket=True),
        *_exemptions(plan, family),
        *(
            Rule("TPROXY", in_interface=name, protocol="tcp", dport=port,
                 to_port=plan.proxy_port, mark=mark, on_ip=on_ip)
            for name in plan.interfaces
            for port in plan.ports
        ),
    ]
