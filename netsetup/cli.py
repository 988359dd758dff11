"""clamsmtp-netsetup enable | disable | status: transparent port-25 redirection to clamsmtpd.

Exit codes (netsetup.errors.ExitCode): 0 ok, 1 a change failed (iptables: our objects rolled
back; nft: one transaction, never rolled back), 2 usage or config error (also: our rules exist
with the other backend), 3 not root, 4 missing kernel support, 5 interface not found.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import pwd
import sys
from collections.abc import Callable

from netsetup import discovery
from netsetup.backends import Choice, choose
from netsetup.changes import enable_in_order
from netsetup.daemonconf import DEFAULT_CONFIG_PATH, Listen, read_listen, read_mode
from netsetup.errors import (
    EXTRA_MODULES,
    ExitCode,
    InterfaceNotFound,
    KernelSupportError,
    NetsetupError,
    NotRoot,
    OperationFailed,
    UsageError,
    missing_module_message,
)
from netsetup.plan import (
    DEFAULT_PORTS,
    DEFAULT_USER,
    Mode,
    RedirectPlan,
    check_interface_name,
)
from netsetup.routing import PolicyRouting

PROG = "clamsmtp-netsetup"
FORWARDING_SYSCTL = {4: "net.ipv4.ip_forward", 6: "net.ipv6.conf.all.forwarding"}


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r} (1..65535)")
    return int(text)


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid address or CIDR {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-i",
        "--interface",
        action="append",
        default=[],
        metavar="IFACE",
        help="intercept mail arriving on IFACE (repeatable; 'eth+' is a "
        "wildcard); default: every interface without a default route, "
        "except lo",
    )
    common.add_argument(
        "--port",
        action="append",
        type=_port,
        default=[],
        metavar="PORT",
        help="destination port to intercept (repeatable; default 25)",
    )
    common.add_argument(
        "--proxy-port",
        type=_port,
        metavar="PORT",
        help="local port clamsmtpd listens on; default: the Listen line of "
        "the config file, else 10025",
    )
    common.add_argument(
        "-f",
        "--config",
        metavar="FILE",
        help=f"clamsmtpd config file to read Listen from (default {DEFAULT_CONFIG_PATH})",
    )
    common.add_argument(
        "--exempt-source",
        action="append",
        type=_network,
        default=[],
        metavar="CIDR",
        help="never intercept mail from CIDR (repeatable)",
    )
    common.add_argument(
        "--exempt-destination",
        action="append",
        type=_network,
        default=[],
        metavar="CIDR",
        help="never intercept mail to CIDR (repeatable)",
    )
    common.add_argument("--ipv4", action="store_true", help="IPv4 only (default: both)")
    common.add_argument("--ipv6", action="store_true", help="IPv6 only (default: both)")
    common.add_argument(
        "--local",
        action="store_true",
        help="also intercept mail sent by the gateway itself (nat OUTPUT), "
        "except the daemon's own (--user)",
    )
    common.add_argument(
        "--user",
        default=DEFAULT_USER,
        metavar="USER",
        help=f"the daemon's user, exempt with --local (default {DEFAULT_USER})",
    )
    common.add_argument(
        "--mode",
        choices=("redirect", "tproxy"),
        help="redirect (nat REDIRECT: the server sees the gateway) or tproxy (mangle TPROXY "
        "and policy routing: the server sees the client; clamsmtpd needs TransparentProxy: "
        "full); default: tproxy if the config file says TransparentProxy: full, else redirect",
    )
    common.add_argument(
        "--dry-run", action="store_true", help="print what would be done and change nothing"
    )
    common.add_argument(
        "--backend",
        choices=("auto", "iptables", "nft"),
        default="auto",
        help="firewall mechanism (default auto)",
    )
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Redirect intercepted SMTP (TCP port 25) to the local clamsmtpd.",
        epilog="exit codes: 0 ok, 1 change failed (iptables: rolled back; nft: one transaction, "
        "never rolled back), 2 usage/config (also: ours exist with the other backend), 3 not root, "
        "4 missing kernel support (or the nft command), 5 interface not found",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("enable", parents=[common], help="install the redirect rules")
    commands.add_parser("disable", parents=[common], help="remove exactly our own rules")
    commands.add_parser("status", parents=[common], help="show rules, counters, interfaces")
    return parser


def _out(line: str = "") -> None:
    print(line, flush=True)


def _warn(text: str) -> None:
    print(f"{PROG}: warning: {text}", file=sys.stderr, flush=True)


def _listen(args: argparse.Namespace) -> Listen:
    if args.proxy_port is not None:
        return Listen(None, args.proxy_port, "--proxy-port")
    return read_listen(args.config or DEFAULT_CONFIG_PATH, explicit=args.config is not None)


def _mode(args: argparse.Namespace) -> tuple[Mode, str]:
    if args.mode:
        return Mode(args.mode), "--mode"
    if args.proxy_port is not None and args.config is None:
        return Mode.REDIRECT, "default (no config file read: --proxy-port)"
    mode, origin = read_mode(args.config or DEFAULT_CONFIG_PATH, explicit=args.config is not None)
    return Mode(mode), origin


def _families(args: argparse.Namespace, facts: discovery.HostFacts) -> tuple[tuple[int, ...], bool]:
    """(families, defaulted)."""
    if args.ipv4 or args.ipv6:
        families = tuple(f for f, on in ((4, args.ipv4), (6, args.ipv6)) if on)
        if 6 in families and not facts.ipv6:
            raise KernelSupportError("--ipv6: IPv6 is disabled in this kernel")
        return families, False
    return ((4, 6) if facts.ipv6 else (4,)), True


def _safe_names(names: tuple[str, ...]) -> tuple[str, ...]:
    """Discovered names that pass the interface-name rule; the others are skipped, loudly."""
    safe = []
    for name in names:
        try:
            check_interface_name(name)
        except ValueError as error:
            _warn(f"skipping discovered interface: {error}")
            continue
        safe.append(name)
    return tuple(safe)


def _interfaces(args: argparse.Namespace, facts: discovery.HostFacts) -> tuple[str, ...]:
    for name in args.interface:  # before anything looks them up: a bad name is a usage error
        try:
            check_interface_name(name)
        except ValueError as error:
            raise UsageError(f"--interface: {error}") from None
    if not args.interface:
        found = _safe_names(facts.default_interfaces())
        if not found and args.command == "enable":
            raise InterfaceNotFound(
                "no interface to intercept on: every interface is loopback or carries a "
                "default route; name one with --interface"
            )
        return found
    if args.command == "enable":
        for name in args.interface:
            if name.endswith("+"):
                if not any(i.name.startswith(name[:-1]) for i in facts.interfaces):
                    _warn(f"no interface matches {name!r} yet")
            elif facts.find(name) is None:
                have = ", ".join(i.name for i in facts.interfaces)
                raise InterfaceNotFound(f"interface {name!r} not found (have: {have})")
    return tuple(args.interface)


def _owner(args: argparse.Namespace) -> tuple[int | None, str | None]:
    if not args.local:
        return None, None
    if args.user.isascii() and args.user.isdigit():
        return int(args.user), args.user
    try:
        return pwd.getpwnam(args.user).pw_uid, args.user
    except KeyError:
        raise UsageError(
            f"user {args.user!r} does not exist (--user: the user clamsmtpd runs as, "
            "exempt from --local)"
        ) from None


def _plan_warnings(
    plan: RedirectPlan, listen: Listen | None, facts: discovery.HostFacts
) -> list[str]:
    """Things that make the rules useless; ``listen`` is None when --proxy-port replaced it."""
    warnings = _listen_warnings(plan, listen) if listen else []
    for family in plan.families:
        if facts.forwarding.get(family) is False:
            sysctl = FORWARDING_SYSCTL[family]
            warnings.append(
                f"{sysctl} = 0: this host does not route IPv{family}, so there is no passing "
                f"mail to intercept (sysctl -w {sysctl}=1)"
                + (" - and with --mode tproxy the servers' replies to the clients must come "
                   "back through it" if plan.mode is Mode.TPROXY else "")
            )
    return warnings


def _check_tproxy_listen(listen: Listen | None) -> None:
    """TPROXY hands a connection to the socket listening on the port at the original
    destination's address, else on the any-address: clamsmtpd must listen on every address."""
    ip = listen.ip if listen else None
    if listen is not None and listen.host is not None and (ip is None or not ip.is_unspecified):
        raise UsageError(
            f"--mode tproxy: Listen {listen} ({listen.origin}) is one address; TPROXY needs "
            f"clamsmtpd on every address: Listen: {listen.port}"
        )


def _listen_warnings(plan: RedirectPlan, listen: Listen) -> list[str]:
    if plan.mode is Mode.TPROXY:
        return []  # checked by _check_tproxy_listen
    warnings = []
    ip = listen.ip
    if ip is not None and ip.is_loopback:
        warnings.append(
            f"Listen {listen} is a loopback address: REDIRECT of forwarded mail rewrites the "
            "destination to the receiving interface's primary address, so clamsmtpd would not "
            f"get it; use Listen: {listen.port} (all addresses)"
        )
    elif ip is not None and not ip.is_unspecified:
        warnings.append(
            f"Listen {listen} is one address: REDIRECT delivers to the primary address of the "
            f"interface the mail arrived on; use Listen: {listen.port} (all addresses)"
        )
    # a bare port is dual-stack in clamsmtpd (it binds [::] with IPv4 mapped); a host name or
    # an IPv4 address is not
    if 6 in plan.families and listen.host is not None and (ip is None or ip.version == 4):
        warnings.append(
            f"Listen {listen} takes IPv4 only: redirected IPv6 connections need clamsmtpd to "
            f"listen on IPv6 too (e.g. Listen: [::]:{listen.port}), or use --ipv4"
        )
    return warnings


def _describe(
    plan: RedirectPlan, listen: Listen, facts: discovery.HostFacts, discovered: bool
) -> list[str]:
    def onoff(family: int) -> str:
        value = facts.forwarding.get(family)
        return "unknown" if value is None else ("on" if value else "OFF")

    interfaces = [
        found.describe() if (found := facts.find(n)) else f"{n} (not found)"
        for n in plan.interfaces
    ]
    how = "discovered: no default route, not loopback" if discovered else "--interface"
    lines = [
        f"proxy port:  {plan.proxy_port} (Listen {listen} from {listen.origin})",
        f"interfaces:  {'; '.join(interfaces) or 'none'} [{how}]",
        f"uplinks:     {', '.join(facts.uplinks()) or 'none'} (carry a default route)",
        f"ports:       {', '.join(map(str, plan.ports))}",
        f"families:    {', '.join(f'IPv{f}' for f in plan.families)}",
        f"forwarding:  IPv4 {onoff(4)}, IPv6 {onoff(6)}",
        f"mode:        {plan.mode.value} ({', '.join(plan.notes) or '--mode'})"
        + (f"; marks 0x{plan.fwmark:x}/0xffff, ip rule to table {plan.route_table}"
           if plan.mode is Mode.TPROXY else ""),
        "local mail:  "
        + (
            f"intercepted, except uid {plan.owner_uid} ({plan.owner_name})"
            if plan.local
            else "not intercepted (see --local)"
        ),
    ]
    if plan.exempt_sources or plan.exempt_destinations:
        lines.append(
            "exempt:      "
            + ", ".join(
                [f"from {n}" for n in plan.exempt_sources]
                + [f"to {n}" for n in plan.exempt_destinations]
            )
        )
    return lines


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0 and not args.dry_run:
        raise NotRoot(f"{args.command} needs root (CAP_NET_ADMIN); try --dry-run to preview")
    try:
        facts = discovery.discover()
    except ModuleNotFoundError as error:
        if error.name in EXTRA_MODULES:  # a plain `pip install clamsmtp`: say what to add
            raise NetsetupError(missing_module_message(error.name)) from error
        raise
    except Exception as error:  # netlink failures: nothing sensible to do but say so
        raise NetsetupError(f"cannot list interfaces and routes (pyroute2): {error}") from error
    listen = _listen(args)
    mode, mode_origin = _mode(args)
    families, defaulted = _families(args, facts)
    owner_uid, owner_name = _owner(args)
    try:
        plan = RedirectPlan(
            proxy_port=listen.port,
            interfaces=_interfaces(args, facts),
            ports=tuple(args.port) or DEFAULT_PORTS,
            families=families,
            exempt_sources=tuple(args.exempt_source),
            exempt_destinations=tuple(args.exempt_destination),
            local=args.local,
            owner_uid=owner_uid,
            owner_name=owner_name,
            mode=mode,
            notes=(f"mode from {mode_origin}",),
        )
    except ValueError as error:
        raise UsageError(str(error)) from None
    if mode is Mode.TPROXY and args.command == "enable":
        _check_tproxy_listen(listen if args.proxy_port is None else None)
    choice = choose(args.backend, plan, discovery.nft_tables(), dry_run=args.dry_run, log=_out)
    routing = PolicyRouting(dry_run=args.dry_run, log=_out)
    job = Job(args, choice, plan, listen, facts, defaulted, routing)
    try:
        _out(f"backend:     {choice.backend.name} ({choice.backend.description}), {choice.reason}")
        _out(f"host rules:  {choice.host}")
        return COMMANDS[args.command](job)
    finally:
        routing.close()
        for backend in (choice.backend, *choice.also):
            backend.close()


@dataclasses.dataclass(frozen=True)
class Job:
    """What every command works from: the options, the chosen backend and the plan."""

    args: argparse.Namespace
    choice: Choice
    plan: RedirectPlan
    listen: Listen
    facts: discovery.HostFacts
    defaulted: bool  # the families were not given: IPv6 may be dropped if unsupported
    routing: PolicyRouting


def _checked_plan(job: Job) -> RedirectPlan:
    """Warn, and check the backend can install the plan (IPv4 only, if IPv6 was only implied
    and is what lacks support); the plan to use from here on."""
    plan = job.plan
    for warning in job.choice.warnings:
        _warn(warning)
    try:
        job.choice.backend.check(plan)
    except KernelSupportError as error:
        if not (job.defaulted and error.family == 6):
            raise
        _warn(f"{error}; continuing with IPv4 only")
        plan = dataclasses.replace(plan, families=(4,))
        job.choice.backend.check(plan)
    listen = job.listen if job.args.proxy_port is None else None
    for warning in _plan_warnings(plan, listen, job.facts):
        _warn(warning)
    return plan


def _status(job: Job) -> int:
    plan = _checked_plan(job)
    for line in _describe(plan, job.listen, job.facts, discovered=not job.args.interface):
        _out(line)
    for line in job.choice.backend.status(plan):
        _out(line)
    for line in job.routing.status(plan):
        _out(line)
    for other in job.choice.also:
        _warn(
            f"our rules are also installed with the {other.name} backend: only one may "
            f"redirect; remove them with `{PROG} disable --backend {other.name}`"
        )
        _out(f"also installed with backend {other.name} ({other.description}):")
        for line in other.status(plan):
            _out(line)
    return ExitCode.OK


def _disable(job: Job) -> int:
    """Ours from the chosen backend, from every other that holds ours (auto), then the
    routing; each part in its own try, so one failure does not skip the others."""
    plan, backend, routing = job.plan, job.choice.backend, job.routing
    if job.args.dry_run:
        _out("dry run: nothing is changed; disable would run:")
    others = job.choice.also if job.args.backend == "auto" else ()
    try:
        backend.disable(plan)
    finally:  # a failure in one mechanism does not skip the other
        try:
            for other in others:  # auto removes ours from every mechanism that holds them
                _out(f"also removing ours from backend {other.name}:")
                other.disable(plan)
        finally:  # the rules are gone first: nothing is marked for the table any more
            routing.disable(plan)
    for other in job.choice.also:
        if other not in others:
            _warn(
                f"our rules are also installed with the {other.name} backend; remove "
                f"them with `{PROG} disable --backend {other.name}` (or plain `disable`)"
            )
    families = ", ".join(f"IPv{f}" for f in plan.families)
    if not backend.changes and not routing.changes and not any(o.changes for o in others):
        _out(f"nothing to remove: no rules of ours for proxy port {plan.proxy_port} ({families})")
    else:
        done = "would remove" if job.args.dry_run else "removed"
        _out(f"{done}: our rules for proxy port {plan.proxy_port} ({families})")
    return ExitCode.OK


def _enable(job: Job) -> int:
    backend, routing = job.choice.backend, job.routing
    if job.choice.also:
        other = job.choice.also[0]
        raise UsageError(
            f"our rules for proxy port {job.plan.proxy_port} are also installed with the "
            f"{other.name} backend ({other.description}); two mechanisms would redirect the "
            f"same mail: run `{PROG} disable --backend {other.name}` (with the same "
            "--proxy-port) first"
        )
    plan = _checked_plan(job)
    for line in _describe(plan, job.listen, job.facts, discovered=not job.args.interface):
        _out(line)
    if job.args.dry_run:
        _out("dry run: nothing is changed; enable would run:")
    # routing first: a TPROXY rule without its route would let the mail pass unscanned
    enable_in_order((routing, backend), plan, log=_out, warn=_warn)
    _out(
        f"{'would enable' if job.args.dry_run else 'enabled'}: TCP "
        f"{','.join(map(str, plan.ports))} on {', '.join(plan.interfaces)}"
        f"{' and local mail' if plan.local else ''} -> port {plan.proxy_port}"
        + (" (tproxy: the servers see the clients' addresses)" if plan.mode is Mode.TPROXY
           else "")
    )
    return ExitCode.OK


COMMANDS: dict[str, Callable[[Job], int]] = {
    "enable": _enable,
    "disable": _disable,
    "status": _status,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: usage errors exit 2, --help 0
        return int(exit_.code or 0)
    try:
        return int(run(args))
    except OperationFailed as error:
        print(
            f"{PROG}: error: {args.command} failed at `{error.op}`: {error.reason}", file=sys.stderr
        )
        return int(error.exit_code)
    except NetsetupError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return int(error.exit_code)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as error:
        if error.name not in EXTRA_MODULES:
            raise
        print(f"{PROG}: error: {missing_module_message(error.name)}", file=sys.stderr)
        return int(ExitCode.FAILED)


if __name__ == "__main__":
    sys.exit(main())
