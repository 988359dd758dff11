"""Benchmark this project's clamsmtpd against the C clamsmtpd, on loopback, in one run.

    smtp-source ─┬─> C clamsmtpd (/usr/sbin/clamsmtpd) ─┬─> smtp-sink (discards)
    (the load)   ├─> ours (python -m appliance.cli)   ─┘
                 └─> smtp-sink directly ("direct": the ceiling without a proxy)
    Python threads ─> clamd INSTREAM ("clamd alone": the ceiling for any scanning proxy)

Both proxies get equivalent configurations (the same private clamd, the same next hop, the same
MaxConnections and TimeOut, each its own TempDirectory) and a fresh process for every run, so
that VmHWM (peak RSS since process start) belongs to that run's load. The two proxies are
alternated over the rounds. Per run:

- throughput: `smtp-source` sends N messages of one size over S parallel sessions, one
  connection per message (smtp-source's default); msg/s = N / wall time. A run counts only if
  every message got 250; rejections are counted by reply text (smtp-source runs with -A).
- latency: a small asyncio client sends messages of the same size over the same number of
  sessions and times each one from the DATA command to the 250 after the final dot.
- CPU seconds per message of the proxy process (utime+stime of /proc/<pid>/stat: all threads)
  and of clamd, from deltas around the smtp-source run.

Every message the bench's own clients send has a new Message-Id, as smtp-source's have: clamd
caches clean results by content hash, so identical messages would be scanned only once.

Timeouts bound everything: per run (smtp-source, latency client, "clamd alone"), per message in
the Python clients, at start-up and at stop. A run with a timeout, a crash or any message not
answered 250 does not count and is reported; a proxy that hung on a load is not tried on it
again in later rounds. Exit status: 0 when every run of ours and of the ceilings counted (the C
clamsmtpd is the reference: what it loses is reported, not a failure), 1 otherwise, 2 when
tools are missing or not run as root.

    python -m appliance.lab.bench              # full run, a few minutes
    python -m appliance.lab.bench --quick      # under a minute
    python -m appliance.lab.bench --scenarios 1k --targets ours --rounds 1   # what to profile

scripts/bench runs scripts/setup first; docs/performance.md explains the columns.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import email.utils
import itertools
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import PrivateClamd, daemon_argv, free_tcp_port, stop_process
from .clamd import ClamdError

HOST = "127.0.0.1"
SENDER = "a@example.com"
RECIPIENT = "b@example.com"
HELO_NAME = "bench.example.com"
KB = 1024
MB = 1024 * KB
CLK_TCK = os.sysconf("SC_CLK_TCK")
C_DAEMON = "/usr/sbin/clamsmtpd"
CLAMD_BINARY = shutil.which("clamd") or "/usr/sbin/clamd"  # what PrivateClamd runs
START_TIMEOUT = 30.0
#: INSTREAM chunk size of the "clamd alone" client (the same as appliance/scanner.py's).
CHUNK = 1 << 18

# target keys, in the order rows are printed
DIRECT, CLAMD, C, OURS = "direct", "clamd", "c", "ours"
TARGETS = (DIRECT, CLAMD, C, OURS)
PROXIES = (C, OURS)
TARGET_NAMES = {DIRECT: "direct", CLAMD: "clamd alone", C: "C clamsmtpd", OURS: "ours"}


@dataclass(frozen=True)
class Scenario:
    """One load: `messages` of `size` payload bytes over `sessions` parallel sessions."""

    key: str
    size: int
    sessions: int
    messages: int  # per smtp-source run (and per "clamd alone" run)
    latency_messages: int  # per latency-client run
    timeout: float  # seconds, per run (smtp-source, latency client, clamd alone)
    quick: tuple[int, int, float]  # messages, latency_messages, timeout with --quick
    max_rounds: int | None = None  # None: every round

    @property
    def label(self) -> str:
        return f"{human_size(self.size)} x{self.sessions}"


SCENARIOS = (
    Scenario("1k", 1 * KB, 20, 1000, 400, 120.0, quick=(200, 60, 20.0)),
    Scenario("100k", 100 * KB, 10, 500, 200, 120.0, quick=(100, 40, 20.0)),
    Scenario("5m", 5 * MB, 4, 40, 16, 180.0, quick=(8, 4, 60.0)),
    # the peak-RSS load: 4 concurrent 25 MB messages, in one round only
    Scenario("25m", 25 * MB, 4, 8, 4, 180.0, quick=(4, 4, 60.0), max_rounds=1),
)
SCENARIO_KEYS = tuple(s.key for s in SCENARIOS)


def human_size(size: int) -> str:
    if size % MB == 0:
        return f"{size // MB} MB"
    if size % KB == 0:
        return f"{size // KB} KB"
    return f"{size} B"


# -- the message ------------------------------------------------------------------------------


def message_timeout(size: int) -> float:
    """How long the latency client and "clamd alone" wait for one message of `size` bytes
    before counting it as failed (a proxy answers a small one in milliseconds)."""
    return 10.0 + 2.0 * size / MB


def source_payload(length: int) -> bytes:
    """The body `smtp-source -l length` sends: 78 characters and CRLF per line, each line
    starting with a digit, the last line unterminated (smtp-source ends it with CRLF . CRLF)."""
    data = bytearray(b"X" * length)
    for end in range(80, length, 80):
        data[end - 80] = ord("0123456789"[(end // 80) % 10])
        data[end - 2 : end] = b"\r\n"
    return bytes(data)


_serials = itertools.count(1)


def message_header() -> bytes:
    """Headers like smtp-source's, with a Message-Id never used before in this process: clamd
    keeps a cache of clean files by hash, so identical messages would be scanned only once
    (smtp-source's Message-Id and Date differ from message to message too)."""
    return (
        f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\n"
        f"Date: {email.utils.formatdate(usegmt=True)}\r\n"
        f"Message-Id: <bench.{os.getpid()}.{next(_serials)}@{HELO_NAME}>\r\n\r\n"
    ).encode()


def message_body(size: int) -> bytes:
    """The body of `smtp-source -l size` as it is on the wire before the final dot."""
    return source_payload(size) + b"\r\n"


def message_bytes(size: int) -> bytes:
    """One whole message like smtp-source's: what the latency client sends and what "clamd
    alone" scans (both send a new header, then the shared body, without copying it)."""
    return message_header() + message_body(size)


# -- /proc ------------------------------------------------------------------------------------


def cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a whole process (every thread), or None if it is gone."""
    if pid is None:
        return None
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def peak_rss_kb(pid: int) -> int | None:
    """VmHWM: the process's peak resident set size since it started, in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


# -- results ----------------------------------------------------------------------------------


@dataclass
class Run:
    """One measurement of one target under one scenario in one round."""

    target: str
    scenario: str
    round: int
    messages: int = 0
    accepted: int = 0
    seconds: float = 0.0
    failures: Counter = field(default_factory=Counter)
    error: str | None = None  # the run did not complete (timeout, crash, ...)
    proxy_cpu: float | None = None  # seconds during the throughput load
    clamd_cpu: float | None = None
    rss_kb: int | None = None
    latencies: list[float] = field(default_factory=list)  # seconds, DATA -> 250
    latency_messages: int = 0
    latency_accepted: int = 0
    latency_failures: Counter = field(default_factory=Counter)
    latency_error: str | None = None
    notes: list[str] = field(default_factory=list)
    wall: float = 0.0  # seconds the whole measurement took (start, warm-up, loads, stop)

    @property
    def counts(self) -> bool:
        """Throughput counts only when the run completed and every message was accepted."""
        return self.error is None and self.messages > 0 and self.accepted == self.messages

    @property
    def latency_counts(self) -> bool:
        return (self.latency_error is None and self.latency_messages > 0
                and self.latency_accepted == self.latency_messages)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Summary:
    """The rounds of one target under one scenario, combined."""

    target: str
    scenario: str
    runs: int
    counted: int
    rate: float | None  # median msg/s of the counted runs
    rate_min: float | None
    rate_max: float | None
    p50_ms: float | None
    p99_ms: float | None
    latency_samples: int
    latency_runs: int  # runs that timed messages
    latency_counted: int  # ... of which every message was accepted (the p50/p99 come from them)
    cpu_ms: float | None  # median proxy CPU ms per message
    clamd_cpu_ms: float | None
    rss_mb: float | None  # max VmHWM over the runs
    attempted: int
    accepted: int
    failures: dict[str, int]
    errors: list[str]
    notes: list[str]

    @property
    def ok(self) -> bool:
        return self.counted == self.runs and self.runs > 0 and self.accepted == self.attempted


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), interpolated between the closest ranks."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(runs: Sequence[Run], target: str, scenario: str) -> Summary:
    mine = [r for r in runs if r.target == target and r.scenario == scenario]
    counted = [r for r in mine if r.counts]
    rates = [r.rate for r in counted]
    # "clamd alone" times every scan of its load; the others have a separate latency run
    timed = [r for r in mine if r.latency_messages or r.target == CLAMD]
    timed_counted = [r for r in timed if (r.counts if r.target == CLAMD else r.latency_counts)]
    latencies = [x for r in timed_counted for x in r.latencies]

    def per_message(attr: str) -> float | None:
        values = [getattr(r, attr) / r.messages * 1000 for r in counted
                  if getattr(r, attr) is not None]
        return statistics.median(values) if values else None

    failures: Counter = Counter()
    for r in mine:
        failures.update(r.failures)
        failures.update(r.latency_failures)
    rss = [r.rss_kb for r in mine if r.rss_kb is not None]
    errors = [f"round {r.round}: {r.error}" for r in mine if r.error]
    errors += [f"round {r.round} (latency): {r.latency_error}" for r in mine if r.latency_error]
    notes = list(dict.fromkeys(n for r in mine for n in r.notes))
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    return Summary(
        target=target,
        scenario=scenario,
        runs=len(mine),
        counted=len(counted),
        rate=statistics.median(rates) if rates else None,
        rate_min=min(rates) if rates else None,
        rate_max=max(rates) if rates else None,
        p50_ms=p50 * 1000 if p50 is not None else None,
        p99_ms=p99 * 1000 if p99 is not None else None,
        latency_samples=len(latencies),
        latency_runs=len(timed),
        latency_counted=len(timed_counted),
        cpu_ms=per_message("proxy_cpu"),
        clamd_cpu_ms=per_message("clamd_cpu"),
        rss_mb=max(rss) / 1024 if rss else None,
        attempted=sum(r.messages + r.latency_messages for r in mine),
        accepted=sum(r.accepted + r.latency_accepted for r in mine),
        failures=dict(failures.most_common()),
        errors=errors,
        notes=notes,
    )


# -- load: smtp-source ------------------------------------------------------------------------

_DIAGNOSTIC = re.compile(r"^\S*smtp-source: (warning|fatal): (.*)$")


@dataclass
class SourceResult:
    seconds: float
    completed: int
    failures: Counter
    error: str | None


class _Drain(threading.Thread):
    """Reads a pipe to its end, noting when data last came and when the end came."""

    def __init__(self, pipe) -> None:
        super().__init__(daemon=True)
        self.pipe = pipe
        self.data = bytearray()
        self.last = time.perf_counter()
        self.closed = threading.Event()
        self.closed_at: float | None = None

    def run(self) -> None:
        try:
            while chunk := os.read(self.pipe.fileno(), 65536):
                self.data += chunk
                self.last = time.perf_counter()
        finally:
            self.closed_at = time.perf_counter()
            self.closed.set()


def run_smtp_source(port: int, size: int, sessions: int, messages: int, timeout: float,
                    *, keep_connection: bool = False) -> SourceResult:
    """`smtp-source -A -c -m messages -s sessions -l size ...`; failures counted from its
    warnings (-A: a rejection is a warning, not the end of the run).

    Bounded twice: `timeout` for the whole run, and a stall limit: smtp-source prints its
    counter (-c) after every message, so when no message has completed for
    message_timeout(size) seconds, a session is stuck (a server that never answers) and
    smtp-source, which would wait minutes for it, is stopped."""
    argv = [tool("smtp-source"), "-A", "-c", "-m", str(messages), "-s", str(sessions),
            "-l", str(size), "-M", HELO_NAME, "-f", SENDER, "-t", RECIPIENT]
    if keep_connection:
        argv.append("-d")
    argv.append(f"{HOST}:{port}")
    stall = message_timeout(size)
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    out, err = _Drain(proc.stdout), _Drain(proc.stderr)
    out.start()
    err.start()
    error = None
    try:
        while not out.closed.wait(0.1):
            now = time.perf_counter()
            if now - start >= timeout:
                error = f"smtp-source timed out after {timeout:.0f} s"
            elif now - out.last >= stall:
                error = f"smtp-source stalled: no message completed for {stall:.0f} s"
            if error:
                proc.kill()
                break
        proc.wait()
        out.join()
        err.join()
    except BaseException:  # interrupted: leave nothing behind
        proc.kill()
        proc.wait()
        raise
    finally:
        proc.stdout.close()
        proc.stderr.close()
    # the end of its output is when smtp-source finished (exact, unlike polling)
    seconds = (out.closed_at or time.perf_counter()) - start
    counters = re.findall(rb"\d+", bytes(out.data))
    completed = int(counters[-1]) if counters else 0
    failures: Counter = Counter()
    fatal = None
    for line in bytes(err.data).decode("utf-8", "replace").splitlines():
        # "/usr/sbin/smtp-source: warning: end of data rejected: 451 ..." (-A), or "fatal: ..."
        match = _DIAGNOSTIC.match(line)
        if match and match[1] == "warning":
            failures[match[2].strip()[:80]] += 1
        elif match:
            fatal = match[0]
    if error is None and proc.returncode != 0:
        error = f"smtp-source exited with status {proc.returncode}" + (
            f": {fatal.split(': ', 1)[1]}" if fatal else "")
    if error is None and completed < messages:
        error = f"smtp-source completed {completed} of {messages} messages"
    elif error and "stalled" in error:
        error += f" ({completed} of {messages} done)"
    return SourceResult(seconds, completed, failures, error)


# -- load: the latency client -----------------------------------------------------------------


class _Refused(Exception):
    def __init__(self, stage: str, reply: str) -> None:
        super().__init__(f"{stage}: {reply}")
        self.key = f"{stage} rejected: {reply}"[:80]


async def _reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed by the server")
        lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
        if len(line) < 4 or line[3:4] != b"-":
            break
    try:
        code = int(lines[0][:3])
    except ValueError:
        code = 0
    return code, lines[-1]


async def _command(reader, writer, stage: str, line: bytes | None, expect: int) -> None:
    if line is not None:
        writer.write(line)
    code, text = await _reply(reader)
    if code != expect:
        raise _Refused(stage, text)


async def _send_one(port: int, body: bytes) -> float:
    """One message over a new connection; returns seconds from DATA to the final 250."""
    reader, writer = await asyncio.open_connection(HOST, port, limit=1 << 16)
    try:
        await _command(reader, writer, "greeting", None, 220)
        await _command(reader, writer, "HELO", f"HELO {HELO_NAME}\r\n".encode(), 250)
        await _command(reader, writer, "MAIL", f"MAIL FROM:<{SENDER}>\r\n".encode(), 250)
        await _command(reader, writer, "RCPT", f"RCPT TO:<{RECIPIENT}>\r\n".encode(), 250)
        start = time.perf_counter()
        await _command(reader, writer, "DATA", b"DATA\r\n", 354)
        writer.write(message_header())
        writer.write(body)
        writer.write(b".\r\n")
        await writer.drain()
        await _command(reader, writer, "end of data", None, 250)
        elapsed = time.perf_counter() - start
        writer.write(b"QUIT\r\n")
        with contextlib.suppress(OSError, ConnectionError, asyncio.TimeoutError):
            await asyncio.wait_for(_reply(reader), 5)
        return elapsed
    finally:
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()


@dataclass
class LoadResult:
    latencies: list[float]
    accepted: int
    failures: Counter
    error: str | None
    seconds: float


async def _latency_load(port: int, body: bytes, messages: int, sessions: int,
                        timeout: float) -> LoadResult:
    latencies: list[float] = []
    failures: Counter = Counter()
    todo = iter(range(messages))
    deadline = time.monotonic() + timeout
    patience = message_timeout(len(body))
    expired = False

    async def worker() -> None:
        nonlocal expired
        for _ in todo:
            left = deadline - time.monotonic()
            if left <= 0:
                expired = True
                return
            try:
                latencies.append(await asyncio.wait_for(_send_one(port, body),
                                                        min(left, patience)))
            except _Refused as refused:
                failures[refused.key] += 1
            except TimeoutError:
                if time.monotonic() >= deadline:
                    expired = True
                    return
                failures[f"no reply within {patience:.0f} s"] += 1
            except (OSError, ConnectionError) as error:
                failures[f"{type(error).__name__}: {error}"[:80]] += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(sessions)))
    seconds = time.perf_counter() - start
    error = f"latency client timed out after {timeout:.0f} s" if expired else None
    return LoadResult(latencies, len(latencies), failures, error, seconds)


def run_latency_client(port: int, body: bytes, messages: int, sessions: int,
                       timeout: float) -> LoadResult:
    """`messages` messages with `body` over `sessions` parallel sessions, one connection per
    message; the time of each from DATA to the 250 after the final dot."""
    return asyncio.run(_latency_load(port, body, messages, sessions, timeout))


# -- load: clamd alone ------------------------------------------------------------------------


def instream(socket_path: str, parts: Iterable[bytes], timeout: float) -> bytes:
    """zINSTREAM of `parts` (one stream) over a new connection; clamd's reply without the NUL."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(b"zINSTREAM\0")
        for part in parts:
            view = memoryview(part)
            for offset in range(0, len(part), CHUNK):
                chunk = view[offset : offset + CHUNK]
                sock.sendall(struct.pack("!I", len(chunk)))
                sock.sendall(chunk)
        sock.sendall(struct.pack("!I", 0))
        reply = b""
        while not reply.endswith(b"\0"):
            part = sock.recv(4096)
            if not part:
                break
            reply += part
    return reply.rstrip(b"\0")


def run_clamd_alone(socket_path: str, body: bytes, messages: int, sessions: int,
                    timeout: float) -> LoadResult:
    """`messages` INSTREAM scans of messages with `body` from `sessions` threads."""
    latencies: list[float] = []
    failures: Counter = Counter()
    lock = threading.Lock()
    todo = iter(range(messages))
    deadline = time.monotonic() + timeout
    expired = threading.Event()

    def worker() -> None:
        while True:
            with lock:
                if next(todo, None) is None:
                    return
            left = deadline - time.monotonic()
            if left <= 0:
                expired.set()
                return
            start = time.perf_counter()
            try:
                header = message_header()
                reply = instream(socket_path, (header, body),
                                 min(left, message_timeout(len(body))))
            except TimeoutError:
                expired.set()
                return
            except OSError as error:
                with lock:
                    failures[f"{type(error).__name__}: {error}"[:80]] += 1
                continue
            elapsed = time.perf_counter() - start
            with lock:
                if reply == b"stream: OK":
                    latencies.append(elapsed)
                else:
                    failures[reply.decode("utf-8", "replace")[:80] or "no reply"] += 1

    start = time.perf_counter()
    with ThreadPoolExecutor(sessions, thread_name_prefix="clamd-alone") as pool:
        for future in [pool.submit(worker) for _ in range(sessions)]:
            future.result()
    seconds = time.perf_counter() - start
    error = f"clamd scans timed out after {timeout:.0f} s" if expired.is_set() else None
    return LoadResult(latencies, len(latencies), failures, error, seconds)


# -- the lab: clamd, smtp-sink, the proxies ---------------------------------------------------


class BenchError(RuntimeError):
    pass


def tool(name: str) -> str:
    """A postfix test tool: /usr/sbin is not on every PATH."""
    return shutil.which(name) or f"/usr/sbin/{name}"


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
        if self.clamd is not None:
            self.clamd.stop()

    @property
    def clamd_pid(self) -> int | None:
        return self.clamd.pid if self.clamd else None

    def write_config(self, target: str, port: int) -> tuple[Path, Path]:
        """The clamsmtpd.conf both proxies understand; each proxy its own TempDirectory."""
        assert self.clamd is not None
        spool = self.workdir / f"spool-{target}"
        spool.mkdir(mode=0o700, exist_ok=True)
        conf = self.workdir / f"{target}.conf"
        conf.write_text(
            "# written by appliance.lab.bench; the same for the C clamsmtpd and ours\n"
            f"Listen: {HOST}:{port}\n"
            f"OutAddress: {HOST}:{self.sink_port}\n"
            f"ClamAddress: {self.clamd.socket_path}\n"
            f"TempDirectory: {spool}\n"
            "MaxConnections: 256\n"
            "TimeOut: 120\n"
            "Action: drop\n"
            "# Header: the default (X-Virus-Scanned: ClamAV using ClamSMTP); no User:, as root,\n"
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


# -- one run per target ----------------------------------------------------------------------


@dataclass
class Plan:
    scenarios: tuple[Scenario, ...]
    targets: tuple[str, ...]
    rounds: int
    messages: dict[str, int]
    latency_messages: dict[str, int]
    timeouts: dict[str, float]
    latency: bool
    keep_connection: bool

    def rounds_of(self, scenario: Scenario) -> int:
        return min(self.rounds, scenario.max_rounds or self.rounds)


def measure_proxy(lab: Lab, plan: Plan, target: str, scenario: Scenario, round_no: int) -> Run:
    run = Run(target, scenario.key, round_no)
    messages = plan.messages[scenario.key]
    timeout = plan.timeouts[scenario.key]
    try:
        proc, port, log_path, spool = lab.start_proxy(target, run.notes)
    except BenchError as error:
        run.error = str(error)
        return run
    log_offset = _file_size(log_path)
    try:
        # Warm-up (not counted): the first connections pay for imports, thread starts, ...
        warm = run_smtp_source(port, KB, min(scenario.sessions, 4),
                               2 * min(scenario.sessions, 4), 30.0)
        if warm.error or warm.failures:
            run.error = "warm-up failed: " + (warm.error or ", ".join(warm.failures))
            return run
        cpu0, clamd0 = cpu_seconds(proc.pid), cpu_seconds(lab.clamd_pid)
        result = run_smtp_source(port, scenario.size, scenario.sessions, messages, timeout,
                                 keep_connection=plan.keep_connection)
        cpu1, clamd1 = cpu_seconds(proc.pid), cpu_seconds(lab.clamd_pid)
        run.messages, run.seconds, run.failures = messages, result.seconds, result.failures
        run.accepted = max(0, min(result.completed, messages) - sum(result.failures.values()))
        run.error = result.error
        if None not in (cpu0, cpu1):
            run.proxy_cpu = cpu1 - cpu0
        if None not in (clamd0, clamd1):
            run.clamd_cpu = clamd1 - clamd0
        run.rss_kb = peak_rss_kb(proc.pid)
        if proc.poll() is not None:
            run.error = f"the proxy exited with status {proc.returncode} during the load"
            return run
        hung = result.error is not None and "timed out" in result.error
        if plan.latency and not hung:
            lat = run_latency_client(port, message_body(scenario.size),
                                     plan.latency_messages[scenario.key],
                                     scenario.sessions, timeout)
            run.latencies, run.latency_accepted = lat.latencies, lat.accepted
            run.latency_messages = plan.latency_messages[scenario.key]
            run.latency_failures, run.latency_error = lat.failures, lat.error
            if proc.poll() is not None:
                run.latency_error = f"the proxy exited with status {proc.returncode}"
    finally:
        status = stop_process(proc)
        if status not in (0, -signal.SIGTERM):
            run.notes.append(f"exit status {status} after SIGTERM")
        lines = _log_lines(log_path, log_offset)
        if lines:
            run.notes.append(f"{len(lines)} log line(s) at -d 0, e.g. {lines[0][:120]!r}")
        left = list(spool.iterdir()) if spool.is_dir() else []
        if left:
            run.notes.append(f"{len(left)} file(s) left in TempDirectory after stop")
            for path in left:
                with contextlib.suppress(OSError):
                    path.unlink()
    return run


def measure_direct(lab: Lab, plan: Plan, scenario: Scenario, round_no: int) -> Run:
    run = Run(DIRECT, scenario.key, round_no)
    messages, timeout = plan.messages[scenario.key], plan.timeouts[scenario.key]
    result = run_smtp_source(lab.sink_port, scenario.size, scenario.sessions, messages, timeout,
                             keep_connection=plan.keep_connection)
    run.messages, run.seconds, run.failures = messages, result.seconds, result.failures
    run.accepted = max(0, min(result.completed, messages) - sum(result.failures.values()))
    run.error = result.error
    if plan.latency and run.error is None:
        lat = run_latency_client(lab.sink_port, message_body(scenario.size),
                                 plan.latency_messages[scenario.key], scenario.sessions, timeout)
        run.latencies, run.latency_accepted = lat.latencies, lat.accepted
        run.latency_messages = plan.latency_messages[scenario.key]
        run.latency_failures, run.latency_error = lat.failures, lat.error
    return run


def measure_clamd(lab: Lab, plan: Plan, scenario: Scenario, round_no: int) -> Run:
    """INSTREAM scans of the message; each scan's time is also its latency."""
    assert lab.clamd is not None
    run = Run(CLAMD, scenario.key, round_no)
    messages, timeout = plan.messages[scenario.key], plan.timeouts[scenario.key]
    clamd0 = cpu_seconds(lab.clamd_pid)
    result = run_clamd_alone(lab.clamd.socket_path, message_body(scenario.size), messages,
                             scenario.sessions, timeout)
    clamd1 = cpu_seconds(lab.clamd_pid)
    run.messages, run.seconds, run.accepted = messages, result.seconds, result.accepted
    run.failures, run.error = result.failures, result.error
    if None not in (clamd0, clamd1):
        run.clamd_cpu = clamd1 - clamd0
    run.latencies = result.latencies
    if not lab.clamd.is_running():
        run.error = "clamd exited"
    return run


def measure(lab: Lab, plan: Plan, target: str, scenario: Scenario, round_no: int) -> Run:
    if target == DIRECT:
        return measure_direct(lab, plan, scenario, round_no)
    if target == CLAMD:
        return measure_clamd(lab, plan, scenario, round_no)
    return measure_proxy(lab, plan, target, scenario, round_no)


def run_order(plan: Plan, round_no: int) -> list[str]:
    """Ceilings first, then the two proxies, in alternating order from round to round."""
    proxies = [t for t in PROXIES if t in plan.targets]
    if round_no % 2 == 0:
        proxies.reverse()
    return [t for t in (DIRECT, CLAMD) if t in plan.targets] + proxies


def progress(run: Run, scenario: Scenario) -> str:
    name = TARGET_NAMES[run.target]
    text = f"{scenario.label:>10}  {name:<12} "
    if run.messages and run.error is None:
        text += f"{run.rate:8.1f} msg/s  {run.accepted}/{run.messages} accepted"
    elif run.messages:
        text += f"{run.accepted}/{run.messages} accepted in {run.seconds:.1f} s"
    if run.proxy_cpu is not None and run.messages:
        text += f"  cpu {run.proxy_cpu / run.messages * 1000:.2f} ms/msg"
    if run.latencies:
        text += f"  p50 {percentile(run.latencies, 50) * 1000:.1f} ms"
    if run.error:
        text += f"  FAILED: {run.error}"
    if run.failures or run.latency_failures:
        text += f"  failures: {dict(run.failures + run.latency_failures)}"
    if run.latency_error:
        text += f"  latency: {run.latency_error}"
    return text + f"  ({run.wall:.1f} s)"


def execute(plan: Plan, workdir: Path, say=print) -> list[Run]:
    """Start the lab, run every (round, scenario, target), stop the lab; the runs."""
    lab = Lab(workdir)
    runs: list[Run] = []
    hung: set[tuple[str, str]] = set()  # a proxy that hung on a scenario is not retried
    try:
        lab.start()
        say(f"bench: clamd pid {lab.clamd_pid}, smtp-sink on {HOST}:{lab.sink_port}, "
            f"work directory {workdir}")
        for round_no in range(1, plan.rounds + 1):
            say(f"bench: round {round_no} of {plan.rounds}")
            for scenario in plan.scenarios:
                if round_no > plan.rounds_of(scenario):
                    continue
                for target in run_order(plan, round_no):
                    if (target, scenario.key) in hung:
                        continue
                    began = time.monotonic()
                    run = measure(lab, plan, target, scenario, round_no)
                    run.wall = time.monotonic() - began
                    runs.append(run)
                    say("bench:   " + progress(run, scenario))
                    if run.error and "timed out" in run.error:
                        hung.add((target, scenario.key))
    finally:
        lab.stop()
    return runs


# -- the machine ------------------------------------------------------------------------------


def _command_output(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "?"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0].strip() if lines else "?"


def machine_info() -> dict[str, str]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    from appliance import __version__

    repo = Path(__file__).resolve().parents[2]
    commit = _command_output(["git", "-C", str(repo), "describe", "--always", "--dirty"])
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": model,
        "memory": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "clamd": _command_output([CLAMD_BINARY, "--version"]),
        "C clamsmtpd": _command_output([C_DAEMON, "-v"]),
        "ours": f"{__version__} (git {commit})",
        "postfix (smtp-source, smtp-sink)": _command_output(
            ["dpkg-query", "-W", "-f", "${Version}", "postfix"]),
    }


def busy_cpu_seconds() -> float | None:
    """CPU time all processors spent busy since boot (user, nice, system, irq, softirq)."""
    try:
        values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = values
    return (user + nice + system + irq + softirq) / CLK_TCK


def own_cpu_seconds() -> float:
    """CPU time of this process and its children that have been waited for: the whole
    benchmark once everything it started has stopped."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def load_average() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except (OSError, IndexError):
        return "?"


# -- the report -------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 3) -> str:
    """A number to about `digits` significant digits, '-' for none."""
    if value is None:
        return "-"
    if value == 0:
        return "0"
    magnitude = len(str(int(abs(value)))) if abs(value) >= 1 else 0
    return f"{value:.{max(digits - magnitude, 0)}f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}"


RESULT_COLUMNS = ("load", "target", "msg/s", "range", "p50 ms", "p99 ms", "CPU ms/msg",
                  "clamd ms/msg", "peak RSS MB", "accepted", "notes")
RATIO_COLUMNS = ("load", "ours/C msg/s", "ours/clamd msg/s", "C/clamd msg/s", "ours/C p50",
                 "ours/C p99", "ours/C CPU/msg", "ours/C RSS")


def result_rows(summaries: Iterable[Summary], scenarios: dict[str, Scenario]) -> list[list[str]]:
    rows = []
    for s in summaries:
        notes = [f"{count}x {text}" for text, count in s.failures.items()]
        notes += s.errors + s.notes
        if s.latency_counted < s.latency_runs:
            notes.insert(0, f"p50/p99 from {s.latency_counted} of {s.latency_runs} timed runs")
        if s.runs and not s.counted:
            notes.insert(0, "FAILED")
        elif s.counted < s.runs:
            notes.insert(0, f"msg/s from {s.counted} of {s.runs} runs")
        rows.append([
            scenarios[s.scenario].label,
            TARGET_NAMES[s.target],
            _num(s.rate),
            f"{_num(s.rate_min)}-{_num(s.rate_max)}" if s.counted > 1 else "",
            _num(s.p50_ms),
            _num(s.p99_ms),
            _num(s.cpu_ms),
            _num(s.clamd_cpu_ms),
            _num(s.rss_mb),
            f"{s.accepted}/{s.attempted}",
            "; ".join(notes),
        ])
    return rows


def ratio_rows(summaries: Sequence[Summary], scenarios: Sequence[Scenario]) -> list[list[str]]:
    by_key = {(s.target, s.scenario): s for s in summaries}
    rows = []
    for scenario in scenarios:
        ours, c, clamd = (by_key.get((t, scenario.key)) for t in (OURS, C, CLAMD))
        if ours is None and c is None:
            continue

        def get(summary: Summary | None, attr: str) -> float | None:
            return getattr(summary, attr) if summary is not None else None

        rows.append([
            scenario.label,
            _ratio(get(ours, "rate"), get(c, "rate")),
            _ratio(get(ours, "rate"), get(clamd, "rate")),
            _ratio(get(c, "rate"), get(clamd, "rate")),
            _ratio(get(ours, "p50_ms"), get(c, "p50_ms")),
            _ratio(get(ours, "p99_ms"), get(c, "p99_ms")),
            _ratio(get(ours, "cpu_ms"), get(c, "cpu_ms")),
            _ratio(get(ours, "rss_mb"), get(c, "rss_mb")),
        ])
    return rows


def text_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(columns, *rows, strict=False)]
    numeric = [i for i, name in enumerate(columns) if name not in ("load", "target", "notes")]

    def line(cells: Sequence[str]) -> str:
        parts = [cell.rjust(w) if i in numeric else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(parts).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths])]
                     + [line(row) for row in rows])


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    numeric = {i for i, name in enumerate(columns) if name not in ("load", "target", "notes")}
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---:" if i in numeric else "---" for i in range(len(columns))) + "|"
    body = ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join([head, rule, *body])


@dataclass
class Report:
    started: str
    seconds: float
    mode: str
    machine: dict[str, str]
    plan: Plan
    runs: list[Run]
    summaries: list[Summary]

    @property
    def ok(self) -> bool:
        """Every run of ours and of the ceilings counted. The C clamsmtpd is the reference:
        what it loses is reported (result line, notes) but does not fail the benchmark."""
        mine = [s for s in self.summaries if s.target != C]
        return bool(self.summaries) and all(s.ok for s in mine)

    def result(self) -> str:
        lines = []
        for target in TARGETS:
            bad = [s for s in self.summaries if s.target == target and not s.ok]
            if not bad:
                continue
            lost = sum(s.attempted - s.accepted for s in bad)
            sent = sum(s.attempted for s in self.summaries if s.target == target)
            loads = ", ".join(self._label(s.scenario) for s in bad)
            lines.append(f"{TARGET_NAMES[target]}: {lost} of {sent} messages not accepted, "
                         f"or a run failed ({loads}; see notes)")
        if not lines:
            return "every message of every run accepted"
        return "; ".join(lines) + ("" if self.ok else "; the benchmark FAILED")

    def _label(self, key: str) -> str:
        return next(s.label for s in self.plan.scenarios if s.key == key)

    def _heading(self) -> list[str]:
        m = self.machine
        loads = ", ".join(
            f"{s.label}: {self.plan.messages[s.key]} msgs"
            + (f" + {self.plan.latency_messages[s.key]} timed" if self.plan.latency else "")
            + f" x {self.plan.rounds_of(s)} round(s)"
            for s in self.plan.scenarios)
        return [
            f"clamsmtpd benchmark, {self.started}, {self.mode} "
            f"({self.plan.rounds} round(s), {self.seconds:.0f} s)",
            f"machine: {m['nproc']} x {m['cpu']}, {m['memory']}, kernel {m['kernel']}, "
            f"Python {m['python']}",
            f"software: {m['clamd']}; C clamsmtpd: {m['C clamsmtpd']}; ours: {m['ours']}; "
            f"postfix {m['postfix (smtp-source, smtp-sink)']} (smtp-source, smtp-sink)",
            f"load per run: {loads}",
            f"background: {m.get('background', '?')}",
        ]

    def text(self) -> str:
        scenarios = {s.key: s for s in self.plan.scenarios}
        parts = self._heading() + [
            "",
            text_table(RESULT_COLUMNS, result_rows(self.summaries, scenarios)),
            "",
            text_table(RATIO_COLUMNS, ratio_rows(self.summaries, self.plan.scenarios)),
            "",
            "result: " + self.result(),
        ]
        return "\n".join(parts)

    def markdown(self) -> str:
        scenarios = {s.key: s for s in self.plan.scenarios}
        head = self._heading()
        parts = [
            f"## Results: {self.started}, {self.mode}",
            "",
            *[f"- {line}" for line in head[1:]],
            f"- total time {self.seconds:.0f} s",
            "",
            markdown_table(RESULT_COLUMNS, result_rows(self.summaries, scenarios)),
            "",
            markdown_table(RATIO_COLUMNS, ratio_rows(self.summaries, self.plan.scenarios)),
            "",
            f"Result: {self.result()}.",
            "",
        ]
        return "\n".join(parts)

    def as_json(self) -> dict:
        def run_dict(run: Run) -> dict:
            # not dataclasses.asdict: it would rebuild each Counter from (key, value) pairs
            d = {f.name: getattr(run, f.name) for f in dataclasses.fields(run)}
            d["failures"], d["latency_failures"] = dict(run.failures), dict(run.latency_failures)
            d["rate"] = run.rate
            d["counts"] = run.counts
            d["latencies"] = [round(x, 6) for x in run.latencies]
            return d

        return {
            "started": self.started,
            "seconds": self.seconds,
            "mode": self.mode,
            "machine": self.machine,
            "plan": dataclasses.asdict(self.plan),
            "summaries": [dataclasses.asdict(s) for s in self.summaries],
            "runs": [run_dict(r) for r in self.runs],
        }


# -- command line -----------------------------------------------------------------------------


def _csv(choices: Sequence[str], name: str):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {name} {', '.join(bad) or '(none)'} (choose from {', '.join(choices)})")
        return items

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m appliance.lab.bench",
        description="Benchmark this project's clamsmtpd against the C clamsmtpd on loopback: "
        "smtp-source load, smtp-sink next hop, a private clamd; plus the ceilings "
        "'direct' (smtp-source to smtp-sink) and 'clamd alone' (INSTREAM).",
    )
    parser.add_argument("--quick", action="store_true",
                        help="one round with fewer messages (under a minute)")
    parser.add_argument("--rounds", type=int,
                        help="rounds, proxies alternated (default 3, --quick 1)")
    parser.add_argument("--messages", type=int,
                        help="messages per smtp-source run, every load (default: per load)")
    parser.add_argument("--latency-messages", type=int,
                        help="messages per latency run, every load (default: per load)")
    parser.add_argument("--scenarios", type=_csv(SCENARIO_KEYS, "scenario"),
                        default=SCENARIO_KEYS, metavar="LIST",
                        help=f"loads to run, of {','.join(SCENARIO_KEYS)} (default: all)")
    parser.add_argument("--targets", type=_csv(TARGETS, "target"), default=TARGETS,
                        metavar="LIST",
                        help=f"what to measure, of {','.join(TARGETS)} (default: all)")
    parser.add_argument("--sessions", type=int,
                        help="parallel sessions, every load (default: 20, 10, 4, 4 per load)")
    parser.add_argument("--no-latency", action="store_true",
                        help="skip the latency client runs (p50/p99)")
    parser.add_argument("--keep-connection", action="store_true",
                        help="smtp-source -d: several messages per connection (default: one "
                        "connection per message); the latency client always connects per message")
    parser.add_argument("--timeout", type=float,
                        help="seconds allowed per run (default: 120 or 180 per load; "
                        "--quick: 20 or 60)")
    parser.add_argument("--markdown", metavar="FILE", help="also write the results as markdown")
    parser.add_argument("--json", metavar="FILE", help="also write every run as JSON")
    parser.add_argument("--workdir", metavar="DIR",
                        help="keep configs and logs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    for name in ("rounds", "messages", "latency_messages", "sessions"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.timeout is not None and args.timeout <= 0:
        parser.error("--timeout must be positive")
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    scenarios = tuple(dataclasses.replace(s, sessions=args.sessions or s.sessions)
                      for s in SCENARIOS if s.key in args.scenarios)
    messages, latency_messages, timeouts = {}, {}, {}
    for s in scenarios:
        default = s.quick if args.quick else (s.messages, s.latency_messages, s.timeout)
        messages[s.key] = args.messages or default[0]
        latency_messages[s.key] = args.latency_messages or args.messages or default[1]
        timeouts[s.key] = args.timeout or default[2]
    targets = tuple(t for t in TARGETS if t in args.targets)
    return Plan(scenarios, targets, args.rounds, messages, latency_messages, timeouts,
                latency=not args.no_latency, keep_connection=args.keep_connection)


def check_tools(plan: Plan) -> list[str]:
    problems = []
    needed = [tool("smtp-source"), tool("smtp-sink"), CLAMD_BINARY]
    if C in plan.targets:
        needed.append(C_DAEMON)
    for path in needed:
        if not os.access(path, os.X_OK):
            problems.append(f"{path} not found (scripts/setup installs postfix, clamav-daemon "
                            "and clamsmtp)")
    if os.geteuid() != 0:
        problems.append("run as root: smtp-sink needs it for -u, and the C clamsmtpd's clamd "
                        "must read its TempDirectory")
    return problems


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):
    raise _Stop(signal.Signals(signum).name)


def run_benchmark(args: argparse.Namespace, say=print) -> Report:
    """Everything but printing the report: start, measure, stop, summarize."""
    plan = make_plan(args)
    own_workdir = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="clamsmtp-bench-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    start = time.monotonic()
    busy0, own0, load0 = busy_cpu_seconds(), own_cpu_seconds(), load_average()
    try:
        machine = machine_info()
        runs = execute(plan, workdir, say)
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    seconds = time.monotonic() - start
    busy1, own1 = busy_cpu_seconds(), own_cpu_seconds()
    machine["background"] = "?"
    if busy0 is not None and busy1 is not None:
        other = max(0.0, (busy1 - busy0) - (own1 - own0))
        machine["background"] = (
            f"other processes used about {other:.1f} CPU s during the {seconds:.0f} s "
            f"({other / seconds * 100:.0f}% of one core); load average {load0} at the start, "
            f"{load_average()} at the end")
    summaries = [summarize(runs, t, s.key) for s in plan.scenarios for t in plan.targets
                 if any(r.target == t and r.scenario == s.key for r in runs)]
    mode = "quick run" if args.quick else "full run"
    if (args.messages or args.latency_messages or args.sessions or args.keep_connection
            or args.scenarios != SCENARIO_KEYS or args.targets != TARGETS):
        mode = "custom run"
    return Report(started, seconds, mode, machine, plan, runs, summaries)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    problems = check_tools(plan)
    if problems:
        for problem in problems:
            print(f"bench: {problem}", file=sys.stderr)
        return 2

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        report = run_benchmark(args, say)
    except (ClamdError, BenchError) as error:
        say(f"bench: could not start the lab: {error}")
        return 1
    except (KeyboardInterrupt, _Stop):
        say("bench: interrupted; everything it started is stopped")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(report.text(), flush=True)
    if args.markdown:
        Path(args.markdown).write_text(report.markdown())
        say(f"bench: markdown written to {args.markdown}")
    if args.json:
        Path(args.json).write_text(json.dumps(report.as_json(), indent=1) + "\n")
        say(f"bench: JSON written to {args.json}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
