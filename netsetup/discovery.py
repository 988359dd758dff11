"""Read-only facts about this host (its current network namespace) for building a plan.

pyroute2 gives links, addresses and default routes; /proc gives forwarding and which legacy
xtables tables exist; pyroute2's nftables socket lists nftables tables.  Nothing here changes
the kernel, so ``status`` and ``--dry-run`` can show the plan before anything is touched.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

IFF_LOOPBACK = 0x8
IFF_UP = 0x1
RTN_UNICAST = 1
RT_TABLE_LOCAL = 255
NFPROTO_NAMES = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}


@dataclass(frozen=True)
class Interface:
    name: str
    index: int
    up: bool
    loopback: bool
    master: str | None  # enslaved to a bridge/bond: its traffic shows up on the master
    addresses: tuple[str, ...]  # "192.0.2.1/24", link-local IPv6 left out
    default_route: tuple[int, ...]  # families whose default route leaves through this link

    def describe(self) -> str:
        bits = list(self.addresses) or ["no address"]
        bits.append("up" if self.up else "DOWN")
        if self.master:
            bits.append(f"in {self.master}")
        return f"{self.name} ({', '.join(bits)})"


@dataclass(frozen=True)
class HostFacts:
    interfaces: tuple[Interface, ...]
    forwarding: dict[int, bool | None]  # family -> on/off, None when unknown
    ipv6: bool  # the kernel has IPv6 enabled

    def find(self, name: str) -> Interface | None:
        return next((i for i in self.interfaces if i.name == name), None)

    def default_interfaces(self) -> tuple[str, ...]:
        """Every interface that does not carry a default route, except loopback and ports."""
        return tuple(
            i.name
            for i in self.interfaces
            if not i.loopback and not i.default_route and i.master is None
        )

    def uplinks(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.interfaces if i.default_route)


@dataclass(frozen=True)
class NftTable:
    family: str  # "ip", "ip6", "inet", ...
    name: str
    chains: int
    rules: int

    def __str__(self) -> str:
        return f"{self.family} {self.name}"


def read_forwarding() -> dict[int, bool | None]:
    paths = {4: "/proc/sys/net/ipv4/ip_forward", 6: "/proc/sys/net/ipv6/conf/all/forwarding"}
    result: dict[int, bool | None] = {}
    for family, path in paths.items():
        try:
            with open(path) as handle:
                result[family] = handle.read().strip() != "0"
        except OSError:
            result[family] = None
    return result


def ipv6_enabled() -> bool:
    return os.path.exists("/proc/net/if_inet6")


def _default_route_oifs(ipr: Any, family: int) -> set[int]:  # ipr: pyroute2.IPRoute
    oifs: set[int] = set()
    for route in ipr.get_routes(family=family):
        if route["dst_len"] != 0 or route["type"] != RTN_UNICAST:
            continue
        if route.get_attr("RTA_TABLE") == RT_TABLE_LOCAL:
            continue
        if route.get_attr("RTA_OIF"):
            oifs.add(route.get_attr("RTA_OIF"))
        for hop in route.get_attr("RTA_MULTIPATH") or ():
            oifs.add(hop["oif"])
    return oifs


def discover() -> HostFacts:
    """Links, addresses and default routes of the current network namespace."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = list(ipr.get_links())
        addrs = list(ipr.get_addr())
        defaults = {4: _default_route_oifs(ipr, socket.AF_INET)}
        defaults[6] = _default_route_oifs(ipr, socket.AF_INET6) if ipv6_enabled() else set()
    names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in links}
    interfaces = []
    for link in links:
        index = link["index"]
        addresses = tuple(
            f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
            for a in addrs
            if a["index"] == index and not str(a.get_attr("IFA_ADDRESS")).startswith("fe80:")
        )
        master = link.get_attr("IFLA_MASTER")
        interfaces.append(
            Interface(
                name=names[index],
                index=index,
                up=bool(link["flags"] & IFF_UP),
                loopback=bool(link["flags"] & IFF_LOOPBACK),
                master=names.get(master, str(master)) if master else None,
                addresses=addresses,
                default_route=tuple(f for f in (4, 6) if index in defaults[f]),
            )
        )
    return HostFacts(tuple(interfaces), read_forwarding(), ipv6_enabled())


def legacy_tables(family: int) -> tuple[str, ...]:
    """Legacy xtables tables instantiated in this namespace (read from /proc, no side effect).

    A table shows up once something (iptables-legacy, python-iptables) has opened it; a table
    that is not listed holds no rules, and opening it to look would create it.
    """
    path = "/proc/net/ip_tables_names" if family == 4 else "/proc/net/ip6_tables_names"
    try:
        with open(path) as handle:
            return tuple(line.strip() for line in handle if line.strip())
    except OSError:
        return ()


def kernel_xt_names(family: int, kind: str) -> frozenset[str]:
    """Targets or matches (``kind``) the kernel's xtables knows for ``family``."""
    prefix = "ip" if family == 4 else "ip6"
    try:
        with open(f"/proc/net/{prefix}_tables_{kind}") as handle:
            return frozenset(line.strip() for line in handle)
    except OSError:
        return frozenset()


def nft_tables() -> tuple[NftTable, ...] | None:
    """nftables tables with their chain and rule counts; None if nftables cannot be read."""
    try:
        from pyroute2.nftables.main import NFTables

        nft = NFTables(nfgen_family=0)
        try:
            tables = [(t["nfgen_family"], t.get_attr("NFTA_TABLE_NAME")) for t in nft.get_tables()]
            chains = [(c["nfgen_family"], c.get_attr("NFTA_CHAIN_TABLE")) for c in nft.get_chains()]
            rules = [(r["nfgen_family"], r.get_attr("NFTA_RULE_TABLE")) for r in nft.get_rules()]
        finally:
            nft.close()
    except Exception:  # no nf_tables in the kernel, no permission, old pyroute2
        return None
    return tuple(
        NftTable(
            NFPROTO_NAMES.get(fam, str(fam)),
            name,
            chains.count((fam, name)),
            rules.count((fam, name)),
        )
        for fam, name in tables
    )
