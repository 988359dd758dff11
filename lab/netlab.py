"""netlab: the transparent gateway end to end, through the kernel, in network namespaces.

    client ns       c0 192.0.2.10      2001:db8:1::10      (swaks)
      └─veth─ gateway ns  g0 192.0.2.1     2001:db8:1::1   clamsmtpd (TransparentProxy: on),
                          g1 198.51.100.1  2001:db8:2::1   clamd, clamsmtp-netsetup rules
                └─veth─ mail server ns  s0 198.51.100.25  2001:db8:2::25   SMTP sink on :25

The client dials the mail server's address on port 25. In the gateway, the REDIRECT rule of
`clamsmtp-netsetup enable -i g0` hands the connection to clamsmtpd, which reads the original
destination (SO_ORIGINAL_DST), scans the message with clamd and forwards it to the mail server.
Each machine is set up by its provisioning script from vagrant/provision/ (clamd.sh,
mailserver.sh, gateway.sh, client.sh) run inside its namespace with `ip netns exec`: the same
scripts a Vagrant lab runs in real VMs. The topology itself comes from nslab.py.

    scripts/netlab --demo     (python -m lab.netlab --demo)
        one clean and one EICAR message over IPv4 and over IPv6, TLS on both legs (the client
        says STARTTLS to the gateway's certificate, the gateway to the mail server's); prints
        the SMTP outcomes, what the mail server received, clamsmtpd's log and the netsetup
        status; tears all down; exit 0 when the clean messages arrived scanned over TLS and
        EICAR was refused.
    scripts/netlab --demo --full
        the same with TransparentProxy: full (netsetup --mode tproxy): the mail server sees the
        client's own address (192.0.2.10, 2001:db8:1::10) instead of the gateway's.
    scripts/netlab            stays up and prints how to try it, until Ctrl-C.
    scripts/netlab --cleanup  removes namespaces (and their processes) left by a netlab that
                              was killed (SIGKILL) before it could clean up.

Only documentation addresses are used, only inside the namespaces made here. Needs root.
Everything (namespaces, processes, the temporary work directory) is removed at exit, also after
an error, Ctrl-C or SIGTERM. `NetLab` is the same thing as a context manager for tests/e2e.

This module is the command (the demo, the stay-up mode, --cleanup); `NetLab` lives in
netgateway.py, the topology and the requirements in nettopo.py. Their public names are
importable from here too.

Exit status: 0 ok, 1 the demo failed or the lab could not be built, 2 usage, 3 not root,
4 something missing (network namespaces, swaks, clamd, iptables).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from .netgateway import (
    SWAKS_REFUSED_AFTER_DATA,
    NetLab,
    Sent,
    final_reply,
    netsetup_command,
)
from .nettopo import (
    CLIENT,
    CLIENT_V4,
    CLIENT_V6,
    DAEMON_USER,
    GATEWAY_IN_V4,
    GATEWAY_IN_V6,
    GATEWAY_OUT,
    GATEWAY_OUT_V4,
    GATEWAY_OUT_V6,
    PREFIX,
    PROVISION,
    PROXY_PORT,
    REPO_ROOT,
    SERVER,
    SERVER_V4,
    SERVER_V6,
    TIMEOUT,
    LabError,
    alive,
    default_user,
    nslab,
    original_destination,
    requirements,
)
from .sinkrun import describe

__all__ = [
    # the topology and the requirements (nettopo.py)
    "CLIENT",
    "CLIENT_V4",
    "CLIENT_V6",
    "DAEMON_USER",
    "GATEWAY_IN_V4",
    "GATEWAY_IN_V6",
    "GATEWAY_OUT",
    "GATEWAY_OUT_V4",
    "GATEWAY_OUT_V6",
    "PREFIX",
    "PROVISION",
    "PROXY_PORT",
    "REPO_ROOT",
    "SERVER",
    "SERVER_V4",
    "SERVER_V6",
    "TIMEOUT",
    "LabError",
    "alive",
    "default_user",
    "nslab",
    "original_destination",
    "requirements",
    # the lab (netgateway.py)
    "SWAKS_REFUSED_AFTER_DATA",
    "NetLab",
    "Sent",
    "final_reply",
    "netsetup_command",
    # the command (here)
    "HEADER",
    "PROG",
    "cleanup",
    "follow",
    "how_to_try",
    "main",
    "note",
    "parse_args",
    "run_demo",
    "say",
]

PROG = "netlab"
HEADER = "X-Virus-Scanned"


# -- the command ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/netlab",
        description="The transparent clamsmtpd gateway, end to end in network namespaces: "
        "client -> gateway (REDIRECT, clamsmtpd, clamd) -> mail server.",
    )
    parser.add_argument("--demo", action="store_true",
                        help="send one clean and one EICAR message over IPv4 and IPv6, show "
                        "what happened, tear down, exit 0 if it all went as it should")
    parser.add_argument("--full", action="store_true",
                        help="TransparentProxy: full: TPROXY and policy routing instead of "
                        "REDIRECT, so the mail server sees the client's own address")
    parser.add_argument("--action", choices=("bounce", "drop", "pass"), default="bounce",
                        help="clamsmtpd's Action for infected mail (default %(default)s; the "
                        "demo expects bounce)")
    parser.add_argument("--user", default=None,
                        help="the daemon's User (default: clamsmtp if it exists, else none: "
                        "it stays root)")
    parser.add_argument("--workdir", help="keep configs, logs and received mail here "
                        "(default: a temporary directory, removed at exit)")
    parser.add_argument("--cleanup", action="store_true",
                        help="remove namespaces left behind by a netlab that was killed")
    return parser.parse_args(argv)


def say(text: str = "") -> None:
    print(text, flush=True)


def note(text: str) -> None:
    say(f"{PROG}: {text}")


class _Stop(Exception):
    pass


def _raise_stop(signum, frame) -> None:
    raise _Stop(signal.Signals(signum).name)


def full(lab: NetLab) -> bool:
    return lab.transparent == "full"


def sender_seen(lab: NetLab, family: int) -> str:
    """The peer address the mail server sees: the gateway (REDIRECT) or the client (TPROXY)."""
    return CLIENT[family] if full(lab) else GATEWAY_OUT[family]


def run_demo(lab: NetLab) -> bool:
    """Clean + EICAR over IPv4 and IPv6; print everything; True if it all went as it should."""
    mark = lab.log_mark()
    sent: list[Sent] = []
    say()
    for family in (4, 6):
        for eicar in (False, True):
            kind = "EICAR" if eicar else "clean"
            message = lab.send(SERVER[family], eicar=eicar,
                               subject=f"netlab demo: {kind} (IPv{family})")
            sent.append(message)
            say(f"demo: IPv{family}: client {CLIENT[family]} -> mail server "
                f"{SERVER[family]} port 25, {kind} message: {message.reply} "
                f"(swaks exit {message.status})")
    with contextlib.suppress(AssertionError):
        lab.wait_log(r"status=", since=mark, count=len(sent), timeout=5)
    received = lab.received()
    say()
    say(f"demo: the mail server ({SERVER_V4}, {SERVER_V6}) received {len(received)} "
        "message(s):")
    for message in received:
        say(f"demo:   {describe(message)}")
    say()
    say("demo: clamsmtpd's log in the gateway:")
    for line in lab.daemon_log().splitlines():
        say(f"demo:   {line}")
    say()
    say(f"demo: clamsmtp-netsetup status -i {lab.lab.gateway_in} --proxy-port "
        f"{lab.proxy_port} --mode {mode(lab)} (in the gateway):")
    for line in lab.status().splitlines():
        say(f"demo:   {line}")

    log = lab.daemon_log(mark)
    checks: list[tuple[str, bool]] = []
    for message in sent:
        arrived = [m for m in received if m.header("Subject") == message.subject]
        where = f"IPv{message.family}"
        if message.eicar:
            checks.append((f"{where} EICAR refused with 550 and not delivered",
                           message.status == SWAKS_REFUSED_AFTER_DATA
                           and message.reply.startswith("550") and not arrived))
        else:
            seen = sender_seen(lab, message.family)
            whom = "the client's own address" if full(lab) else "the gateway's address"
            checks.append((f"{where} clean message delivered through the proxy with {HEADER}, "
                           f"from {whom} ({seen})",
                           message.status == 0 and len(arrived) == 1
                           and arrived[0].header(HEADER) is not None
                           and arrived[0].peer[:1] == (seen,)))
            if lab.tls:
                checks.append((f"{where} clean message reached the mail server over TLS",
                               len(arrived) == 1 and arrived[0].tls is not None))
    for family in (4, 6):
        text = original_destination(family)
        checks.append((f"clamsmtpd logged '{text}'", log.count(text) == 2))
    if lab.tls:
        both = re.findall(r"tls=TLSv1\.[23]/TLSv1\.[23], status=", log)
        checks.append(("clamsmtpd logged TLS on both legs (tls=TLSv1.x/TLSv1.x) for each "
                       "message", len(both) == len(sent)))
    say()
    for what, good in checks:
        say(f"demo: {'ok    ' if good else 'FAILED'} {what}")
    return all(good for _, good in checks)


def mode(lab: NetLab) -> str:
    return "tproxy" if full(lab) else "redirect"


def how_to_try(lab: NetLab) -> None:
    netsetup = " ".join(netsetup_command())
    client, gateway = lab.client, lab.gateway
    eicar = lab.client_dir / "eicar.com"
    say()
    say("The lab is up. Try it from another terminal (as root):")
    say(f"  ip netns exec {client} swaks --server {SERVER_V4} --helo client.test "
        "--from alice@example.com --to bob@example.com")
    say(f"  ip netns exec {client} swaks --server {SERVER_V6} --helo client.test "
        "--from alice@example.com --to bob@example.com "
        f"--attach-type application/octet-stream --attach @{eicar}")
    say(f"  ip netns exec {client} {PROVISION / 'client.sh'} send --server {SERVER_V4} --eicar")
    say(f"  ip netns exec {gateway} {netsetup} status -i {lab.lab.gateway_in} "
        f"--proxy-port {lab.proxy_port} --mode {mode(lab)}")
    say(f"  ip netns exec {gateway} {netsetup} disable --proxy-port {lab.proxy_port}"
        "   (then mail goes straight to the server, unscanned)")
    say(f"  ip netns exec {gateway} {PROVISION / 'gateway.sh'} up --lan-if "
        f"{lab.lab.gateway_in} --clam-address {lab.clamd_dir / 'clamd.sock'} "
        f"--workdir {lab.gateway_dir} --transparent {lab.transparent}   (back on)")
    say(f"Files: {lab.workdir} (gateway/clamsmtpd.log, mailserver/received/)")
    say("clamsmtpd's log and each message the mail server receives are shown here. "
        "Stop with Ctrl-C.")
    say()


class _Follow:
    """Print lines appended to a file since the last call."""

    def __init__(self, path: Path, prefix: str) -> None:
        self.path, self.prefix = path, prefix
        self.offset = 0
        self.partial = b""

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        for line in lines:
            say(f"{self.prefix}{line.decode('utf-8', 'replace')}")


def follow(lab: NetLab) -> None:
    """Show new lines of clamsmtpd's and the mail server's logs until Ctrl-C or SIGTERM."""
    followers = [_Follow(lab.daemon_log_path, "[gateway] "),
                 _Follow(lab.mail_dir / "sink.log", "[mail server] ")]
    running = True
    try:
        while True:
            for follower in followers:
                follower.poll()
            if running != lab.daemon_running():
                running = not running
                note("clamsmtpd is running again" if running else "clamsmtpd is not running")
            time.sleep(0.5)
    finally:  # what was logged just before Ctrl-C
        for follower in followers:
            follower.poll()


def cleanup() -> int:
    """Remove namespaces of netlabs whose process is gone, and what runs in them."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                             timeout=TIMEOUT).stdout
    pattern = re.compile(rf"^{PREFIX}[cgs]-(\d+)-[0-9a-f]{{6}}$")
    removed = 0
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        match = pattern.match(name)
        if not match or alive(int(match.group(1))):
            continue  # not ours, or its netlab still runs
        left = nslab.kill_processes(name)
        nslab.destroy_namespace(name)
        note(f"removed namespace {name}" + (f" and ended processes {left}" if left else ""))
        removed += 1
    note(f"cleanup: {removed} leftover namespace(s) removed")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = requirements()
    if problem is not None:
        code, why = problem
        print(f"{PROG}: {why}", file=sys.stderr)
        return code
    if args.cleanup:
        return cleanup()
    # SIGINT too: a shell starts background commands with SIGINT ignored, and Python keeps that
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    lab = NetLab(args.workdir, action=args.action, user=args.user,
                 out=lambda line: say(f"  {line}"), tls=True,
                 transparent="full" if args.full else "on")
    try:
        note(f"building the lab in network namespaces (work directory {lab.workdir})")
        lab.start()
        note(f"up: client {lab.client} ({CLIENT_V4}, {CLIENT_V6}) -> gateway {lab.gateway} "
             f"(g0 {GATEWAY_IN_V4}, {GATEWAY_IN_V6}; g1 {GATEWAY_OUT_V4}, {GATEWAY_OUT_V6}) "
             f"-> mail server {lab.server} ({SERVER_V4}, {SERVER_V6})")
        if args.demo:
            ok = run_demo(lab)
            say(f"demo: {'PASSED' if ok else 'FAILED'}")
            return 0 if ok else 1
        how_to_try(lab)
        follow(lab)
        return 0
    except LabError as error:
        note(f"error: {error}")
        return 1
    except (KeyboardInterrupt, _Stop) as stop:
        say()
        note(f"stopping ({stop or 'SIGINT'})")
        return 130 if args.demo else 0
    finally:
        note("tearing down: stopping the daemons, removing the namespaces")
        lab.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        note("stopped")


if __name__ == "__main__":
    sys.exit(main())
