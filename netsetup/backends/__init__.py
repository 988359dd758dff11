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
from typing import Any, TypeVar

from netsetup.changes import KernelChanges, print_line
from netsetup.discovery import NftTable
from netsetup.errors import KernelSupportError, UsageError
from netsetup.plan import RedirectPlan

NAMES = ("iptables", "nft")
AUTO_ORDER = ("iptables", "nft")  # the first one is the default: a host without rules gets it

Op = TypeVar("Op")


@dataclass(frozen=True)
class Presence:
    """What one mechanism holds on this host, read before anything changes (for ``auto``)."""

    ours: bool  # this plan's own objects are there
    rules: dict[str, int]  # the host's own tables there (not ours): {table: rules}
    in_use: bool  # the host's rules live there
    text: str  # for the "host rules:" line, e.g. "nftables: ip filter (12 rules)"


class Backend(KernelChanges[Op]):
    """One firewall mechanism: ``enable``/``disable`` (KernelChanges), plus what only a backend
    has: whether it can work here, what it already holds, a check before any change, and
    ``status``.  The words ``choose`` says about a backend are the backend's own."""

    description: str = ""
    mechanism: str = ""  # "nftables"
    ours_found: str = ""  # why auto keeps it: "our table already exists in nftables"
    ours_are: str = ""  # "our table is"
    missing: str = ""  # what is missing when not is_supported(): "the nft command is missing"
    install_hint: str = ""  # "apt-get install nftables"

    @classmethod
    @abstractmethod
    def is_supported(cls) -> bool:
        """Can this backend work on this host at all (libraries present)?"""

    @abstractmethod
    def survey(self, plan: RedirectPlan, nft: tuple[NftTable, ...] | None) -> Presence:
        """What this mechanism holds here (read-only); ``nft``: discovery's nftables tables."""

    @abstractmethod
    def beside(self, other: Backend[Any], found: Presence, host: str) -> str:
        """The warning when this backend is used while the host's rules are in ``other``."""

    def check(self, plan: RedirectPlan) -> None:  # noqa: B027 - optional hook
        """Raise KernelSupportError (or another NetsetupError) before any change is made."""

    @abstractmethod
    def status(self, plan: RedirectPlan) -> list[str]:
        """Lines describing what is installed, with packet and byte counters."""


def get_backend(name: str) -> type[Backend[Any]]:
    if name not in NAMES:
        raise UsageError(f"unknown backend {name!r} (choose from auto, {', '.join(NAMES)})")
    module = importlib.import_module(f"netsetup.backends.{name}")
    backend: type[Backend[Any]] = module.Backend
    return backend


@dataclass(frozen=True)
class Choice:
    backend: Backend[Any]
    reason: str  # why this backend
    host: str  # where the host's own rules are
    warnings: tuple[str, ...] = ()
    also: tuple[Backend[Any], ...] = ()  # other backends that hold this plan's objects too


def choose(
    name: str,
    plan: RedirectPlan,
    nft: tuple[NftTable, ...] | None,
    *,
    dry_run: bool = False,
    log: Callable[[str], None] = print_line,
) -> Choice:
    """The backend to use, and why.

    Every backend of AUTO_ORDER says what it holds here (``survey``).  ``auto``: the first
    that already holds this plan's own objects; otherwise the one the host's rules live in, if
    they live in one other than the default; otherwise the first that works here (the
    default, iptables).  An explicit name is used as asked.  Either way a warning says when it
    mixes mechanisms, and ``Choice.also`` lists the others that hold this plan's objects too
    (``enable`` refuses, ``disable`` cleans them).
    """
    if name != "auto":
        get_backend(name)  # an unknown name is a usage error
    backends = [get_backend(n)(dry_run=dry_run, log=log) for n in AUTO_ORDER]
    found = {b.name: b.survey(plan, nft) for b in backends}
    host = "; ".join(found[b.name].text for b in backends)
    warnings: list[str] = []
    if name == "auto":
        backend, why = _auto(backends, found, warnings)
        reason = f"chosen by auto: {why}"
    else:
        backend = next(b for b in backends if b.name == name)
        reason = f"chosen by --backend {name}"
    also = tuple(b for b in backends if b is not backend and found[b.name].ours)
    for unused in backends:
        if unused is not backend and unused not in also:
            unused.close()
    warnings += [
        backend.beside(other, found[other.name], host)
        for other in backends
        if other is not backend and found[other.name].in_use
    ]
    return Choice(backend, reason, host, tuple(warnings), also)


def _auto(
    backends: list[Backend[Any]], found: dict[str, Presence], warnings: list[str]
) -> tuple[Backend[Any], str]:
    for backend in backends:
        if found[backend.name].ours and backend.is_supported():
            return backend, backend.ours_found
    users = [b for b in backends if found[b.name].in_use]
    sole = users[0] if len(users) == 1 and users[0] is not backends[0] else None
    if sole is not None and sole.is_supported():
        return sole, f"the host's rules are in {sole.mechanism}"
    usable = [b for b in backends if b.is_supported()]
    if not usable:
        raise KernelSupportError(
            "no backend works here: tried "
            + ", ".join(f"{b.name} ({b.description})" for b in backends)
        )
    chosen = usable[0]
    owner = next((b for b in backends if found[b.name].ours), None)  # one that cannot work
    wanted = owner or sole
    if wanted is not None:  # it would have been chosen
        what = wanted.ours_are if owner else "the host's rules are"
        warnings.append(
            f"{what} in {wanted.mechanism}, but {wanted.missing} ({wanted.install_hint}): "
            f"using {chosen.name} instead"
        )
        return chosen, wanted.missing
    if chosen is not backends[0]:
        return chosen, backends[0].missing
    if any(found[b.name].in_use for b in backends if b is not chosen):
        return chosen, f"the host uses {chosen.mechanism}"
    return chosen, "no rules in " + ", ".join(b.mechanism for b in backends if b is not chosen)
