"""Prometheus metrics (opt-in with `MetricsListen:`), in the text format, via prometheus-client.

The counters live here as module objects, like a logger: the relay counts, this module serves.
The endpoint is a few lines of asyncio on a socket bound with the SMTP listener (before the
privilege drop and the fork), not prometheus-client's threaded server, which would not survive
the fork into the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics import MetricWrapperBase

REGISTRY = CollectorRegistry(auto_describe=True)

# The metrics, made by _define: once at import, and again in a worker of a daemon with
# Workers > 1, after prometheus-client has been switched to its multiprocess values.
CONNECTIONS: Counter
CONNECTIONS_BUSY: Counter
ACTIVE: Gauge
MESSAGES: Counter
SCAN_SECONDS: Histogram
UNSCANNED: Counter
ALLOWED: Counter
CLAMD_UP: Gauge
CLAMD_SCANS: Counter
INFECTED_HOSTS_BLOCKED: Gauge
INFECTED_HOST_BLOCKS: Counter
CONNECTIONS_BLOCKED: Counter
NEXT_HOP_ERRORS: Counter
TLS_SESSIONS: Counter
TLS_HANDSHAKE_FAILURES: Counter


CLAMD_UP_NAME = "clamsmtpd_clamd_up"
CLAMD_UP_HELP = "1 while this clamd is in the scanning pool, 0 while it is out"


def _define(registry: CollectorRegistry) -> None:
    """Make every metric: module names, as a logger; callers read `metrics.NAME` as they count."""
    global CONNECTIONS, CONNECTIONS_BUSY, ACTIVE, MESSAGES, SCAN_SECONDS, UNSCANNED, ALLOWED
    global CLAMD_UP, CLAMD_SCANS, INFECTED_HOSTS_BLOCKED, INFECTED_HOST_BLOCKS
    global CONNECTIONS_BLOCKED, NEXT_HOP_ERRORS, TLS_SESSIONS, TLS_HANDSHAKE_FAILURES

    CONNECTIONS = Counter(
        "clamsmtpd_connections", "SMTP connections accepted", registry=registry
    )
    CONNECTIONS_BUSY = Counter(
        "clamsmtpd_connections_refused_busy",
        "Connections refused with 421 because MaxConnections were open", registry=registry,
    )
    ACTIVE = Gauge("clamsmtpd_connections_active", "SMTP sessions open now", registry=registry,
                   multiprocess_mode="livesum")
    MESSAGES = Counter(
        "clamsmtpd_messages",
        "Messages by scan result (clean, virus, error, oversize: too big to scan)", ["status"],
        registry=registry,
    )
    SCAN_SECONDS = Histogram(
        "clamsmtpd_scan_seconds", "Time clamd took per message (INSTREAM)", registry=registry,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    )
    UNSCANNED = Counter(
        "clamsmtpd_messages_unscanned",
        "Messages passed on without a scan, by reason (error, size, network, authenticated, tls)",
        ["reason"], registry=registry,
    )
    ALLOWED = Counter(
        "clamsmtpd_messages_allowed",
        "Infected messages delivered because their virus name matched VirusAllow",
        registry=registry,
    )
    CLAMD_UP = Gauge(
        CLAMD_UP_NAME, CLAMD_UP_HELP, ["clamd"], registry=registry, multiprocess_mode="livemin",
    )
    CLAMD_SCANS = Counter(
        "clamsmtpd_clamd_scans",
        "Scan attempts per clamd, by outcome (clean, virus, error: clamd refused the message, "
        "failed: clamd itself failed and the scan went to another clamd or got a 451)",
        ["clamd", "outcome"], registry=registry,
    )
    INFECTED_HOSTS_BLOCKED = Gauge(
        "clamsmtpd_infected_hosts_blocked", "Client addresses blocked now (InfectedHostLimit)",
        registry=registry, multiprocess_mode="livemax",
    )
    INFECTED_HOST_BLOCKS = Counter(
        "clamsmtpd_infected_host_blocks", "Blocks started by InfectedHostLimit", registry=registry,
    )
    CONNECTIONS_BLOCKED = Counter(
        "clamsmtpd_connections_refused_infected",
        "Connections refused with 421 because the client's address is blocked (InfectedHostLimit)",
        registry=registry,
    )
    NEXT_HOP_ERRORS = Counter(
        "clamsmtpd_next_hop_errors",
        "Failures talking to the next hop, by stage (connect, session, tls)", ["stage"],
        registry=registry,
    )

    TLS_SESSIONS = Counter(
        "clamsmtpd_tls_sessions",
        "Sessions by leg (client, next_hop) and how that leg ran (tls, clear, passthrough)",
        ["leg", "mode"], registry=registry,
    )
    TLS_HANDSHAKE_FAILURES = Counter(
        "clamsmtpd_tls_handshake_failures", "TLS handshakes that failed, by leg (client, next_hop)",
        ["leg"], registry=registry,
    )

    for _status in ("clean", "virus", "error", "oversize"):
        MESSAGES.labels(_status)
    for _reason in ("error", "size", "network", "authenticated", "tls"):
        UNSCANNED.labels(_reason)
    for _stage in ("connect", "session", "tls"):
        NEXT_HOP_ERRORS.labels(_stage)
    for _leg in ("client", "next_hop"):
        TLS_HANDSHAKE_FAILURES.labels(_leg)
        for _mode in ("tls", "clear", "passthrough"):
            TLS_SESSIONS.labels(_leg, _mode)


_define(REGISTRY)

_children: dict[tuple[MetricWrapperBase, tuple[str, ...]], Any] = {}
_M = TypeVar("_M", bound=MetricWrapperBase)


def child(metric: _M, *labels: str) -> _M:
    """`metric.labels(*labels)`, looked up once: labels() takes a lock and checks its arguments
    on every call, and the relay counts several per message."""
    key = (metric, labels)
    found: _M | None = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labels)
    return found


MAX_REQUEST = 8192
#: Seconds a scraper has to read the end of its answer after the endpoint closed.
CLOSE_GRACE = 10.0

#: What the endpoint shows: this process's registry, or every worker's (share_between_processes)
_served: CollectorRegistry = REGISTRY
#: share_between_processes ran: values live in files, and a label set cannot be removed
_shared = False


def forget(metric: MetricWrapperBase, *labels: str) -> None:
    """Drop one label set (a clamd a reload took out of the pool). prometheus-client cannot do
    that in multiprocess mode (it warns on stderr): there the label set stays at its last value
    in this worker's file until the worker ends."""
    _children.pop((metric, labels), None)
    if not _shared:
        with contextlib.suppress(KeyError):
            metric.remove(*labels)


class _SharedClamdUp:
    """clamd_up with Workers: read at each scrape from the daemon's one view of the clamds
    (shared.DaemonState.clamd_health), not from the workers' files: a worker that never saw a
    clamd fail has nothing to say about it."""

    def __init__(self, read: Callable[[], Iterable[tuple[str, bool]]]) -> None:
        self.read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(CLAMD_UP_NAME, CLAMD_UP_HELP, labels=["clamd"])
        for name, up in self.read():
            family.add_metric([name], 1 if up else 0)
        yield family


def share_between_processes(
    directory: str, clamd_up: Callable[[], Iterable[tuple[str, bool]]] | None = None,
) -> None:
    """In a worker of a daemon with `Workers` > 1, before it counts anything: keep the values in
    `directory` (prometheus-client's multiprocess mode, one file per worker), and serve the sum
    over every worker's files, so that whichever worker answers the scrape shows the daemon.

    Counters and histograms add up; of the gauges, the open sessions add up (live workers
    only), and the blocked hosts the highest (every worker holds the same daemon-wide blocks).
    `clamd_up`: the daemon's (name, up) for each clamd, which the pool no longer writes in the
    files (scanner.Health.shared). The metrics made at import, in the one-process way, are
    made again (_define).
    """
    global _served, _shared
    _shared = True
    _children.clear()  # (children of the one-process metrics, made again below)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    # What prometheus-client does at import when that variable is set; here it is set later,
    # in the worker, so the metrics are made again with the multiprocess values (public API
    # only: a new set of metrics on a registry of their own, not the old ones' insides).
    # Its values ask os.getpid() on every change, to notice a fork (a system call each: about
    # 20 per message). A worker never forks a Python child (VirusAction is fork + exec), so
    # its pid, read once here, after the fork, is the one.
    pid = os.getpid()
    values.ValueClass = values.MultiProcessValue(lambda: pid)  # type: ignore[no-untyped-call]
    _define(CollectorRegistry(auto_describe=True))
    _served = CollectorRegistry()
    multiprocess.MultiProcessCollector(_served, path=directory)  # type: ignore[no-untyped-call]
    if clamd_up is not None:
        _served.register(_SharedClamdUp(clamd_up))


def process_dead(directory: str, pid: int) -> None:
    """A worker is gone (parent): its live gauges no longer count; its counters stay."""
    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer any GET with the metrics; anything else with 405. One request per connection."""
    try:
        async with asyncio.timeout(10):
            request = await reader.readuntil(b"\r\n\r\n")
        if len(request) > MAX_REQUEST:
            raise ValueError("request too large")
        if request.startswith(b"GET "):
            body = generate_latest(_served)
            head = f"HTTP/1.0 200 OK\r\nContent-Type: {CONTENT_TYPE_LATEST}\r\n"
        else:
            body = b"only GET\n"
            head = "HTTP/1.0 405 Method Not Allowed\r\nContent-Type: text/plain\r\n"
        head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        writer.write(head.encode() + body)
        async with asyncio.timeout(10):
            await writer.drain()
    except (TimeoutError, OSError, ValueError, asyncio.IncompleteReadError,
            asyncio.LimitOverrunError):
        pass
    finally:
        # A polite close waits until the scraper has read the rest of the body: one that never
        # does would keep its connection (and the body) for good. It gets 10 s, then is cut.
        writer.close()
        asyncio.get_running_loop().call_later(CLOSE_GRACE, writer.transport.abort)


async def serve(sock: socket.socket) -> asyncio.AbstractServer:
    """Serve the metrics on an already bound, listening socket."""
    return await asyncio.start_server(_handle, sock=sock, limit=MAX_REQUEST)


def close(server: asyncio.AbstractServer | None) -> None:
    if server is not None:
        with contextlib.suppress(Exception):
            server.close()
