"""clamd through pyclamd's INSTREAM: clamd needs no access to our files, and may be remote.

pyclamd is blocking, so every scan runs in a small thread pool (its size is the bound on
concurrent scans) and the event loop never waits on clamd. Problems come back as a value
(`ScanResult` with status ERROR), never as an exception: the verdict turns them into a 451.

Two pyclamd 0.4.0 flaws are mended here, by subclassing rather than by copying the library:
it writes with `socket.send` (a partial write would corrupt INSTREAM's length-prefixed chunks on
a large body), and it retries a timed-out read five times (five TimeOuts instead of one). Its
network class is also IPv4-only; ours connects by `socket.create_connection`.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

import pyclamd

from .addresses import Address
from .spool import Spool

CLEAN, VIRUS, ERROR = "CLEAN", "VIRUS", "ERROR"
#: Too big to scan: clamd refused it (over its StreamMaxLength), or it is over MaxScanSize.
OVERSIZE = "OVERSIZE"
#: clamd accepts INSTREAM chunks up to StreamMaxLength; 256 KiB keeps syscalls few and memory low.
CHUNK = 1 << 18


@dataclass(frozen=True, slots=True)
class ScanResult:
    status: str  # CLEAN | VIRUS | ERROR | OVERSIZE (ERROR: the scan could not be done)
    virus: str | None = None  # the signature name, for VIRUS
    detail: str = ""  # what clamd (or the connection) said, for ERROR

    @property
    def log_status(self) -> str:
        """The `status=` value of the original's log line."""
        if self.status == VIRUS:
            return f"VIRUS:{self.virus}" if self.virus else "VIRUS"
        return CLEAN if self.status == CLEAN else "CLAMAV-ERROR"


class _SendallSocket(socket.socket):
    """A socket whose `send` writes everything, as INSTREAM's framing needs.

    When clamd hangs up in the middle (a body over its StreamMaxLength), the rest of the body is
    dropped instead of failing, so pyclamd goes on to read clamd's reason (`INSTREAM size limit
    exceeded`) rather than reporting a bare broken pipe.
    """

    hung_up = False

    def send(self, data, flags: int = 0) -> int:  # type: ignore[override]
        if not self.hung_up:
            try:
                self.sendall(data, flags)
            except (BrokenPipeError, ConnectionResetError):
                self.hung_up = True
        return len(data)


class _Mended:
    """Mixin over pyclamd's socket classes: full writes, one timeout, IPv6-capable TCP, and
    every reply line kept, so that only clamd's explicit `stream: OK` counts as clean."""

    timeout: float | None
    clamd_socket: socket.socket
    replies: list[str]

    def _recv_response(self) -> str:
        data = self.clamd_socket.recv(4096)
        reply = data.decode("utf-8", "replace").strip()
        if reply:
            self.__dict__.setdefault("replies", []).append(reply)
        return reply

    def close(self) -> None:
        sock = getattr(self, "clamd_socket", None)
        if sock is not None:
            sock.close()


class _Unix(_Mended, pyclamd.ClamdUnixSocket):
    def _init_socket(self) -> None:
        self.clamd_socket = _SendallSocket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.clamd_socket.settimeout(self.timeout)
        try:
            self.clamd_socket.connect(self.unix_socket)
        except OSError as e:
            self.clamd_socket.close()
            raise pyclamd.ConnectionError(
                f"could not reach clamd at {self.unix_socket}: {e.strerror or e}"
            ) from None


class _Tcp(_Mended, pyclamd.ClamdNetworkSocket):
    def _init_socket(self) -> None:
        try:
            plain = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as e:
            raise pyclamd.ConnectionError(
                f"could not reach clamd at {self.host}:{self.port}: {e.strerror or e}"
            ) from None
        self.clamd_socket = _SendallSocket(plain.family, plain.type, plain.proto, plain.detach())
        self.clamd_socket.settimeout(self.timeout)


class Scanner:
    """Scans spooled messages (in memory or on disk) with clamd, at most `concurrency` at a time."""

    def __init__(self, address: Address, timeout: float, concurrency: int) -> None:
        self.address = address
        self.timeout = timeout
        self.concurrency = concurrency
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="clamd")
        self._local = threading.local()

    def _client(self) -> pyclamd.pyclamd._ClamdGeneric:
        """This thread's pyclamd client (its constructor probes clamd, so make it once)."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._new_client(self.timeout)
        return client

    def _new_client(self, timeout: float) -> _Unix | _Tcp:
        if self.address.is_unix:
            return _Unix(self.address.path, timeout)
        return _Tcp(self.address.host, self.address.port, timeout)

    def _scan_blocking(self, spool: Spool) -> ScanResult:
        try:
            with spool.open() as body:
                return self._scan_file(body)
        except OSError as e:
            return ScanResult(ERROR, detail=f"cannot read spool file: {e.strerror or e}")

    def _scan_file(self, body: BinaryIO) -> ScanResult:
        client = None
        try:
            client = self._client()
            client.replies = []
            found = client.scan_stream(body, chunk_size=CHUNK)
        except pyclamd.BufferTooLongError as e:
            detail = f"{e} (raise StreamMaxLength in clamd.conf, or set MaxScanSize below it)"
            return ScanResult(OVERSIZE, detail=detail)
        except pyclamd.ConnectionError as e:
            return ScanResult(ERROR, detail=str(e))
        except TimeoutError:
            return ScanResult(ERROR, detail="clamd timed out")
        except OSError as e:
            return ScanResult(ERROR, detail=f"clamd connection failed: {e.strerror or e}")
        except (IndexError, ValueError) as e:  # pyclamd's parser on a reply it does not know
            return ScanResult(ERROR, detail=f"unexpected response from clamd: {e}")
        finally:
            if client is not None:
                client.close()  # pyclamd leaves it open when a scan fails
        if not found:
            # pyclamd returns None both for "stream: OK" and for a reply it does not know (or
            # none at all, when clamd died): only the explicit OK is clean, never the silence.
            if client.replies and all(r == "stream: OK" for r in client.replies):
                return ScanResult(CLEAN)
            said = " / ".join(client.replies)[:200] or "nothing (connection closed)"
            return ScanResult(ERROR, detail=f"unexpected response from clamd: {said}")
        status, reason = next(iter(found.values()))
        if status == "FOUND":
            return ScanResult(VIRUS, virus=reason.strip() or None)
        return ScanResult(ERROR, detail=reason)

    async def scan(self, spool: Spool) -> ScanResult:
        loop = asyncio.get_running_loop()
        try:
            # The socket timeouts bound each clamd operation; this bounds the whole scan (a clamd
            # that trickles bytes slower than TimeOut apart could otherwise hold us forever).
            async with asyncio.timeout(self.timeout * 2 + 5):
                return await loop.run_in_executor(self._pool, self._scan_blocking, spool)
        except TimeoutError:
            return ScanResult(ERROR, detail="clamd scan timed out")

    def ping(self, timeout: float | None = None) -> bool:
        """Whether clamd answers PING within `timeout` (default TimeOut)."""
        client = None
        try:
            client = self._new_client(self.timeout if timeout is None else timeout)
            return bool(client.ping())
        except (pyclamd.ConnectionError, OSError):
            return False
        finally:
            if client is not None:
                client.close()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
