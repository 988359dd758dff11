"""One scan on one clamd: pyclamd's INSTREAM, blocking, bounded by TimeOut and ScanTimeout.

The pool of clamds (which one, failover, health) is `scanner.py`; this module only knows how to
talk to one clamd and what its answer means. It runs on a scanner thread, never on the loop.

Problems come back as a value (`ScanResult` with status ERROR), never as an exception, with
`clamd_failed` saying whether clamd itself misbehaved (so another clamd may do better) or the
message could not be scanned anywhere (clamd's own ERROR reply; OVERSIZE, a body over
StreamMaxLength).

pyclamd 0.4.0's flaws are mended here, by subclassing rather than by copying the library: it
writes with `socket.send` (a partial write would corrupt INSTREAM's length-prefixed chunks on a
large body); it retries a timed-out read five times (five TimeOuts instead of one); it takes
each `recv` for a whole reply line (a reply split over two TCP segments, which a clamd on
another host can send, was misread); its network class is IPv4-only.
"""

from __future__ import annotations

import enum
import socket
import time
from dataclasses import dataclass
from typing import BinaryIO

import pyclamd

from .addresses import Address


class ScanStatus(enum.StrEnum):
    """What one scan found (the verdict's input; the log's `status=` is made from it)."""

    CLEAN = "CLEAN"
    VIRUS = "VIRUS"
    ERROR = "ERROR"  # the scan could not be done
    #: Too big to scan: clamd refused it (over its StreamMaxLength), or it is over MaxScanSize.
    OVERSIZE = "OVERSIZE"


CLEAN, VIRUS, ERROR, OVERSIZE = (
    ScanStatus.CLEAN, ScanStatus.VIRUS, ScanStatus.ERROR, ScanStatus.OVERSIZE)
#: clamd accepts INSTREAM chunks up to StreamMaxLength; 256 KiB keeps syscalls few and memory low.
CHUNK = 1 << 18
#: A reply line longer than this is not clamd's (its longest is a path plus a signature name).
MAX_REPLY = 4096


@dataclass(frozen=True, slots=True)
class ScanResult:
    """What came of scanning one message.

    status ERROR is "the scan could not be done" (no clamd answered, or one answered garbage,
    or ScanTimeout passed, or clamd's own ERROR for it); OVERSIZE is "too big to scan". Neither
    is ever clean, nor a virus.
    """

    status: ScanStatus
    virus: str | None = None  # the signature name, for VIRUS
    detail: str = ""  # what clamd (or the connection) said, for ERROR and OVERSIZE
    clamd: str = ""  # the clamd that gave this result (or failed last), for logs

    @property
    def log_status(self) -> str:
        """The `status=` value of the original's log line."""
        if self.status == VIRUS:
            return f"VIRUS:{self.virus}" if self.virus else "VIRUS"
        return CLEAN if self.status == CLEAN else "CLAMAV-ERROR"


@dataclass(frozen=True, slots=True)
class Outcome:
    """A scan attempt on one clamd: its result, and whether clamd itself failed."""

    result: ScanResult
    clamd_failed: bool = False  # refused, timed out, hung up, answered garbage
    sent: bool = True  # False: clamd could not even be reached (nothing was sent)


class _DeadlineSocket(socket.socket):
    """A socket whose `send` writes everything, as INSTREAM's framing needs, and whose every
    operation waits at most TimeOut and never past the scan's deadline.

    When clamd hangs up in the middle (a body over its StreamMaxLength), the rest of the body is
    dropped instead of failing, so pyclamd goes on to read clamd's reason (`INSTREAM size limit
    exceeded`) rather than reporting a bare broken pipe.
    """

    hung_up = False
    op_timeout: float | None = None
    deadline: float | None = None  # time.monotonic() value
    last_error: OSError | None = None  # pyclamd rewords errors as "Unable to scan stream"

    def _bound(self) -> None:
        timeout = self.op_timeout
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("scan deadline passed")
            timeout = left if timeout is None else min(timeout, left)
        if timeout != self.gettimeout():  # settimeout is a system call (fcntl) each time
            self.settimeout(timeout)

    # (socket.send takes any buffer; pyclamd sends bytes only, and len() needs a sized one)
    def send(self, data: bytes, flags: int = 0) -> int:  # type: ignore[override]
        if not self.hung_up:
            try:
                self._bound()
                self.sendall(data, flags)
            except (BrokenPipeError, ConnectionResetError):
                self.hung_up = True
            except OSError as e:
                self.last_error = e
                raise
        return len(data)

    def recv(self, size: int, flags: int = 0) -> bytes:
        try:
            self._bound()
            return super().recv(size, flags)
        except OSError as e:
            self.last_error = e
            raise


class _Unreachable(pyclamd.ConnectionError):
    """clamd could not be connected to: nothing was sent."""


class _Mended:
    """Mixin over pyclamd's socket classes: full writes, one timeout, a deadline, IPv6-capable
    TCP, whole reply lines, and every reply line kept, so that only clamd's explicit
    `stream: OK` counts as clean."""

    timeout: float | None
    clamd_socket: _DeadlineSocket
    deadline: float | None = None
    replies: list[str]
    unreachable: _Unreachable | None = None
    _pending: bytearray

    def _connect(self) -> _DeadlineSocket:
        raise NotImplementedError

    def _init_socket(self) -> None:
        self.replies, self._pending, self.unreachable = [], bytearray(), None
        try:
            self.clamd_socket = self._connect()
        except _Unreachable as e:
            self.unreachable = e  # pyclamd rewords it as "Unable to scan stream"
            raise
        self.clamd_socket.op_timeout = self.timeout
        self.clamd_socket.deadline = self.deadline

    def _connect_timeout(self) -> float | None:
        if self.deadline is None:
            return self.timeout
        left = max(self.deadline - time.monotonic(), 0.001)
        return left if self.timeout is None else min(self.timeout, left)

    def _recv_response(self) -> str:
        """One reply line (up to LF or NUL), "" once clamd has closed; blank lines skipped."""
        pending = self._pending
        while True:
            ends = [i for i in (pending.find(b"\n"), pending.find(b"\0")) if i >= 0]
            if ends:
                end = min(ends)
                line = bytes(pending[:end])
                del pending[: end + 1]
            elif len(pending) > MAX_REPLY:
                raise ValueError(f"a reply line of more than {MAX_REPLY} bytes")
            else:
                data = self.clamd_socket.recv(4096)
                if data:
                    pending += data
                    continue
                if pending.strip():  # fail closed: "stream: OK" cut short is not an OK
                    said = pending[:200].decode("utf-8", "replace")
                    raise ValueError(f"reply cut short by a close: {said!r}")
                return ""
            reply = line.decode("utf-8", "replace").strip()
            if reply:
                self.replies.append(reply)
                return reply

    def close(self) -> None:
        sock = getattr(self, "clamd_socket", None)
        if sock is not None:
            sock.close()


class _Unix(_Mended, pyclamd.ClamdUnixSocket):
    def _connect(self) -> _DeadlineSocket:
        sock = _DeadlineSocket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self._connect_timeout())
        try:
            sock.connect(self.unix_socket)
        except OSError as e:
            sock.close()
            raise _Unreachable(
                f"could not reach clamd at {self.unix_socket}: {e.strerror or e}"
            ) from None
        return sock


class _Tcp(_Mended, pyclamd.ClamdNetworkSocket):
    def _connect(self) -> _DeadlineSocket:
        try:
            plain = socket.create_connection(
                (self.host, self.port), timeout=self._connect_timeout()
            )
        except OSError as e:
            raise _Unreachable(
                f"could not reach clamd at {self.host}:{self.port}: {e.strerror or e}"
            ) from None
        return _DeadlineSocket(plain.family, plain.type, plain.proto, plain.detach())


class Clamd:
    """One clamd address; `scan` and `ping` block (run them on a thread of your own)."""

    def __init__(self, address: Address, timeout: float, scan_timeout: float) -> None:
        self.address = address
        self.name = str(address)
        self.timeout = timeout
        self.scan_timeout = scan_timeout

    def _client(self, timeout: float) -> _Unix | _Tcp:
        # Made bare: pyclamd's constructor would connect once just to see that it can.
        client: _Unix | _Tcp
        path, host, port = self.address.path, self.address.host, self.address.port
        if path is not None:  # (is_unix)
            client = _Unix.__new__(_Unix)
            client.unix_socket = path
        else:
            assert port is not None  # Address: every TCP address has a port
            client = _Tcp.__new__(_Tcp)
            client.host, client.port = host, port
        client.timeout = timeout
        return client

    def scan(self, body: BinaryIO) -> Outcome:
        """INSTREAM `body` to this clamd, within TimeOut per operation and ScanTimeout in all."""
        client = self._client(self.timeout)
        client.deadline = time.monotonic() + self.scan_timeout
        try:
            found = client.scan_stream(body, chunk_size=CHUNK)
        except pyclamd.BufferTooLongError as e:
            detail = f"{e} (raise StreamMaxLength in clamd.conf, or set MaxScanSize below it)"
            return self._refused(detail, OVERSIZE)
        except pyclamd.ConnectionError as e:
            if client.unreachable is not None:
                return self._failed(str(client.unreachable), sent=False)
            return self._failed(self._why(client, e, str(e)))
        except OSError as e:
            return self._failed(self._why(client, e, f"connection failed: {e.strerror or e}"))
        except (IndexError, ValueError) as e:  # pyclamd's parser on a reply it does not know
            return self._failed(f"unexpected response from clamd: {e}")
        finally:
            client.close()  # pyclamd leaves it open when a scan fails
        if not found:
            # pyclamd returns None both for "stream: OK" and for a reply it does not know (or
            # none at all, when clamd died): only the explicit OK is clean, never the silence.
            if client.replies and all(r == "stream: OK" for r in client.replies):
                return Outcome(ScanResult(CLEAN, clamd=self.name))
            said = " / ".join(client.replies)[:200] or "nothing (connection closed)"
            return self._failed(f"unexpected response from clamd: {said}")
        status, reason = next(iter(found.values()))
        if status == "FOUND":
            return Outcome(ScanResult(VIRUS, virus=reason.strip() or None, clamd=self.name))
        # clamd's own ERROR for this message: it works, another clamd would say the same.
        return self._refused(reason, OVERSIZE if "size limit exceeded" in reason else ERROR)

    def _why(self, client: _Mended, error: Exception, otherwise: str) -> str:
        sock = getattr(client, "clamd_socket", None)
        cause = getattr(sock, "last_error", None) or error
        if isinstance(cause, TimeoutError):
            if client.deadline is not None and time.monotonic() >= client.deadline - 0.01:
                return f"clamd did not finish within ScanTimeout ({self.scan_timeout:g} s)"
            return f"clamd timed out (TimeOut {self.timeout:g} s)"
        if cause is not error and isinstance(cause, OSError):
            return f"connection failed: {cause.strerror or cause}"
        return otherwise

    def _failed(self, detail: str, sent: bool = True) -> Outcome:
        result = ScanResult(ERROR, detail=detail, clamd=self.name)
        return Outcome(result, clamd_failed=True, sent=sent)

    def _refused(self, detail: str, status: ScanStatus = ERROR) -> Outcome:
        return Outcome(ScanResult(status, detail=detail, clamd=self.name))

    def ping(self, timeout: float | None = None) -> bool:
        """Whether clamd answers PING with PONG within `timeout` (default TimeOut)."""
        client = self._client(self.timeout if timeout is None else timeout)
        try:
            return bool(client.ping())
        except (pyclamd.ConnectionError, OSError, ValueError):
            return False
        finally:
            client.close()
