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
scripts a Vagrant lab runs in real VMs. The topology itself comes from tests/netsetup/nslab.py.

    scripts/netlab --demo     (python -m appliance.lab.netlab --demo)
        one clean and one EICAR message over IPv4 and over IPv6; prints the SMTP outcomes,
        what the mail server received, clamsmtpd's log and the netsetup status; tears all down;
        exit 0 when the clean messages arrived scanned and EICAR was refused.
    scripts/netlab            stays up and prints how to try it, until Ctrl-C.
    scripts/netlab --cleanup  removes namespaces (and their processes) left by a netlab that
                              was killed (SIGKILL) before it could clean up.

Only documentation addresses are used, only inside the namespaces made here. Needs root.
Everything (namespaces, processes, the temporary work directory) is removed at exit, also after
an error, Ctrl-C or SIGTERM. `NetLab` is the same thing as a context manager for tests/e2e.

Exit status: 0 ok, 1 the demo failed or the lab could not be built, 2 usage, 3 not root,
4 something missing (network namespaces, swaks, clamd, iptables).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .clamd import EICAR
from .sink import Received
from .sinkrun import describe, read_records

REPO_ROOT = Path(__file__).resolve().parents[2]
PROVISION = REPO_ROOT / "vagrant" / "provision"
PROG = "netlab"
PROXY_PORT = 10025
PREFIX = "nl"  # namespaces nlc-PID-HEX (client), nlg-... (gateway), nls-... (mail server)
HEADER = "X-Virus-Scanned"
TIMEOUT = 120.0
#: swaks' exit status when the server refused the message after DATA (swaks(1), EXIT CODES)
SWAKS_REFUSED_AFTER_DATA = 26
#: The daemon's User in the lab when it exists (the Debian clamsmtp package creates it).
DAEMON_USER = "clamsmtp"


def _load_nslab():
    """tests/netsetup/nslab.py, the namespace helper shared with the netsetup tests."""
    if "nslab" in sys.modules:
        return sys.modules["nslab"]
    path = REPO_ROOT / "tests" / "netsetup"
    if not (path / "nslab.py").exists():
        raise ImportError(f"netlab runs from a source checkout: {path}/nslab.py is missing")
    sys.path.insert(0, str(path))
    return importlib.import_module("nslab")


nslab = _load_nslab()
CLIENT_V4, CLIENT_V6 = nslab.CLIENT_V4, nslab.CLIENT_V6
GATEWAY_IN_V4, GATEWAY_IN_V6 = nslab.GATEWAY_IN_V4, nslab.GATEWAY_IN_V6
GATEWAY_OUT_V4, GATEWAY_OUT_V6 = nslab.GATEWAY_OUT_V4, nslab.GATEWAY_OUT_V6
SERVER_V4, SERVER_V6 = nslab.SERVER_V4, nslab.SERVER_V6
SERVER = {4: SERVER_V4, 6: SERVER_V6}
CLIENT = {4: CLIENT_V4, 6: CLIENT_V6}
GATEWAY_OUT = {4: GATEWAY_OUT_V4, 6: GATEWAY_OUT_V6}


class LabError(RuntimeError):
    """The lab could not be built or a provisioning script failed."""


def original_destination(family: int, port: int = 25) -> str:
    """The daemon's log text for a connection to the mail server (Address.__str__ format)."""
    host = SERVER[family]
    return f"original destination: {f'[{host}]' if family == 6 else host}:{port}"


def alive(pid: int) -> bool:
    """Process `pid` runs and is not a zombie (an orphan can stay one until it is reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def default_user() -> str:
    """clamsmtp when that account exists, else "" (the daemon then stays root)."""
    try:
        pwd.getpwnam(DAEMON_USER)
    except KeyError:
        return ""
    return DAEMON_USER


def requirements() -> tuple[int, str] | None:
    """(exit status, why) when the lab cannot run here; None when it can."""
    if os.geteuid() != 0:
        return 3, ("needs root: it creates network namespaces and firewall rules "
                   "(run it as root, e.g. sudo scripts/netlab --demo)")
    reason = nslab.unavailable_reason()
    if reason is not None:
        return 4, f"network namespaces: {reason}"
    for command, package in (("swaks", "swaks"), ("clamd", "clamav-daemon"),
                             ("iptables-legacy", "iptables"), ("setsid", "util-linux")):
        if shutil.which(command) is None and not Path("/usr/sbin", command).exists():
            return 4, f"{command} not found: install the Debian package {package} (scripts/setup)"
    return None


# -- sending -------------------------------------------------------------------------------


@dataclass
class Sent:
    """One message sent by client.sh (swaks) from the client namespace."""

    family: int
    server: str
    eicar: bool
    subject: str
    status: int  # swaks' exit status: 0 accepted, 26 refused after DATA, 2 no connection, ...
    reply: str  # the server's answer to the end of DATA, or the error swaks reported
    transcript: str

    @property
    def kind(self) -> str:
        return "EICAR" if self.eicar else "clean"


def final_reply(transcript: str) -> str:
    """The reply to the final dot of DATA in a swaks transcript, else the server's last error
    reply, else swaks' last error line."""
    lines = transcript.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "-> .":
            for after in lines[i + 1:]:
                if after.startswith(("<- ", "<~ ", "<**")):
                    return after[3:].strip()
    for prefix in ("<**", "***"):  # the server's error reply, else swaks' own complaint
        errors = [line[3:].strip() for line in lines if line.startswith(prefix)]
        if errors:
            return errors[-1]
    return lines[-1].strip() if lines else ""


# -- the lab -------------------------------------------------------------------------------


class NetLab:
    """The namespaces and everything running in them; `start()`, then `stop()` (or `with`).

    `workdir`: where configs, logs and the mail server's records go (kept); default a temporary
    directory removed by `stop()`. `user`: the daemon's User (default `default_user()`; it
    must be able to reach the work directory, where clamd's socket is). `out`: called with
    each line worth showing (provisioning output); default silent.
    """

    def __init__(
        self,
        workdir: str | os.PathLike | None = None,
        *,
        prefix: str = PREFIX,
        action: str = "bounce",
        proxy_port: int = PROXY_PORT,
        user: str | None = None,
        out: Callable[[str], None] | None = None,
    ) -> None:
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="clamsmtp-netlab-")).resolve()
        if self._own_workdir:
            self.workdir.chmod(0o755)  # the daemon's user reaches clamd's socket through it
        self.user = default_user() if user is None else user
        self.prefix = prefix
        self.action = action
        self.proxy_port = proxy_port
        self.out = out or (lambda line: None)
        self.lab = None  # nslab.GatewayLab once the namespaces exist
        self.clamd_dir = self.workdir / "clamd"
        self.gateway_dir = self.workdir / "gateway"
        self.mail_dir = self.workdir / "mailserver"
        self.client_dir = self.workdir / "client"
        self._env = dict(os.environ)
        bin_dir = Path(sys.executable).parent
        if (bin_dir / "clamsmtpd").exists():  # the scripts use this interpreter's venv
            self._env["CLAMSMTP_BIN"] = str(bin_dir)

    # -- names ---------------------------------------------------------------------------

    @property
    def client(self) -> str:
        return self.lab.client

    @property
    def gateway(self) -> str:
        return self.lab.gateway

    @property
    def server(self) -> str:
        return self.lab.server

    @property
    def namespaces(self) -> tuple[str, ...]:
        return self.lab.namespaces if self.lab else ()

    @property
    def daemon_log_path(self) -> Path:
        return self.gateway_dir / "clamsmtpd.log"

    @property
    def record_dir(self) -> Path:
        return self.mail_dir / "received"

    # -- building ------------------------------------------------------------------------

    def start(self) -> NetLab:
        """Namespaces, then clamd, the mail server, the gateway and the client's routes."""
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.lab = nslab.create_gateway_lab(self.prefix)
            self.out(f"namespaces: client {self.client}, gateway {self.gateway}, "
                     f"mail server {self.server}")
            self.provision(self.gateway, "clamd.sh", "up", "--workdir", str(self.clamd_dir))
            self.provision(self.server, "mailserver.sh", "up", "--listen", "25",
                           "--workdir", str(self.mail_dir))
            self.gateway_up()
            self.provision(self.client, "client.sh", "up",
                           "--via", GATEWAY_IN_V4, "--net", "198.51.100.0/24",
                           "--via6", GATEWAY_IN_V6, "--net6", "2001:db8:2::/64")
            self.client_dir.mkdir(parents=True, exist_ok=True)
            (self.client_dir / "eicar.com").write_bytes(EICAR)
        except BaseException:
            self.stop()
            raise
        return self

    def gateway_up(self, *extra: str) -> subprocess.CompletedProcess[str]:
        """gateway.sh up (again): forwarding, config, daemon, clamsmtp-netsetup enable;
        `extra`: more arguments (`"--", "--local"` passes --local on to netsetup)."""
        return self.provision(
            self.gateway, "gateway.sh", "up", "--lan-if", self.lab.gateway_in,
            "--proxy-port", str(self.proxy_port),
            "--clam-address", str(self.clamd_dir / "clamd.sock"),
            "--action", self.action, "--user", self.user, "--workdir", str(self.gateway_dir),
            *extra,
        )

    def provision(self, ns: str, script: str, *args: str,
                  check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run vagrant/provision/SCRIPT ARGS inside namespace `ns`."""
        role = self._role(ns)
        result = nslab.run_in(ns, [str(PROVISION / script), *args], env=self._env,
                              timeout=TIMEOUT)
        for line in (result.stdout + result.stderr).splitlines():
            self.out(f"[{role}] {line}")
        if check and result.returncode != 0:
            raise LabError(
                f"{script} {' '.join(args)} in the {role} namespace {ns} exited "
                f"{result.returncode}:\n{result.stdout}{result.stderr}"
            )
        return result

    def _role(self, ns: str) -> str:
        roles = {self.lab.client: "client", self.lab.gateway: "gateway",
                 self.lab.server: "mail server"} if self.lab else {}
        return roles.get(ns, ns)

    # -- taking down ---------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every process, remove the namespaces (and a temporary work directory).

        Safe to call twice and after a failed start. SIGINT and SIGTERM are ignored meanwhile:
        a second Ctrl-C must not leave a half torn-down lab behind.
        """
        with _signals_ignored(self.out):
            lab = self.lab
            if lab is not None:
                try:
                    for ns, script, args in (
                        (lab.gateway, "gateway.sh", ("down", "--proxy-port",
                                                     str(self.proxy_port),
                                                     "--workdir", str(self.gateway_dir))),
                        (lab.server, "mailserver.sh", ("down", "--workdir", str(self.mail_dir))),
                        (lab.gateway, "clamd.sh", ("down", "--workdir", str(self.clamd_dir))),
                    ):
                        with contextlib.suppress(Exception):
                            self.provision(ns, script, *args, check=False)
                finally:
                    self.lab = None
                    for ns in lab.namespaces:
                        with contextlib.suppress(Exception):
                            left = nslab.kill_processes(ns)
                            if left:
                                self.out(f"ended processes left in {ns}: {left}")
                        with contextlib.suppress(Exception):
                            nslab.destroy_namespace(ns)
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> NetLab:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- using it ------------------------------------------------------------------------

    def send(self, server: str, *, eicar: bool = False, subject: str | None = None,
             port: int = 25, ns: str | None = None) -> Sent:
        """Send one message to `server`:`port` with client.sh, from the client namespace
        (or from `ns`, e.g. the gateway's own mail)."""
        family = 6 if ":" in server else 4
        subject = subject or f"netlab: {'EICAR' if eicar else 'clean'} (IPv{family})"
        args = ["send", "--server", server, "--port", str(port), "--subject", subject]
        if eicar:
            args.append("--eicar")
        result = nslab.run_in(ns or self.client, [str(PROVISION / "client.sh"), *args],
                              env=self._env, timeout=TIMEOUT)
        transcript = result.stdout + result.stderr
        return Sent(family, server, eicar, subject, result.returncode, final_reply(transcript),
                    transcript)

    def daemon_pid(self) -> int | None:
        """clamsmtpd's pid from its pid file, if that process runs (and is not a zombie)."""
        try:
            pid = int((self.gateway_dir / "run" / "clamsmtpd.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if alive(pid) else None

    def daemon_running(self) -> bool:
        return self.daemon_pid() is not None

    def received(self) -> list[Received]:
        """Every message the mail server accepted so far, in order."""
        return read_records(self.record_dir)

    def received_with(self, subject: str) -> list[Received]:
        return [m for m in self.received() if m.header("Subject") == subject]

    def log_mark(self) -> int:
        """A position in clamsmtpd's log, for `daemon_log(since=...)`."""
        try:
            return self.daemon_log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def daemon_log(self, since: int = 0) -> str:
        """clamsmtpd's log (-d 3 on stderr) from byte `since`."""
        try:
            with open(self.daemon_log_path, "rb") as log:
                log.seek(since)
                return log.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern: str, *, since: int = 0, count: int = 1,
                 timeout: float = 10.0) -> str:
        """Wait until `pattern` (a regular expression) occurs `count` times in the log."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.daemon_log(since)
            if len(re.findall(pattern, text)) >= count:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not {count} times in clamsmtpd's log after "
                                     f"{timeout} s:\n{text}")
            time.sleep(0.05)

    def netsetup(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        """clamsmtp-netsetup ARGS in the gateway namespace."""
        return nslab.run_in(self.gateway, [*netsetup_command(), *args], env=self._env,
                            check=check, timeout=TIMEOUT)

    def status(self) -> str:
        """`clamsmtp-netsetup status` for the lab's rules."""
        result = self.netsetup("status", "-i", self.lab.gateway_in,
                               "--proxy-port", str(self.proxy_port))
        return result.stdout + result.stderr


def netsetup_command() -> list[str]:
    script = Path(sys.executable).parent / "clamsmtp-netsetup"
    return [str(script)] if script.exists() else [sys.executable, "-m", "netsetup.cli"]


@contextlib.contextmanager
def _signals_ignored(out: Callable[[str], None]) -> Iterator[None]:
    """SIGINT and SIGTERM are noted and ignored inside the block (main thread only)."""

    def hold(signum, frame) -> None:
        out(f"{signal.Signals(signum).name} ignored: tearing down, please wait")

    try:
        previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals go to the main thread anyway
        yield
        return
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


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
        f"{lab.proxy_port} (in the gateway):")
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
            checks.append((f"{where} clean message delivered through the proxy with {HEADER}",
                           message.status == 0 and len(arrived) == 1
                           and arrived[0].header(HEADER) is not None
                           and arrived[0].peer[:1] == (GATEWAY_OUT[message.family],)))
    for family in (4, 6):
        text = original_destination(family)
        checks.append((f"clamsmtpd logged '{text}'", log.count(text) == 2))
    say()
    for what, good in checks:
        say(f"demo: {'ok    ' if good else 'FAILED'} {what}")
    return all(good for _, good in checks)


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
        f"--proxy-port {lab.proxy_port}")
    say(f"  ip netns exec {gateway} {netsetup} disable --proxy-port {lab.proxy_port}"
        "   (then mail goes straight to the server, unscanned)")
    say(f"  ip netns exec {gateway} {PROVISION / 'gateway.sh'} up --lan-if "
        f"{lab.lab.gateway_in} --clam-address {lab.clamd_dir / 'clamd.sock'} "
        f"--workdir {lab.gateway_dir}   (back on)")
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
                 out=lambda line: say(f"  {line}"))
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
