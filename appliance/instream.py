"""One scan on one clamd: INSTREAM over a socket of the event loop, bounded by TimeOut and
ScanTimeout.

The pool of clamds (which one, failover, health) is `scanner.py`; this module only knows how to
talk to one clamd and what its answer means.

Problems come back as a value (`ScanResult` with status ERROR), never as an exception, with
`clamd_failed` saying whether clamd itself misbehaved (so another clamd may do better) or the
message could not be scanned anywhere (clamd's own ERROR reply; OVERSIZE, a body over
StreamMaxLength).

The dialogue is pyclamd's (`nINSTREAM\\n`, length-prefixed chunks, a zero length, reply lines
until clamd closes), spoken here on the loop's non-blocking socket instead of pyclamd's blocking
one on a thread: the hand-off to a thread and back, and the GIL passing between them, cost more
CPU than the scan's own system calls (docs/dev/scanner.md). What pyclamd got wrong stays fixed:
every write is whole (a partial write would corrupt INSTREAM's framing), a timed-out read is not
retried, a reply is read to its end of line whatever the TCP segments, and TCP may be IPv6.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import BinaryIO

from .addresses import Address
from .deadline import Expiry, SharedDeadlines, current_expiry, shared_deadlines


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
#: The string clamd answers when a body is over its StreamMaxLength.
SIZE_LIMIT_REPLY = "INSTREAM size limit exceeded. ERROR"
#: The end of an INSTREAM: a chunk of length zero.
_END = struct.pack("!L", 0)


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


@dataclass(frozen=True, slots=True)
class Outcome:
    """A scan attempt on one clamd: its result, and whether clamd itself failed."""

    result: ScanResult
    clamd_failed: bool = False  # refused, timed out, hung up, answered garbage
    sent: bool = True  # False: clamd could not even be reached (nothing was sent)


class _Unreachable(Exception):
    """clamd could not be connected to: nothing was sent."""


class _Garbage(Exception):
    """clamd answered something that is not a reply (too long, or cut short by a close)."""


class _Connection:
    """One connection to clamd: each operation waits at most TimeOut, and never past the
    deadline of the whole scan (ScanTimeout): through the loop's SharedDeadlines, whose entry
    for it moves at each wait and cancels the scan's task (`expiry`) when it passes (a scan);
    or through one `asyncio.Timeout` moved per wait (`guard`: a PING)."""

    def __init__(self, clamd: Clamd, timeout: float, deadline: float | None,
                 loop: asyncio.AbstractEventLoop, *, guard: asyncio.Timeout | None = None,
                 shared: SharedDeadlines | None = None, expiry: Expiry | None = None) -> None:
        self.loop = loop
        self.shared = shared
        self._on_expiry = expiry.expire if expiry is not None else None
        self.clamd = clamd
        self.timeout = timeout
        self.deadline = deadline
        self.guard = guard
        self.sock: socket.socket | None = None
        self.connected = False
        self.hung_up = False  # clamd closed while we wrote: its reason is still to be read
        self._pending = bytearray()
        self.replies: list[str] = []

    def _arm(self) -> None:
        """The next wait ends at TimeOut from now, or at the deadline if that comes first."""
        when = self.loop.time() + self.timeout
        if self.deadline is not None and self.deadline < when:
            when = self.deadline
        if self.shared is not None and self._on_expiry is not None:
            self.shared.arm(self, when, self._on_expiry)
        elif self.guard is not None and not self.guard.expired() and when != self.guard.when():
            # (TimeOut >= ScanTimeout: it stays at the deadline; an expiring one cannot move)
            self.guard.reschedule(when)

    async def connect(self) -> None:
        """_Unreachable when clamd cannot be connected to (refused, missing, timed out)."""
        address = self.clamd.address
        where = self.clamd.where
        self._arm()
        try:
            if address.path is not None:  # (is_unix)
                # (non-blocking from the start: no ioctl of its own)
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                await self.loop.sock_connect(self.sock, address.path)
            else:
                await self._tcp_connect(address)
        except OSError as e:
            raise _Unreachable(f"could not reach clamd at {where}: {e.strerror or e}") from None
        self.connected = True

    async def _tcp_connect(self, address: Address) -> None:
        infos = _numeric(address) or await self.loop.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM
        )
        error: OSError | None = None
        for family, kind, proto, _, sockaddr in infos:
            sock = socket.socket(family, kind, proto)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await self.loop.sock_connect(sock, sockaddr)
            except OSError as e:
                sock.close()
                error = e
                continue
            except BaseException:
                sock.close()
                raise
            self.sock = sock
            return
        raise error or OSError(f"no address for {address.host}")

    async def send(self, *parts: bytes) -> None:
        """Write all of `parts`, in one system call when the socket takes them at once. When
        clamd hangs up in the middle (a body over its StreamMaxLength), the rest is dropped
        instead of failing, so that its reason (`INSTREAM size limit exceeded`) is read
        rather than a bare broken pipe reported."""
        if self.hung_up:
            return
        assert self.sock is not None
        try:
            sent = self.sock.sendmsg(parts)  # gathered: no copy of a chunk behind its length
        except (BlockingIOError, InterruptedError):
            sent = 0
        except (BrokenPipeError, ConnectionResetError):
            self.hung_up = True
            return
        try:
            for part in parts:
                if sent >= len(part):
                    sent -= len(part)
                    continue
                self._arm()
                await self.loop.sock_sendall(self.sock, memoryview(part)[sent:])
                sent = 0
        except (BrokenPipeError, ConnectionResetError):
            self.hung_up = True

    async def reply_line(self) -> str:
        """One reply line (up to LF or NUL), "" once clamd has closed; blank lines skipped."""
        assert self.sock is not None
        pending = self._pending
        while True:
            end = _line_end(pending)
            if end >= 0:
                line = bytes(pending[:end])
                del pending[: end + 1]
            elif len(pending) > MAX_REPLY:
                raise _Garbage(f"a reply line of more than {MAX_REPLY} bytes")
            else:
                self._arm()
                data = await self.loop.sock_recv(self.sock, 4096)
                if data:
                    pending += data
                    continue
                if pending.strip():  # fail closed: "stream: OK" cut short is not an OK
                    said = pending[:200].decode("utf-8", "replace")
                    raise _Garbage(f"reply cut short by a close: {said!r}")
                return ""
            reply = line.decode("utf-8", "replace").strip()
            if reply:
                self.replies.append(reply)
                return reply

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


_AddrInfo = tuple[int, int, int, str, tuple[str, int | None]]


def _numeric(address: Address) -> list[_AddrInfo] | None:
    """getaddrinfo's answer for an IP literal, without its trip to a thread."""
    try:
        ip = ipaddress.ip_address(address.host or "")
    except ValueError:
        return None
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return [(family, socket.SOCK_STREAM, 0, "", (str(ip), address.port))]


def _line_end(pending: bytearray) -> int:
    newline, nul = pending.find(b"\n"), pending.find(b"\0")
    if newline < 0:
        return nul
    return newline if nul < 0 else min(newline, nul)


def _parse(reply: str) -> tuple[str, str]:
    """(status, reason) of an INSTREAM reply line, as pyclamd reads it: `stream: Eicar FOUND`
    -> ("FOUND", "Eicar"); `stream: OK` -> ("OK", "")."""
    _, _, result = reply.partition(": ")
    if result == "OK":
        return "OK", ""
    parts = result.split()
    if not parts:
        raise _Garbage(reply[:200])
    return parts[-1], " ".join(parts[:-1])


class Clamd:
    """One clamd address; `scan` and `ping` are coroutines on the daemon's loop."""

    def __init__(self, address: Address, timeout: float, scan_timeout: float) -> None:
        self.address = address
        self.name = str(address)
        self.timeout = timeout
        self.scan_timeout = scan_timeout
        #: as the "could not reach" messages name it
        self.where = address.path if address.is_unix else f"{address.host}:{address.port}"

    async def scan(self, body: BinaryIO) -> Outcome:
        """INSTREAM `body` to this clamd, within TimeOut per operation and ScanTimeout in all."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.scan_timeout
        connection: _Connection | None = None
        shared = shared_deadlines(loop)
        expiry = current_expiry(loop)
        try:
            # (no asyncio.timeout: `shared`, the loop's one TimerHandle for all waits, cancels
            # this task when TimeOut or ScanTimeout passes, docs/dev/deadline.md)
            connection = _Connection(self, self.timeout, deadline, loop, shared=shared,
                                     expiry=expiry)
            try:
                await connection.connect()
                found = await self._instream(connection, body)
            except asyncio.CancelledError:
                if expiry.timed_out():
                    raise TimeoutError from None
                raise
            finally:
                shared.disarm(connection)
        except _Unreachable as e:
            return self._failed(str(e), sent=False)
        except TimeoutError:
            if connection is None or not connection.connected:  # nothing was sent
                return self._failed(f"could not reach clamd at {self.where}: timed out",
                                    sent=False)
            if loop.time() >= deadline - 0.01:
                return self._failed(
                    f"clamd did not finish within ScanTimeout ({self.scan_timeout:g} s)"
                )
            return self._failed(f"clamd timed out (TimeOut {self.timeout:g} s)")
        except OSError as e:
            return self._failed(f"connection failed: {e.strerror or e}")
        except _Garbage as e:
            return self._failed(f"unexpected response from clamd: {e}")
        finally:
            if connection is not None:
                connection.close()
        if isinstance(found, Outcome):
            return found
        replies = connection.replies
        if not found:
            # No FOUND and no ERROR: only the explicit OK is clean, never the silence (clamd
            # died), nor a reply this does not know.
            if replies and all(r == "stream: OK" for r in replies):
                return Outcome(ScanResult(CLEAN, clamd=self.name))
            said = " / ".join(replies)[:200] or "nothing (connection closed)"
            return self._failed(f"unexpected response from clamd: {said}")
        status, reason = found
        if status == "FOUND":
            return Outcome(ScanResult(VIRUS, virus=reason.strip() or None, clamd=self.name))
        # clamd's own ERROR for this message: it works, another clamd would say the same.
        return self._refused(reason, OVERSIZE if "size limit exceeded" in reason else ERROR)

    async def _instream(
        self, connection: _Connection, body: BinaryIO
    ) -> tuple[str, str] | Outcome | None:
        """Stream `body`, read every reply line until clamd closes; (status, reason) of a
        FOUND (or else of the first ERROR), None if there was neither, or the Outcome of a
        size-limit refusal."""
        head = b"nINSTREAM\n"  # (pyclamd's form of the command: the reply ends with LF)
        chunk = body.read(CHUNK)
        while chunk:
            after = body.read(CHUNK)  # known before the write: the end goes with the last
            parts = (head, struct.pack("!L", len(chunk)), chunk) + (() if after else (_END,))
            await connection.send(*parts)
            head, chunk = b"", after
        if head:
            await connection.send(head, _END)  # an empty body
        found: tuple[str, str] | None = None
        while True:
            reply = await connection.reply_line()
            if not reply:
                return found
            if reply == SIZE_LIMIT_REPLY:
                return self._refused(
                    f"{reply} (raise StreamMaxLength in clamd.conf, or set MaxScanSize "
                    f"below it)", OVERSIZE,
                )
            status, reason = _parse(reply)
            if status == "FOUND" or (status == "ERROR" and found is None):
                found = (status, reason)

    def _failed(self, detail: str, sent: bool = True) -> Outcome:
        result = ScanResult(ERROR, detail=detail, clamd=self.name)
        return Outcome(result, clamd_failed=True, sent=sent)

    def _refused(self, detail: str, status: ScanStatus = ERROR) -> Outcome:
        return Outcome(ScanResult(status, detail=detail, clamd=self.name))

    async def ping(self, timeout: float | None = None) -> bool:
        """Whether clamd answers PING with PONG within `timeout` (default TimeOut)."""
        timeout = self.timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        connection: _Connection | None = None
        try:
            async with asyncio.timeout(timeout) as guard:
                connection = _Connection(self, timeout, loop.time() + timeout, loop, guard=guard)
                await connection.connect()
                await connection.send(b"nPING\n")
                return await connection.reply_line() == "PONG"
        except (_Unreachable, _Garbage, TimeoutError, OSError):
            return False
        finally:
            if connection is not None:
                connection.close()
