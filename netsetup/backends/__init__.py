"""One backend per firewall mechanism, a registry, and the ``auto`` choice.

A backend owns named objects only (chains ``CLAMSMTP-<port>[-LOCAL]``, or the nftables table
``clamsmtp-<port>``), so several instances can coexist and removal finds exactly its own.
``enable`` starts with ``disable``; ``disable`` removes whatever of its own it finds and nothing
else; ``status`` only reads.  Every kernel change goes through the one ``_apply(op)`` of
``netsetup.changes.KernelChanges`` (for nft, ``op`` is one ``nft -f -`` transaction): a backend
writes only how to make one operation, which operations enable and disable are, and how to read
back what is ours.
"""

from __future__ import annotations

import importlib
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from netsetup.changes import KernelChanges, print_line
from netsetup.discovery import NftTable
from netsetup.errors import KernelSupportError, UsageError
from netsetup.plan import RedirectPlan

NAMES = ("iptables", "nft")
AUTO_ORDER = ("iptables", "nft")
NFT_FAMILIES = ("ip", "ip6", "inet")  # the nftables families our tables can have
NFT_PREFIX = "clamsmtp-"


def is_our_table(table: NftTable, proxy_port: int | None = None) -> bool:
    """An ip/ip6/inet ``clamsmtp-<port>`` table (any port when ``proxy_port`` is None).

    A table of another family with such a name (``netdev clamsmtp-10025``) is not ours."""
    if table.family not in NFT_FAMILIES:
        return False
    if proxy_port is None:
        return table.name.startswith(NFT_PREFIX)
    return table.name == f"{NFT_PREFIX}{proxy_port}"


Op = TypeVar("Op")


class Backend(KernelChanges[Op]):
    """One firewall mechanism: ``enable``/``disable`` (KernelChanges), plus what only a backend
    has: whether it can work here, a check before any change, and ``status``."""

    description: str = ""

    @classmethod
    @abstractmethod
    def is_supported(cls) -> bool:
        """Can this backend work on this host at all (libraries present)?"""

    def check(self, plan: RedirectPlan) -> None:  # noqa: B027 - optional hook
        """Raise KernelSupportError (or another NetsetupError) before any change is made."""

    @abstractmethod
    def status(self, plan: RedirectPlan) -> list[str]:
        """Lines describing what is installed, with packet and byte counters."""

    def host_rules(self) -> dict[str, int]:
        """{table: rules} of this mechanism that are not ours (read-only, for ``auto``)."""
        return {}

    def owns_objects(self, plan: RedirectPlan) -> bool:
        """Whether any of this plan's own objects exist in this mechanism."""
        return False


def get_backend(name: str) -> type[Backend]:
    if name not in NAMES:
        raise UsageError(f"unknown backend {name!r} (choose from auto, {', '.join(NAMES)})")
    module = importlib.import_module(f"netsetup.backends.{name}")
    return module.Backend


@dataclass(frozen=True)
class Choice:
    backend: Backend
    reason: str  # why this backend
    host: str  # where the host's own rules are
    warnings: tuple[str, ...] = ()
    also: tuple[Backend, ...] = ()  # other backends that hold this plan's objects too


def describe_host(legacy: dict[str, int], nft: tuple[NftTable, ...] | None) -> str:
    legacy_text = ", ".join(f"{t} ({n} rules)" for t, n in legacy.items()) or "none"
    if nft is None:
        nft_text = "unknown (cannot read nftables)"
    else:
        nft_text = (
            ", ".join(f"{t} ({t.rules} rules)" for t in nft if t.chains and not is_our_table(t))
            or "none"
        )
    return f"legacy xtables: {legacy_text}; nftables: {nft_text}"


def choose(
    name: str,
    plan: RedirectPlan,
    nft: tuple[NftTable, ...] | None,
    *,
    dry_run: bool = False,
    log: Callable[[str], None] = print_line,
) -> Choice:
    """The backend to use, and why.

    ``auto``: the mechanism that already holds this plan's own objects; otherwise nft when the
    host's rules live only in nftables (iptables-nft or native nft) and the nft command is
    there; otherwise iptables (legacy xtables, through python-iptables).  An explicit name is
    used as asked, with a warning when it mixes mechanisms.  ``Choice.also`` lists the other
    backend when it holds this plan's objects too (``enable`` refuses, ``disable`` cleans it).
    """
    iptables = get_backend("iptables")(dry_run=dry_run, log=log)
    iptables_ok = iptables.is_supported()
    nft_ok = get_backend("nft").is_supported()
    legacy = iptables.host_rules() if iptables_ok else {}
    nft_tables = tuple(t for t in nft or () if t.chains and not is_our_table(t))
    host = describe_host(legacy, nft)
    nft_host = bool(nft_tables) and not any(legacy.values())
    owned = {
        "iptables": iptables_ok and iptables.owns_objects(plan),
        "nft": any(is_our_table(t, plan.proxy_port) for t in nft or ()),
    }
    warnings: list[str] = []
    if name == "auto":
        if owned["iptables"]:
            chosen, why = "iptables", "our chains already exist in legacy xtables"
        elif owned["nft"] and nft_ok:
            chosen, why = "nft", "our table already exists in nftables"
        elif nft_host and nft_ok:
            chosen, why = "nft", "the host's rules are in nftables"
        else:
            chosen = next((n for n in AUTO_ORDER if get_backend(n).is_supported()), None)
            if chosen is None:
                raise KernelSupportError(
                    "no backend works here: tried "
                    + ", ".join(f"{n} ({get_backend(n).description})" for n in AUTO_ORDER)
                )
            why = "no rules in nftables" if not nft_tables else "the host uses legacy xtables"
            if owned["nft"] or nft_host:  # nft would have been chosen
                why = "the nft command is missing"
                warnings.append(
                    ("our table is" if owned["nft"] else "the host's rules are")
                    + " in nftables, but the nft command is missing (apt-get install "
                    f"nftables): using {chosen} instead"
                )
        reason = f"chosen by auto: {why}"
    else:
        chosen, reason = name, f"chosen by --backend {name}"
    also: list[Backend] = []
    if chosen == "iptables":
        backend = iptables
    else:
        backend = get_backend(chosen)(dry_run=dry_run, log=log)
        if owned["iptables"]:
            also.append(iptables)
        else:
            iptables.close()
    if chosen != "nft" and owned["nft"]:
        also.append(get_backend("nft")(dry_run=dry_run, log=log))
    if chosen == "iptables" and nft_tables:
        warnings.append(
            "the host's rules are in nftables ("
            + ", ".join(str(t) for t in nft_tables)
            + "); these legacy xtables rules work next to them, but `iptables` (iptables-nft) "
            "does not list them and warns that legacy tables are present: "
            "see them with iptables-legacy-save -t nat / ip6tables-legacy-save -t nat"
        )
    if chosen == "nft" and any(legacy.values()):
        warnings.append(f"the host also has legacy xtables rules: {host}")
    return Choice(backend, reason, host, tuple(warnings), tuple(also))
