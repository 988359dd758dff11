"""A private clamd with a one-line EICAR signature database, for the lab and the tests.

No internet means no real signatures, and the system clamd must not be relied on. So each
`PrivateClamd` writes its own `eicar.ndb` and `clamd.conf` into a work directory and runs
`clamd -c clamd.conf` in the foreground, listening on `<workdir>/clamd.sock` (and optionally on
127.0.0.1:<free port>). It is ready once it answers PING with PONG.

    with PrivateClamd(tcp=True) as clamd:
        pyclamd.ClamdUnixSocket(clamd.socket_path).scan_stream(EICAR)
        # {'stream': ('FOUND', 'Eicar-Test-Signature.UNOFFICIAL')}
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

# The EICAR anti-virus test file, built from two halves so that this source file is not itself
# detected as a virus sample.
EICAR: bytes = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$" + rb"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
assert len(EICAR) == 68

SIGNATURE_NAME = "Eicar-Test-Signature"
# What clamd reports for a database that is not one of the official ones.
FOUND_NAME = SIGNATURE_NAME + ".UNOFFICIAL"


def eicar_bytes() -> bytes:
    """The 68-byte EICAR test string."""
    return EICAR


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


_handed_out: collections.deque[int] = collections.deque(maxlen=512)


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now, chosen outside the kernel's ephemeral range.

    A port the kernel picked with bind(0) can be handed out again to any outgoing connection
    before our daemon binds it; one below the ephemeral range can only be taken by another
    listener, which the test bind below rules out at the moment of choosing.
    """
    low, high = _ephemeral_range()
    candidates = range(20000, low) if low > 21000 else range(high + 1, 65536)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        for _ in range(200):
            port = random.choice(candidates)
            if port in _handed_out:  # two calls in a row must not name the same port
                continue
            try:
                sock.bind((host, port))
            except OSError:
                continue
            _handed_out.append(port)
            return port
        sock.bind((host, 0))  # a crowded range: fall back on the kernel's choice
        return sock.getsockname()[1]


def read_clamd_reply(sock: socket.socket) -> bytes:
    """Read a z-command's reply from clamd up to its NUL (or until clamd closes); the reply
    without the NUL."""
    reply = b""
    while not reply.endswith(b"\0"):
        part = sock.recv(4096)
        if not part:
            break
        reply += part
    return reply.rstrip(b"\0")


class ClamdError(RuntimeError):
    """clamd could not be started or did not answer."""


class PrivateClamd:
    """clamd with its own config, database, socket and log in a work directory.

    `workdir`: where to put everything (created if missing, kept afterwards); default a new
    temporary directory that `stop()` removes. `tcp=True` also listens on 127.0.0.1:`tcp_port`.
    """

    def __init__(
        self,
        workdir: str | os.PathLike | None = None,
        *,
        tcp: bool = False,
        start_timeout: float = 60.0,
        clamd_binary: str | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="private-clamd-"))
        self.start_timeout = start_timeout
        self.clamd_binary = clamd_binary or shutil.which("clamd") or "/usr/sbin/clamd"
        self.socket_path = str(self.workdir / "clamd.sock")
        self.tcp_port: int | None = free_tcp_port() if tcp else None
        self.conf_path = self.workdir / "clamd.conf"
        self.log_path = self.workdir / "clamd.log"
        self._output_path = self.workdir / "clamd.out"
        self.proc: subprocess.Popen | None = None
        #: clamd.conf directives that replace the defaults below (e.g. StreamMaxLength)
        self.settings = dict(settings or {})

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    # -- files ---------------------------------------------------------------------------

    def _write_files(self) -> None:
        db_dir = self.workdir / "db"
        db_dir.mkdir(parents=True, exist_ok=True)
        (db_dir / "eicar.ndb").write_text(f"{SIGNATURE_NAME}:0:*:{EICAR.hex()}\n")
        tmp_dir = self.workdir / "tmp"
        tmp_dir.mkdir(exist_ok=True)
        lines = [
            f"DatabaseDirectory {db_dir}",
            f"LocalSocket {self.socket_path}",
            "Foreground yes",
            f"LogFile {self.log_path}",
            "LogTime yes",
            f"TemporaryDirectory {tmp_dir}",
            "StreamMaxLength 200M",
            "MaxFileSize 200M",
            "MaxScanSize 400M",
            "MaxThreads 20",
            "MaxConnectionQueueLength 100",
            "ReadTimeout 30",
            "CommandReadTimeout 10",
            "SelfCheck 0",
        ]
        if self.tcp_port is not None:
            lines += [f"TCPSocket {self.tcp_port}", "TCPAddr 127.0.0.1"]
        if self.settings:
            lines = [line for line in lines if line.split()[0] not in self.settings]
            lines += [f"{name} {value}" for name, value in self.settings.items()]
        if os.geteuid() == 0:
            # Without it clamd (started as root) switches to the "clamav" user, which may not
            # exist and could not read this directory anyway.
            lines.append("User root")
        self.conf_path.write_text("\n".join(lines) + "\n")

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> PrivateClamd:
        """Start clamd and return once it answers PING; may be called again after kill()."""
        if self.is_running():
            raise RuntimeError("PrivateClamd already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_files()
        Path(self.socket_path).unlink(missing_ok=True)  # left behind by kill()
        try:
            with open(self._output_path, "wb") as out:
                self.proc = subprocess.Popen(
                    [self.clamd_binary, "-c", str(self.conf_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
        except FileNotFoundError:
            raise ClamdError(
                f"{self.clamd_binary} not found: install the clamav-daemon package (scripts/setup)"
            ) from None
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ClamdError(
                    f"clamd exited with status {self.proc.returncode} during start-up\n"
                    + self._tail()
                )
            try:
                if self.ping():
                    return
            except OSError as error:
                last_error = error
            time.sleep(0.1)
        raise ClamdError(
            f"clamd did not answer PING within {self.start_timeout:.0f} s "
            f"(last error: {last_error})\n" + self._tail()
        )

    def ping(self, timeout: float = 2.0) -> bool:
        """True if clamd answers PONG on its unix socket (OSError if it cannot be reached)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(self.socket_path)
            sock.sendall(b"zPING\0")
            return read_clamd_reply(sock) == b"PONG"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop clamd (SIGTERM, then SIGKILL) and remove a temporary work directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL clamd, as a crash would (for fault tests); its socket file stays behind."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- logs ----------------------------------------------------------------------------

    def log_text(self) -> str:
        """clamd's log file and anything it wrote to stdout/stderr, so far."""
        parts = []
        for path in (self.log_path, self._output_path):
            with contextlib.suppress(FileNotFoundError):
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)

    def _tail(self, lines: int = 30) -> str:
        text = self.log_text().splitlines()[-lines:]
        return "clamd log (last lines):\n" + "\n".join("  " + line for line in text)

    def __enter__(self) -> PrivateClamd:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        tcp = f" tcp=127.0.0.1:{self.tcp_port}" if self.tcp_port else ""
        return f"<PrivateClamd pid={self.pid} socket={self.socket_path}{tcp}>"
