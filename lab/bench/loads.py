"""The loads, each bounded by timeouts: smtp-source (throughput), the asyncio latency client
(DATA to 250 per message) and "clamd alone" (INSTREAM scans from threads)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..clamd import read_clamd_reply
from .tools import tool
from .workload import HELO_NAME, HOST, RECIPIENT, SENDER, message_header, message_timeout

#: INSTREAM chunk size of the "clamd alone" client (the same as appliance/scanner.py's).
CHUNK = 1 << 18


# -- load: smtp-source ------------------------------------------------------------------------

_DIAGNOSTIC = re.compile(r"^\S*smtp-source: (warning|fatal): (.*)$")


@dataclass
class SourceResult:
    seconds: float
    completed: int
    failures: Counter
    error: str | None
    hung: bool = False  # stopped: timed out or stalled (a server that stopped answering)


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
    hung = error is not None
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
    return SourceResult(seconds, completed, failures, error, hung)


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
    hung: bool = False  # stopped at the run's deadline


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
    return LoadResult(latencies, len(latencies), failures, error, seconds, expired)


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
        return read_clamd_reply(sock)


def run_clamd_alone(socket_path: str, body: bytes, messages: int, sessions: int,
                    timeout: float) -> LoadResult:
    """`messages` INSTREAM scans of messages with `body` from `sessions` threads. A scan
    without a reply within message_timeout() is a failure of that message; only the run's
    deadline (`timeout`) ends the run."""
    latencies: list[float] = []
    failures: Counter = Counter()
    lock = threading.Lock()
    todo = iter(range(messages))
    deadline = time.monotonic() + timeout
    patience = message_timeout(len(body))
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
            limit = min(left, patience)
            start = time.perf_counter()
            try:
                reply = instream(socket_path, (message_header(), body), limit)
            except TimeoutError:
                if limit == left:  # bounded by the run's deadline, which has now passed
                    expired.set()
                    return
                with lock:
                    failures[f"no reply within {patience:.0f} s"] += 1
                continue
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
    return LoadResult(latencies, len(latencies), failures, error, seconds, expired.is_set())
