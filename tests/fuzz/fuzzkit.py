"""Shared parts of the session fuzz: the numbers of a run, the SASL-speaking recording next hop,
and the handle on the daemon under test (see conftest.py for the fixture that starts it)."""

from __future__ import annotations

import re
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from aiosmtpd.smtp import AuthResult, LoginPassword

from lab import RecordingNextHop
from lab.sink import _Controller, _Handler

TIMEOUT = 3  # the daemon's TimeOut: every wait of the proxy is bounded by it
USER, PASSWORD = b"fuzz-user", b"fuzz-secret"
#: What must never appear in the daemon's log (an exception that escaped a handler).
BAD_LOG = ("Traceback", "unexpected error", "Task exception was never retrieved",
           "Exception in callback", "Fatal error")


@dataclass
class FuzzStats:
    sessions: int = 0
    lines: int = 0  # command and continuation lines sent
    replies: int = 0
    data_phases: int = 0  # DATA bodies sent after a 354
    delivered: int = 0  # messages the next hop accepted (and that were checked byte for byte)
    viruses: int = 0  # infected messages refused
    too_long: int = 0  # command lines over the limit, answered "500 Line too long"
    closed_early: int = 0  # sessions that ended before the final QUIT (421, 451, QUIT, ...)
    started: float = 0.0  # time.monotonic() at the first session
    seconds: float = 0.0  # from the first session's start to the last one's end

    def summary(self) -> str:
        return (f"session fuzz: {self.sessions} sessions, {self.lines} client lines, "
                f"{self.replies} replies, {self.data_phases} DATA bodies, {self.delivered} "
                f"messages delivered and compared, {self.viruses} viruses refused, "
                f"{self.too_long} overlong lines refused, {self.closed_early} sessions closed "
                f"early, in {self.seconds:.1f} s")


STATS = FuzzStats()


def _authenticator(server, session, envelope, mechanism, auth_data):
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
        USER, PASSWORD)
    return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd says 235 or 535


class SaslRecordingNextHop(RecordingNextHop):
    """A RecordingNextHop that offers AUTH PLAIN and LOGIN without TLS (a lab next hop only)."""

    def start(self) -> SaslRecordingNextHop:
        controller = _Controller(
            _Handler(self), hostname=self.host, port=self.port, server_hostname=self.hostname,
            greeting=self.greeting, data_size_limit=None, ident="ESMTP lab next hop",
            authenticator=_authenticator, auth_require_tls=False,
        )
        controller.start()
        self._controller = controller
        self.port = controller.port
        return self


@dataclass
class FuzzRig:
    address: tuple[str, int]
    proc: subprocess.Popen
    spool: Path
    log_path: Path
    hop: SaslRecordingNextHop
    metrics: tuple[str, int]
    log_offset: int = 0
    tls: bool = False  # ClientTLS: on: every session starts with STARTTLS

    def active_sessions(self) -> int:
        """clamsmtpd_connections_active, from the daemon's metrics endpoint."""
        with socket.create_connection(self.metrics, timeout=5) as sock:
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        match = re.search(rb"^clamsmtpd_connections_active (\S+)$", data, re.M)
        assert match, data[-2000:]
        return int(float(match.group(1)))

    def new_log(self) -> str:
        """What the daemon logged since the last call."""
        with open(self.log_path, "rb") as log:
            log.seek(self.log_offset)
            data = log.read()
        self.log_offset += len(data)
        return data.decode("utf-8", "replace")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
