"""Server lifecycle: bind, serve, refuse past MaxConnections, drain on stop.

Binding is separate from serving (as aiohttp's SockSite), so the CLI can bind while still root,
then detach and drop privileges, and tests can hand in a socket of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat
from typing import cast

from . import metrics, process
from .actions import VirusActions
from .addresses import Address
from .config import RESTART_ONLY, Config, Transparency
from .config import replace as _replace
from .containment import InfectedHosts
from .maillog import log
from .nexthop import destination_for
from .relay import RelayContext, RelaySession
from .replies import REPLY_BUSY
from .scanner import Scanner
from .shared import SharedInfectedHosts, WorkerState
from .spool import MEMORY_LIMIT, check_directory
from .tls import TLSContexts
from .tls import load as load_tls
from .upstream import OwnConnections, set_transparent

_BUSY = (REPLY_BUSY + "\r\n").encode()
#: The original's listen backlog was 5; a burst of clients deserves a real queue.
BACKLOG = 128
#: Scans run at most this many at once (clamd's default MaxThreads is 10).
MAX_CONCURRENT_SCANS = 8
#: At shutdown, VirusAction scripts still running after this are killed.
ACTIONS_GRACE = 3.0
#: How long the start-up check waits for clamd's PONG. Only a warning hangs on it, so it need
#: not wait TimeOut (a socket-activated clamd still loading its database can take minutes).
CLAMD_CHECK_TIMEOUT = 5.0


class BindError(Exception):
    """The listen address could not be bound; the message says which directive to change."""


def bind(address: Address, directive: str = "Listen", transparent: bool = False) -> socket.socket:
    """Create the listening socket for `Listen` (TCP v4/v6 or a unix path).

    `transparent` (TransparentProxy: full): IP_TRANSPARENT, so that the firewall's TPROXY rules
    can hand it connections addressed to other hosts (root or CAP_NET_ADMIN, as at bind time).
    """
    if transparent and address.is_unix:
        raise BindError(f"couldn't listen on {address}: TransparentProxy: full needs a TCP "
                        f"Listen address (check the {directive} directive)")
    try:
        if address.is_unix:
            path = address.path
            assert path is not None
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)  # a stale socket from an earlier run, as the original does
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(path)
        elif address.port_only:
            assert address.port is not None  # Address: every TCP address has a port
            sock = _bind_any(address.port, transparent)
        else:
            infos = socket.getaddrinfo(
                address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, _, _, _, sockaddr = infos[0]
            sock = _tcp_socket(family, transparent)
            sock.bind(sockaddr)
        sock.listen(BACKLOG)
    except OSError as e:
        raise BindError(
            f"couldn't listen on {address}: {e.strerror or e} (check the {directive} directive)"
        ) from None
    sock.setblocking(False)
    return sock


def _tcp_socket(family: int, transparent: bool = False) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if transparent:
        try:
            set_transparent(sock)
        except OSError as e:
            sock.close()
            raise BindError(f"TransparentProxy: full needs CAP_NET_ADMIN for IP_TRANSPARENT: "
                            f"{e.strerror or e} (start clamsmtpd as root, or give it "
                            "AmbientCapabilities=CAP_NET_ADMIN)") from None
    if family == socket.AF_INET6:
        # "[::]:port" takes IPv4 clients too (as ::ffff:a.b.c.d), as users of one Listen expect
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    return sock


def _bind_any(port: int, transparent: bool = False) -> socket.socket:
    """A bare port means every address: both families where the host has IPv6, else IPv4."""
    if socket.has_ipv6:
        sock = _tcp_socket(socket.AF_INET6, transparent)
        try:
            sock.bind(("::", port))
            return sock
        except OSError as e:
            sock.close()
            if e.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                raise
    sock = _tcp_socket(socket.AF_INET, transparent)
    sock.bind(("0.0.0.0", port))
    return sock


class _Busy(asyncio.Protocol):
    """Past MaxConnections: say so and close, as the original (no queueing)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        log.error("too many connections open (max %d). sent busy response", self.limit)
        # (a stream socket's transport: asyncio.Protocol's signature names the base class)
        cast(asyncio.Transport, transport).write(_BUSY)
        transport.close()


class Appliance:
    """The running proxy: one listener, the shared scanner, the live sessions."""

    def __init__(
        self, config: Config, sock: socket.socket, metrics_sock: socket.socket | None = None,
        tls: TLSContexts | None = None, worker: WorkerState | None = None,
    ) -> None:
        """`tls`: the contexts loaded from `config` (by the CLI, before the privilege drop);
        None loads them here. `worker`: this process is one of several (`Workers`), and this
        is its handle on what the daemon keeps one of (appliance/shared.py)."""
        self.sock = sock
        self.metrics_sock = metrics_sock
        self.worker = worker
        self._metrics_server: asyncio.AbstractServer | None = None
        self.sessions: set[RelaySession] = set() if worker is None else worker.sessions()
        # shared by every configuration
        self.outgoing = OwnConnections() if worker is None else worker.own_connections()
        self.actions = VirusActions(config.virus_action)  # one across reloads: stop() sees all
        # one across reloads; empty at every start; with workers, told of the others' news
        self.infected = InfectedHosts() if worker is None else worker.infected_hosts()
        self.context = self._context(config, tls=tls if tls is not None else load_tls(config))
        self._server: asyncio.AbstractServer | None = None
        self._clamd_check: asyncio.Task[None] | None = None

    @property
    def config(self) -> Config:
        return self.context.config

    def _context(
        self, config: Config, previous: RelayContext | None = None, *, tls: TLSContexts
    ) -> RelayContext:
        concurrency = min(config.max_connections, MAX_CONCURRENT_SCANS)
        if self.worker is not None:  # the daemon's scans per clamd, shared out (at least 1)
            concurrency = max(1, concurrency // self.worker.state.workers)
        old = previous.scanner if previous is not None else None
        settings = (config.clam_addresses, config.timeout, config.scan_timeout, concurrency)
        if old is not None and settings == (
            old.addresses, old.timeout, old.scan_timeout, old.concurrency
        ):
            scanner = old  # and the health of its clamds
        else:
            if old is not None:
                # A replaced scanner is not shut down: sessions in flight keep using it, and
                # its idle threads go when the last of them lets go of it.
                old.retire()
            # with Workers, the clamds' health is the daemon's (shared.py), not this worker's
            health = self.worker.clamd_health if self.worker is not None else None
            scanner = Scanner(*settings, health=health)
        sock = self.sock
        ports = frozenset({sock.getsockname()[1]}) if sock.family != socket.AF_UNIX else frozenset()
        self.actions.command = config.virus_action
        self.infected.configure(config.infected_host_limit, config.infected_host_block)
        return RelayContext(
            config, scanner, destination_for(config, ports), self.actions, tls=tls,
            sessions=self.sessions, outgoing=self.outgoing, infected=self.infected,
        )

    def reload(self, config: Config, tls: TLSContexts | None = None) -> list[str]:
        """Take over a new configuration for new connections; sessions in flight keep theirs.
        `tls`: its TLS contexts (certificate and key read again), None loads them here.

        Returns the directives that changed but need a restart (they keep their old value).
        """
        old = self.context
        pending = [name for field, name in RESTART_ONLY.items()
                   if getattr(config, field) != getattr(old.config, field)]
        keep = {field: getattr(old.config, field) for field in RESTART_ONLY}
        full = Transparency.FULL
        if (config.transparent_proxy is full) != (old.config.transparent_proxy is full):
            # to or from full: the listener's IP_TRANSPARENT and the kept CAP_NET_ADMIN are
            # set at start-up; off <-> on takes effect at once
            pending.append("TransparentProxy")
            keep["transparent_proxy"] = old.config.transparent_proxy
            if config.out_address is None:  # off -> full: the old OutAddress stays in use
                keep["out_address"] = old.config.out_address
        config = _replace(config, **keep)
        self.context = self._context(
            config, old, tls=tls if tls is not None else load_tls(config)
        )
        self.check_temp_directory()
        if self.context.scanner is not old.scanner and self._server is not None:
            self.check_clamd()
        return pending

    def check_temp_directory(self) -> None:
        """Small bodies never touch TempDirectory, so a broken one is named now, at start-up
        and on reload, rather than when the first big message finds it."""
        problem = check_directory(self.config.temp_directory)
        if problem and (self.worker is None or self.worker.index == 0):  # (one line a daemon)
            log.warning("TempDirectory %s is not usable (%s): messages over %d KB will be "
                        "deferred (451) until it is", self.config.temp_directory, problem,
                        MEMORY_LIMIT // 1024)

    def _protocol(self) -> asyncio.Protocol:
        limit = self.config.max_connections
        if self.worker is None:
            if len(self.sessions) >= limit:
                metrics.CONNECTIONS_BUSY.inc()
                return _Busy(limit)
            return RelaySession(self.context).channel
        if not self.worker.claim(limit):  # MaxConnections counts every worker's sessions
            metrics.CONNECTIONS_BUSY.inc()
            return _Busy(limit)
        try:
            return RelaySession(self.context).channel
        except BaseException:
            self.worker.release()
            raise

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.sock.family == socket.AF_UNIX:
            self._server = await loop.create_unix_server(self._protocol, sock=self.sock)
        else:
            self._server = await loop.create_server(self._protocol, sock=self.sock)
        speaks = self.worker is None or self.worker.index == 0  # (one line a daemon)
        if speaks:
            log.info("listening on %s", _describe(self.sock))
        if isinstance(self.infected, SharedInfectedHosts):
            self.infected.start()
        if self.metrics_sock is not None:
            self._metrics_server = await metrics.serve(self.metrics_sock)
            if speaks:
                log.info("metrics on http://%s/metrics", _describe(self.metrics_sock))
        self.check_temp_directory()
        self.check_clamd()
        process.settle_memory()  # (start-up is done: docs/performance.md, CPU per message)

    def check_clamd(self) -> None:
        """Warn if clamd does not answer, at start-up and when a reload changes ClamAddress.

        In the background: start-up (and the `clamsmtpd` command, which returns once it is
        done) must not wait on a clamd that is slow to answer; mail is served meanwhile.
        """
        if self._clamd_check is not None:
            self._clamd_check.cancel()
        self._clamd_check = asyncio.get_running_loop().create_task(
            self._check_clamd(self.context.scanner)
        )

    async def _check_clamd(self, scanner: Scanner) -> None:
        if self.worker is not None and self.worker.index != 0:
            return  # with Workers, worker 0 checks for the daemon: one warning, not one each
        silent = await scanner.check(min(scanner.timeout, CLAMD_CHECK_TIMEOUT))
        if len(silent) == len(scanner.addresses):
            log.warning("clamd is not answering at %s: mail will be deferred (451) until it does",
                        ", ".join(silent))
        elif silent:
            log.warning("clamd is not answering at %s: scans go to the other clamds until it does",
                        ", ".join(silent))

    async def stop(self, grace: float) -> None:
        """Stop accepting; idle sessions get a 421 now, a message in hand may finish within
        `grace` seconds (then its client gets a 421 too); whatever is left is cut."""
        if self._server is not None:
            self._server.close()
        if self._clamd_check is not None:
            self._clamd_check.cancel()
        if isinstance(self.infected, SharedInfectedHosts):
            self.infected.stop()
        metrics.close(self._metrics_server)
        self.context.stopping = True
        for session in list(self.sessions):
            session.context.stopping = True
            session.shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.sessions and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.abort()
        await self.actions.stop(timeout=ACTIONS_GRACE)
        await asyncio.sleep(0)
        self.context.scanner.close()


def _describe(sock: socket.socket) -> str:
    name = sock.getsockname()
    if isinstance(name, str):
        return name
    host, port = name[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
