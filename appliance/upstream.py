"""The SMTP client side: one connection to the next hop, with a timeout on every read and write.

It knows SMTP replies and nothing of scanning: the relay asks it to send a command or a message
and gets the next hop's reply back verbatim. Every failure is an `UpstreamError` (the relay turns
it into a 4xx), never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any, cast

from .addresses import Address, plain_ip
from .deadline import Deadline, Expiry, current_expiry

#: One answer of getaddrinfo: (family, type, proto, canonname, sockaddr).
AddrInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]

#: A reply line longer than this is cut (the C original's buffer was 4224 bytes as well).
MAX_REPLY_LINE = 4224
#: A reply with more lines than this is a broken or hostile next hop.
MAX_REPLY_LINES = 512
#: Forwarded message bytes are written in pieces of about this size.
WRITE_BATCH = 1 << 18
#: Unread bytes from the next hop past which its socket is not read until some are taken.
READ_HIGH_WATER = 1 << 16


class UpstreamError(Exception):
    """The next hop could not be reached, timed out, closed, or spoke something that is not SMTP."""


class HandshakeError(UpstreamError):
    """The TLS handshake with the next hop failed (the connection is closed)."""


@dataclass(frozen=True, slots=True)
class Reply:
    """One (possibly multi-line) SMTP reply, kept as the bytes the next hop sent (no CRLF)."""

    code: int
    lines: tuple[bytes, ...]

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def text(self) -> str:
        return " / ".join(line.decode("utf-8", "replace") for line in self.lines)

    def wire(self) -> bytes:
        lines = self.lines
        return b"\r\n".join(lines) + b"\r\n" if lines else b""

    @classmethod
    def make(cls, line: str) -> Reply:
        """A one-line reply of our own (e.g. `451 Local Error`)."""
        return cls(int(line[:3]), (line.encode(),))


class _NextHop(asyncio.Protocol):
    """The next hop's side of the connection: what it sent and has not been read yet, its end,
    and the one wait in progress (a reply, or room to write) with its Deadline.

    Replies are parsed straight from this buffer: a StreamReader would add a future and a wake-up
    per line, and `asyncio.timeout()` a timer per reply (docs/dev/deadline.md)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, over_ssl: bool = False) -> None:
        self.loop = loop
        self.over_ssl = over_ssl
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False  # the next hop ended its side (or the connection is gone)
        self.lost = False  # connection_lost() was called
        self.error: BaseException | None = None  # why it was lost, if not a clean close
        self.write_paused = False
        self._read_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self.deadline = Deadline(loop, self._expired)
        #: while connecting: what the Deadline's expiry does (cancel the connecting task)
        self.connect_expiry: Expiry | None = None

    # -- asyncio's side ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > READ_HIGH_WATER and not self._read_paused and self.transport:
            # a next hop that talks unasked cannot fill our memory
            self._read_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return not self.over_ssl  # (in clear, keep our side open, as a StreamReader does)

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = self.lost = True
        if exc is not None:
            self.error = exc
        self.deadline.close()
        self._wake()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake()

    # -- the reading side's -----------------------------------------------------------------

    def consumed(self) -> None:
        """Bytes were taken from `buffer`: read from the socket again if it had stopped."""
        if self._read_paused and len(self.buffer) <= READ_HIGH_WATER and self.transport:
            self._read_paused = False
            self.transport.resume_reading()

    async def wait(self) -> None:
        """Until something arrives, ends, or the transport takes more to write;
        TimeoutError when the Deadline passes first."""
        await self.waiter()

    def waiter(self) -> asyncio.Future[None]:
        """The future `wait` awaits (read_reply awaits it itself: one coroutine less per
        reply). Once done it is inert: _wake and _expired leave a done one alone."""
        waiter = self._waiter = self.loop.create_future()
        if self.deadline.expired:  # (its end passed just as the previous await was woken)
            waiter.set_exception(TimeoutError())
        return waiter

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _expired(self) -> None:
        expiry = self.connect_expiry
        if expiry is not None:  # (cancels the connecting task: TimeoutError, in connect)
            expiry.expire()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(TimeoutError())


class Upstream:
    """A connection to the next hop."""

    def __init__(
        self, transport: asyncio.Transport, protocol: _NextHop, timeout: float, peer: str
    ) -> None:
        self._transport = transport
        self._protocol = protocol
        self.timeout = timeout
        self.peer = peer  # the next hop's address, for logs and VirusAction's SERVER
        self.closed = False
        self.own: OwnConnections | None = None
        self.port = 0
        self.ssl_object: ssl.SSLObject | None = None  # set once the connection is TLS
        #: the connection under TLS, closed with it (the TLS layer would wait for the next
        #: hop's close_notify before closing the socket)
        self._clear_transport: asyncio.Transport | None = None
        self._long_line: bytes | None = None  # the kept start of an over-long reply line
        self._raw: asyncio.StreamReader | None = None  # after raw_streams()

    @classmethod
    async def connect(
        cls, address: Address, timeout: float, own: OwnConnections | None = None,
        source: str | None = None,
    ) -> Upstream:
        """Connect to the next hop; with `own`, the local port is registered before the
        connection is made, so that it is known if it comes straight back to us.

        `source` (TransparentProxy: full): connect from this address, the client's own, which
        is not one of ours (IP_TRANSPARENT, CAP_NET_ADMIN); the firewall's TPROXY rules bring
        the next hop's replies back to this socket."""
        loop = asyncio.get_running_loop()
        protocol = _NextHop(loop)
        port = 0
        # TimeOut by the connection's Deadline, which goes on to time its reads: an
        # asyncio.timeout(timeout) would cost a Timeout, two coroutines and a timer of its own
        # on the loop's heap per connection (docs/dev/deadline.md).
        protocol.connect_expiry = expiry = current_expiry(loop)
        protocol.deadline.start(timeout)
        try:
            try:
                if address.is_unix:
                    transport, _ = await loop.create_unix_connection(
                        lambda: protocol, address.path
                    )
                    peer = address.path or ""
                else:
                    sock, port = await _tcp_connect(address, own, source, loop)
                    transport, _ = await loop.create_connection(lambda: protocol, sock=sock)
                    # (None when the next hop reset the connection in the meantime)
                    peername = transport.get_extra_info("peername")
                    peer = peername[0] if peername else str(address.host)
            except asyncio.CancelledError:
                if expiry.timed_out():
                    raise TimeoutError from None
                raise
        except TimeoutError:
            protocol.deadline.close()
            _forget(own, port)
            raise UpstreamError(f"couldn't connect to: {address}: connection timed out") from None
        except OSError as e:
            protocol.deadline.close()
            _forget(own, port)
            reason = e.strerror or str(e)
            raise UpstreamError(f"couldn't connect to: {address}: {reason}") from None
        except BaseException:
            protocol.deadline.close()
            _forget(own, port)
            raise
        finally:
            protocol.connect_expiry = None
        protocol.deadline.stop()
        upstream = cls(transport, protocol, timeout, peer)
        if own is not None and port:
            upstream.own, upstream.port = own, port
            sockname = transport.get_extra_info("sockname")
            if isinstance(sockname, tuple):
                own.connected(port, (sockname[0], sockname[1]))
            else:
                own.closed(port)
                upstream.port = 0
        return upstream

    async def read_reply(self) -> Reply:
        """The next whole reply, within TimeOut."""
        lines: list[bytes] = []
        code = 0
        protocol = self._protocol
        protocol.deadline.start(self.timeout)
        try:
            while True:
                line = self._take_line()
                if line is None:
                    await protocol.waiter()
                    continue
                if not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
                    raise UpstreamError(f"unexpected reply from server: {line[:80]!r}")
                this = int(line[:3])
                if lines and this != code:
                    raise UpstreamError("server reply changed its code mid-reply")
                code = this
                lines.append(line)
                if line[3:4] != b"-":
                    return Reply(code, tuple(lines))
                if len(lines) >= MAX_REPLY_LINES:
                    raise UpstreamError("server reply has too many lines")
        except TimeoutError:
            self.abort()
            raise UpstreamError("network read operation timed out (server)") from None
        finally:
            protocol.deadline.stop()

    def _take_line(self) -> bytes | None:
        """A whole line from the buffer without its line ending (cut at MAX_REPLY_LINE: the rest
        of an over-long line is thrown away), or None until one has arrived. UpstreamError when
        the connection failed or ended first."""
        protocol = self._protocol
        if protocol.error is not None:
            self.abort()
            error = protocol.error
            reason = getattr(error, "strerror", None) or error
            raise UpstreamError(f"server connection failed: {reason}")
        buffer = protocol.buffer
        end = buffer.find(b"\n")
        if end < 0:
            if protocol.eof:
                self.abort()
                raise UpstreamError("server closed the connection")
            if len(buffer) > MAX_REPLY_LINE:  # keep the start, drop the rest as it comes
                if self._long_line is None:
                    self._long_line = bytes(buffer[:MAX_REPLY_LINE])
                buffer.clear()
                protocol.consumed()
            return None
        line = bytes(buffer[: min(end, MAX_REPLY_LINE)])
        del buffer[: end + 1]
        protocol.consumed()
        if self._long_line is not None:
            line, self._long_line = self._long_line, None
        return line.rstrip(b"\r\n")

    async def start_tls(self, context: ssl.SSLContext, server_hostname: str | None) -> None:
        """After the next hop's 220 to our STARTTLS: the handshake, then SMTP inside TLS.

        The connection gets a new buffer: whatever the next hop sent behind its 220 in clear
        stays in the old one and is never read as a reply (RFC 3207 section 6, the
        CVE-2011-0411 class of injection). HandshakeError if it fails; the connection is
        then closed.
        """
        loop = asyncio.get_running_loop()
        protocol = _NextHop(loop, over_ssl=True)
        try:
            async with asyncio.timeout(self.timeout):
                transport = await loop.start_tls(
                    self._transport, protocol, context,
                    server_hostname=server_hostname, ssl_handshake_timeout=self.timeout,
                )
        except TimeoutError:
            self.abort()
            raise HandshakeError("TLS handshake with server timed out") from None
        except ssl.SSLCertVerificationError as e:
            self.abort()
            raise HandshakeError(
                f"TLS handshake with server failed: certificate verification failed: "
                f"{e.verify_message or e.reason}"
            ) from None
        except (OSError, EOFError) as e:
            self.abort()
            reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e)
            raise HandshakeError(
                f"TLS handshake with server failed: {reason or type(e).__name__}"
            ) from None
        if transport is None:  # (only when the loop is closing)
            self.abort()
            raise HandshakeError("TLS handshake with server failed: connection closed")
        protocol.connection_made(transport)  # (loop.start_tls leaves this to its caller)
        self._protocol.deadline.close()
        self._clear_transport = self._transport
        self._transport, self._protocol = transport, protocol
        self.ssl_object = transport.get_extra_info("ssl_object")

    def raw_streams(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The connection as plain byte streams, for a splice (ClientTLS: passthrough), after
        the next hop's 220 to the client's STARTTLS. A new reader, as for start_tls: what the
        next hop sent behind that 220 in clear is dropped."""
        loop = asyncio.get_running_loop()
        transport = self._transport
        reader = asyncio.StreamReader(loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if not transport.is_reading():  # (paused by the old buffer's flow control)
            transport.resume_reading()
        self._protocol.deadline.close()
        self._raw = reader
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)

    async def send(self, data: bytes) -> None:
        if self._write(data):
            await self._drain()

    def _write(self, data: bytes) -> bool:
        """Write; True when the caller must `await _drain()` (a coroutine only then: a command
        of the lock-step dialogue almost never waits)."""
        if self.closed:
            raise UpstreamError("server connection is closed")
        protocol = self._protocol
        if protocol.lost:  # (asyncio drops a write to a lost connection; uvloop raises)
            return True  # _drain says how it was lost
        transport = self._transport
        transport.write(data)
        if not transport.get_write_buffer_size():
            return False  # all of it went to the kernel
        return protocol.write_paused or protocol.lost  # (else little enough is left)

    async def _drain(self) -> None:
        """Until the transport's buffer is back under its mark, within TimeOut."""
        protocol = self._protocol
        protocol.deadline.start(self.timeout)
        try:
            while protocol.write_paused and not protocol.lost:
                await protocol.wait()
        except TimeoutError:
            self.abort()
            raise UpstreamError("network write operation timed out (server)") from None
        finally:
            protocol.deadline.stop()
        if protocol.lost:
            self.abort()
            error = protocol.error
            reason = (getattr(error, "strerror", None) or error) if error else "Connection lost"
            raise UpstreamError(f"server connection failed: {reason}")

    async def command(self, line: bytes) -> Reply:
        """Send one command line (without CRLF) and return the whole reply."""
        if self._write(line + b"\r\n"):
            await self._drain()
        return await self.read_reply()

    async def send_message(self, chunks: Iterable[bytes]) -> Reply:
        """After a 354: stream the (already dot-stuffed) message, end it, return the final reply."""
        # Chunks are gathered into writes of up to WRITE_BATCH bytes: a small message (and its
        # end-of-data line) leaves in one system call instead of one per chunk.
        batch: list[bytes] = []
        pending = 0
        for chunk in chunks:
            batch.append(chunk)
            pending += len(chunk)
            if pending >= WRITE_BATCH:
                await self.send(b"".join(batch))  # drains with a timeout: memory stays bounded
                batch, pending = [], 0
        batch.append(b".\r\n")
        await self.send(b"".join(batch))
        return await self.read_reply()

    @contextlib.asynccontextmanager
    async def keepalive(self, interval: float, log: logging.LoggerAdapter[logging.Logger]
                        ) -> AsyncIterator[None]:
        """While we are busy with the client or clamd, send NOOP every `interval` seconds so the
        next hop does not time out (KeepAlives). The original only did it while DATA arrived."""
        if interval <= 0:
            yield
            return
        lock = asyncio.Lock()

        async def beat() -> None:
            while True:
                await asyncio.sleep(interval)
                async with lock:
                    reply = await self.command(b"NOOP")
                if not reply.positive:
                    log.warning("server answered NOOP with: %s", reply.text)

        task = asyncio.get_running_loop().create_task(beat())
        try:
            yield
        finally:
            async with lock:  # never cut a NOOP in half: its reply would be read as the next one
                task.cancel()
            await asyncio.wait([task])
            if not task.cancelled() and task.exception() is not None:
                log.error("keepalive: %s", task.exception())

    @property
    def at_eof(self) -> bool:
        if self.closed:
            return True
        if self._raw is not None:
            return self._raw.at_eof()
        return self._protocol.eof and not self._protocol.buffer

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self._protocol.deadline.close()
            self._transport.abort()
            _forget(self.own, self.port)

    async def quit(self) -> None:
        """Say goodbye politely if the connection still works; never raise."""
        if self.closed:
            return
        protocol = self._protocol
        protocol.deadline.start(min(self.timeout, 5))
        try:
            self._transport.write(b"QUIT\r\n")
            while b"\n" not in protocol.buffer and not protocol.eof:
                await protocol.wait()
        except (TimeoutError, OSError, RuntimeError):
            pass
        finally:
            protocol.deadline.stop()
        self.close()

    def close(self) -> None:
        """Close politely; but a next hop that has not taken what was written to it (it stopped
        reading) would keep the connection, its fd and the unsent bytes for as long as it
        keeps its window shut: that one is aborted."""
        if not self.closed and self._transport.get_write_buffer_size():
            self.abort()
        if not self.closed:
            self.closed = True
            self._protocol.deadline.close()
            self._transport.close()  # (with TLS: its close_notify is written now)
            if self._clear_transport is not None:
                self._clear_transport.close()
            _forget(self.own, self.port)


class OwnConnections:
    """The local ports of our connections to next hops, to recognise one that comes back in
    (a firewall rule that redirects the proxy's own mail to it, or an OutAddress that is us).

    A port is known from the moment it is bound, before the connection is made: the looped
    connection reaches our listener before our own connect() has returned.
    """

    def __init__(self) -> None:
        # port -> future of our (ip, port)
        self._ports: dict[int, asyncio.Future[tuple[str, int]]] = {}

    def bound(self, port: int) -> None:
        self._ports[port] = asyncio.get_running_loop().create_future()

    def connected(self, port: int, local: tuple[str, int]) -> None:
        future = self._ports.get(port)
        if future is not None and not future.done():
            future.set_result(local)

    def closed(self, port: int) -> None:
        future = self._ports.pop(port, None)
        if future is not None and not future.done():
            future.cancel()

    async def is_ours(self, peer: tuple[str, int], wait: float = 5.0) -> bool:
        """Whether `peer` (a client's ip, port) is one of our own outgoing connections."""
        future = self._ports.get(peer[1])
        if future is None:
            return False
        try:
            async with asyncio.timeout(wait):
                local = await asyncio.shield(future)
        except (TimeoutError, asyncio.CancelledError):
            return False
        return _same_endpoint(local, peer)


def _same_endpoint(a: tuple[str, int], b: tuple[str, int]) -> bool:
    return a[1] == b[1] and plain_ip(a[0]) == plain_ip(b[0])


@functools.lru_cache(maxsize=1024)
def _literal(address: Address) -> list[AddrInfo] | None:
    """getaddrinfo's answer for an IP literal, without its trip to a thread (every connection
    of a proxy with a numeric OutAddress, and every transparent one, would pay it); kept per
    address, as the parse costs more than the connect's own Python (the caller does not
    change the list)."""
    try:
        ip = ipaddress.ip_address(address.host or "")
    except ValueError:
        return None
    if ip.version == 6:
        return [(socket.AF_INET6, socket.SOCK_STREAM, 0, "", (str(ip), address.port, 0, 0))]
    return [(socket.AF_INET, socket.SOCK_STREAM, 0, "", (str(ip), address.port))]


def _forget(own: OwnConnections | None, port: int) -> None:
    if own is not None and port:
        own.closed(port)


# linux/in.h, linux/in6.h (Python 3.11 lacks IPV6_TRANSPARENT)
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75


def set_transparent(sock: socket.socket) -> None:
    """Let `sock` use an address that is not ours: bind to it, or accept for it (TPROXY)."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)


def transparent_problem() -> str | None:
    """Why this process cannot connect from a client's address, or None if it can (tried on a
    socket at start-up, so a missing CAP_NET_ADMIN is reported then, not at the first mail)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            set_transparent(sock)
    except OSError as e:
        return (f"TransparentProxy: full needs CAP_NET_ADMIN for IP_TRANSPARENT: "
                f"{e.strerror or e}")
    return None


def _source_for(family: int, source: str) -> tuple[str, int] | tuple[str, int, int, int]:
    ip = ipaddress.ip_address(plain_ip(source))
    if (ip.version == 6) != (family == socket.AF_INET6):
        # a client on IPv4 that dialled an IPv6 server (or the reverse) cannot happen with
        # TPROXY; a resolved name could, and cannot be spoofed across families
        other = 4 if ip.version == 6 else 6
        raise OSError(f"cannot connect from the client's address {ip} to an IPv{other} address")
    return (str(ip), 0, 0, 0) if ip.version == 6 else (str(ip), 0)


async def _tcp_connect(
    address: Address, own: OwnConnections | None, source: str | None,
    loop: asyncio.AbstractEventLoop,
) -> tuple[socket.socket, int]:
    """A connected, non-blocking TCP socket to `address` (each resolved address in turn)."""
    infos = _literal(address) or await loop.getaddrinfo(
        address.host, address.port, type=socket.SOCK_STREAM
    )
    error: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        # (non-blocking from the start; the transport sets TCP_NODELAY)
        sock = socket.socket(family, kind | socket.SOCK_NONBLOCK, proto)
        port = 0
        try:
            if source is not None:
                set_transparent(sock)
                sock.bind(_source_for(family, source))
                port = sock.getsockname()[1]
                if own is not None:
                    own.bound(port)
            elif own is not None:
                sock.bind(("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0))
                port = sock.getsockname()[1]
                own.bound(port)
            await loop.sock_connect(sock, sockaddr)
            return sock, port
        except OSError as e:
            sock.close()
            _forget(own, port)
            error = e
        except BaseException:
            sock.close()
            _forget(own, port)
            raise
    raise error or OSError(f"no address for {address.host}")
