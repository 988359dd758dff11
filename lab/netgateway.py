"""`NetLab`: the gateway lab in network namespaces, built, used and taken down.

Each machine is set up by its provisioning script from vagrant/provision/ run inside its
namespace; `send()` mails from the client with client.sh (swaks), and the daemon's log, the
mail server's records and `clamsmtp-netsetup` are read back for the demo and tests/e2e.
"""

from __future__ import annotations

import contextlib
import os
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

from . import certs
from .clamd import EICAR
from .nettopo import (
    GATEWAY_IN_V4,
    GATEWAY_IN_V6,
    PREFIX,
    PROVISION,
    PROXY_PORT,
    SERVER_V4,
    SERVER_V6,
    TIMEOUT,
    LabError,
    alive,
    default_user,
    nslab,
)
from .sink import Received
from .sinkrun import read_records

#: swaks' exit status when the server refused the message after DATA (swaks(1), EXIT CODES)
SWAKS_REFUSED_AFTER_DATA = 26


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
        if line.strip() in ("-> .", "~> ."):  # (~> and <~: inside TLS)
            for after in lines[i + 1:]:
                if after.startswith(("<- ", "<~ ", "<**", "<~*")):
                    return after[3:].strip()
    for prefix in ("<**", "<~*", "***"):  # the server's error reply, else swaks' complaint
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
    each line worth showing (provisioning output); default silent. `transparent`: the daemon's
    TransparentProxy, "on" (netsetup --mode redirect) or "full" (--mode tproxy: the mail
    server sees the client's own address). `workers`: the daemon's Workers.
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
        tls: bool = False,
        transparent: str = "on",
        workers: int = 1,
    ) -> None:
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="clamsmtp-netlab-")).resolve()
        if self._own_workdir:
            self.workdir.chmod(0o755)  # the daemon's user reaches clamd's socket through it
        self.user = default_user() if user is None else user
        self.prefix = prefix
        self.action = action
        self.proxy_port = proxy_port
        self.transparent = transparent  # TransparentProxy: on (REDIRECT) or full (TPROXY)
        self.workers = workers  # the daemon's Workers
        self.out = out or (lambda line: None)
        #: TLS on both legs: the mail server offers STARTTLS, the gateway ClientTLS: on (and
        #: OutTLS: may, its default), the client's swaks requires STARTTLS
        self.tls = tls
        self.tls_dir = self.workdir / "tls"
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
                           "--workdir", str(self.mail_dir), *self._tls_args("mailserver"))
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
            "--transparent", self.transparent, "--workers", str(self.workers),
            *self._tls_args("gateway"), *extra,
        )

    def _tls_args(self, role: str) -> list[str]:
        """--tls-cert/--tls-key for mailserver.sh or gateway.sh (certificates made once,
        throwaway, signed by a lab CA), or nothing without `tls`."""
        if not self.tls:
            return []
        if not (self.tls_dir / "ca.pem").exists():
            ca = certs.make_ca(self.tls_dir, "clamsmtp netlab CA")
            certs.make_certificate(self.tls_dir, "mail.test", ca, stem="mailserver",
                                   alt_names=(SERVER_V4, SERVER_V6))
            certs.make_certificate(self.tls_dir, "gateway.test", ca, stem="gateway")
        return ["--tls-cert", str(self.tls_dir / f"{role}.pem"),
                "--tls-key", str(self.tls_dir / f"{role}.key")]

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
        if self.tls:
            args.append("--tls")
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
        mode = "tproxy" if self.transparent == "full" else "redirect"
        result = self.netsetup("status", "-i", self.lab.gateway_in,
                               "--proxy-port", str(self.proxy_port), "--mode", mode)
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

