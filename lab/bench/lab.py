"""The lab: the private clamd and the smtp-sink next hop, started once, and a fresh proxy
process (the C clamsmtpd or ours, on equivalent configurations) for every run."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from pathlib import Path

from .. import PrivateClamd, daemon_argv, free_tcp_port, stop_process
from .procstat import cpu_seconds
from .tools import CLAMD_BINARY, tool
from .workload import HOST, OURS2, OURSAIO, OURSW2, TARGET_NAMES, C

START_TIMEOUT = 30.0


class BenchError(RuntimeError):
    pass


def wait_accepting(port: int, timeout: float, proc: subprocess.Popen | None = None,
                   what: str = "server") -> str:
    """Wait until something on `port` greets with 220; the greeting."""
    deadline = time.monotonic() + timeout
    last_error: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode} during start-up")
        try:
            with socket.create_connection((HOST, port), timeout=5) as sock:
                greeting = sock.makefile("rb").readline().decode("utf-8", "replace").strip()
                sock.sendall(b"QUIT\r\n")
            if greeting.startswith("220"):
                return greeting
            last_error = f"greeting {greeting!r}"
        except OSError as error:
            last_error = error
        time.sleep(0.1)
    raise BenchError(f"{what} did not greet on {HOST}:{port} within {timeout:.0f} s "
                     f"(last: {last_error})")


class Lab:
    """The private clamd and the discard next hop, started once; the proxies, once per run."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.clamd: PrivateClamd | None = None
        self.clamd2: PrivateClamd | None = None  # for OURS2 only, started on demand
        self.sink: subprocess.Popen | None = None
        self.sink_port = 0
        self._starts = 0

    def start(self) -> None:
        self.clamd = PrivateClamd(self.workdir / "clamd", clamd_binary=CLAMD_BINARY).start()
        self.sink_port = free_tcp_port()
        # -u: drop root after binding (required as root); backlog 1000; -m: concurrent
        # sessions it serves (default 256). It has no message size limit and announces no SIZE.
        argv = [tool("smtp-sink"), "-u", "nobody", "-m", "512",
                f"{HOST}:{self.sink_port}", "1000"]
        with open(self.workdir / "smtp-sink.log", "ab") as log:
            self.sink = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        wait_accepting(self.sink_port, START_TIMEOUT, self.sink, "smtp-sink")

    def stop(self) -> None:
        if self.sink is not None:
            stop_process(self.sink)
        for clamd in (self.clamd, self.clamd2):
            if clamd is not None:
                clamd.stop()

    @property
    def clamd_pid(self) -> int | None:
        return self.clamd.pid if self.clamd else None

    def clamd_cpu(self) -> float | None:
        """CPU seconds of every clamd so far (None if one is gone)."""
        total = 0.0
        for clamd in (self.clamd, self.clamd2):
            if clamd is not None:
                seconds = cpu_seconds(clamd.pid)
                if seconds is None:
                    return None
                total += seconds
        return total

    def _clamd_addresses(self, target: str) -> str:
        assert self.clamd is not None
        if target != OURS2:
            return self.clamd.socket_path
        if self.clamd2 is None:
            self.clamd2 = PrivateClamd(self.workdir / "clamd2",
                                       clamd_binary=CLAMD_BINARY).start()
        return f"{self.clamd.socket_path}, {self.clamd2.socket_path}"

    def write_config(self, target: str, port: int) -> tuple[Path, Path]:
        """The clamsmtpd.conf both proxies understand; each proxy its own TempDirectory."""
        assert self.clamd is not None
        spool = self.workdir / f"spool-{target}"
        spool.mkdir(mode=0o700, exist_ok=True)
        conf = self.workdir / f"{target}.conf"
        conf.write_text(
            "# written by lab.bench; the same for the C clamsmtpd and ours\n"
            f"Listen: {HOST}:{port}\n"
            f"OutAddress: {HOST}:{self.sink_port}\n"
            f"ClamAddress: {self._clamd_addresses(target)}\n"
            f"TempDirectory: {spool}\n"
            "MaxConnections: 256\n"
            "TimeOut: 120\n"
            "Action: drop\n"
            + ("Workers: 2\n" if target == OURSW2 else "")
            + ("EventLoop: asyncio\n" if target == OURSAIO else "")
            + "# Header: the default (X-Virus-Scanned: ClamAV using ClamSMTP); no User:, as root,\n"
            "# so that clamd (root) can read the C one's files for its path-based SCAN\n"
        )
        return conf, spool

    def start_proxy(self, target: str, notes: list[str]) -> tuple[subprocess.Popen, int, Path,
                                                                   Path]:
        """A fresh proxy process, accepting; (process, port, log file, spool). A failed start
        is tried once more on another port (the free port may have been taken meanwhile) and
        noted in `notes`; a second failure is a BenchError with the end of the proxy's log."""
        log_path = self.workdir / f"{target}.log"
        for attempt in (1, 2):
            port = free_tcp_port()
            conf, spool = self.write_config(target, port)
            argv = daemon_argv(str(conf), debug_level=0, reference=(target == C))
            self._starts += 1
            offset = _file_size(log_path)
            with open(log_path, "ab") as log:
                log.write(f"--- start {self._starts}: {' '.join(argv)}\n".encode())
                log.flush()
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT)
            try:
                wait_accepting(port, START_TIMEOUT, proc, TARGET_NAMES[target])
                return proc, port, log_path, spool
            except BenchError as error:
                stop_process(proc)
                tail = " | ".join(_log_lines(log_path, offset)[-3:]) or "nothing logged"
                problem = f"{error} (log: {tail[:300]})"
                if attempt == 2:
                    raise BenchError(problem) from None
                notes.append(f"start-up failed once, then started on another port: {problem}")
            except BaseException:
                stop_process(proc)
                raise
        raise AssertionError("unreachable")


def _log_lines(path: Path, offset: int) -> list[str]:
    with contextlib.suppress(OSError), open(path, "rb") as log:
        log.seek(offset)
        text = log.read().decode("utf-8", "replace")
        return [line for line in text.splitlines() if line and not line.startswith("--- ")]
    return []


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
