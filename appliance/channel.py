"""The client's connection, as the relay needs it: lines, DATA chunks, replies, STARTTLS, splice.

An asyncio.Protocol with a buffer of its own, so that every seam the relay depends on is public
and ours: a line is taken from the buffer (`LineBuffer`, sans-IO: tests feed it bytes), a whole
buffered line can be peeked at (pipelined groups), the DATA decoder's leftover goes back with
`unread`, and STARTTLS starts in place with `loop.start_tls`, the buffer emptied first (RFC 3207
section 6: what the client sent behind STARTTLS in clear is never read).

TimeOut counts the client's silence while a read waits for it, with one timer per connection
(`deadline.Deadline`, as the next hop's side), which also bounds the graceful close: a read costs
no timer of its own. Why this shape: docs/dev/relay.md.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import cast

from .deadline import Deadline

#: Past this many buffered bytes the socket is not read until the relay has taken some: a
#: client sending faster than the next hop takes it costs this much memory, not more.
HIGH_WATER = 1 << 18
#: Reading resumes once the buffer is back under this.
LOW_WATER = 1 << 17


class ClientGone(Exception):
    """The client closed, or did not speak within TimeOut."""


class LineTooLong(Exception):
    """A line of at least the limit (its line ending counted): it was read to its end and
    thrown away, so the next read starts at the next line."""


class LineBuffer:
    """Bytes in, lines out: the client's unread bytes, with no I/O of its own."""

    __slots__ = ("_data", "_discarding")

    def __init__(self) -> None:
        self._data = bytearray()
        self._discarding = False  # inside a line already known to be too long

    def __len__(self) -> int:
        return len(self._data)

    def feed(self, data: bytes) -> None:
        self._data += data

    def line(self, limit: int) -> bytes | None:
        """The next line with its LF, if it is all here; None if more is needed. LineTooLong for
        a line of `limit` bytes or more, once its LF is here (until then its bytes are dropped
        as they come, so it costs no memory)."""
        data = self._data
        if self._discarding:
            end = data.find(b"\n")
            if end < 0:
                data.clear()
                return None
            del data[:end + 1]
            self._discarding = False
            raise LineTooLong
        end = data.find(b"\n", 0, limit - 1)
        if end >= 0:
            line = bytes(data[:end + 1])
            del data[:end + 1]
            return line
        if len(data) < limit - 1:
            return None
        self._discarding = True
        return self.line(limit)

    def peek_line(self, limit: int) -> bytes | None:
        """The next line with its LF if it is all here within `limit` bytes, not taken."""
        if self._discarding:
            return None
        end = self._data.find(b"\n", 0, limit)
        return bytes(self._data[:end + 1]) if end >= 0 else None

    def take(self, size: int) -> bytes:
        """Up to `size` bytes, whatever they are (DATA)."""
        data = self._data
        if len(data) <= size:
            chunk = bytes(data)
            data.clear()
        else:
            chunk = bytes(data[:size])
            del data[:size]
        return chunk

    def skip(self, size: int) -> None:
        del self._data[:size]

    def unread(self, data: bytes) -> None:
        """Put `data` back in front: what the DATA decoder read past the end of the message."""
        self._data[0:0] = data

    def clear(self) -> None:
        self._data.clear()
        self._discarding = False


class ClientChannel(asyncio.Protocol):
    """One client connection. `on_connect(channel)` is called once it is made; `on_lost()`
    once it is lost (the relay cancels the session then, as a connection without a client
    has nothing left to answer)."""

    def __init__(
        self, timeout: float, on_connect: Callable[[ClientChannel], None],
        on_lost: Callable[[], None],
    ) -> None:
        self.timeout = timeout
        self.transport: asyncio.Transport | None = None
        self.buffer = LineBuffer()
        self.tls = False
        self._on_connect = on_connect
        self._on_lost = on_lost
        self._loop = asyncio.get_running_loop()
        self._eof = False
        self._reading_paused = False
        self._waiter: asyncio.Future[None] | None = None
        #: ends a read's wait after TimeOut of silence, or a graceful close after TimeOut
        self._deadline = Deadline(self._loop, self._expired)
        self._closing = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._lost = False
        self._handshaking = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the connection runs on (the relay starts its session task there)."""
        return self._loop

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (a stream socket's transport: asyncio.Protocol's signature names the base class)
        self.transport = cast(asyncio.Transport, transport)
        self._on_connect(self)

    def data_received(self, data: bytes) -> None:
        self.buffer.feed(data)
        if len(self.buffer) > HIGH_WATER and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return not self.tls  # half-closed TCP: the replies still go out (TLS cannot)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._eof = True
        self.transport = None
        self._deadline.close()
        self._wake()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("the client's connection was lost"))
        if not self._handshaking:  # (else start_tls raises, and its caller answers for it)
            self._on_lost()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- reading ----------------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _expired(self) -> None:
        """The Deadline passed: TimeOut of silence while a read waited, or a graceful close
        the client did not let finish within TimeOut."""
        if self._closing:
            self.abort()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(TimeoutError())

    async def _wait(self, idle_timeout: bool = True) -> None:
        """Until more bytes (or the end) arrive; TimeoutError after TimeOut of silence."""
        try:
            await self._expect(idle_timeout)
        finally:
            self._waited()

    def _expect(self, idle_timeout: bool = True) -> asyncio.Future[None]:
        """The future `_wait` awaits, its TimeOut started; `_waited()` after it, always.
        (read_line awaits it itself: one coroutine less per command.)"""
        if self._reading_paused and len(self.buffer) < LOW_WATER and self.transport:
            self._reading_paused = False
            self.transport.resume_reading()
        waiter = self._loop.create_future()
        self._waiter = waiter
        # Silence counts from the start of this wait: any byte ends a wait, so that is the
        # client's last byte, or the moment we asked if we were busy since (a scan, the next
        # hop's replies): time the client spent waiting for us is not idleness.
        if idle_timeout:
            self._deadline.start(self.timeout)
        # (else a splice, which keeps its own TimeOut, both ways)
        return waiter

    def _waited(self) -> None:
        self._waiter = None
        if not self._closing:
            self._deadline.stop()

    def _consumed(self) -> None:
        if self._reading_paused and len(self.buffer) < LOW_WATER and self.transport:
            self._reading_paused = False
            self.transport.resume_reading()

    async def read_line(self, limit: int) -> bytes:
        """The next line with its line ending. LineTooLong (the line was read to its end and
        dropped), TimeoutError after TimeOut of silence, ClientGone at the end of the stream
        (a line cut by it included)."""
        buffer = self.buffer
        while True:
            line = buffer.line(limit)
            if line is not None:
                self._consumed()
                return line
            if self._eof:
                raise ClientGone
            try:
                await self._expect()
            finally:
                self._waited()

    def peek_line(self, limit: int) -> bytes | None:
        """The next whole line already received (with its LF), left in place; None if there
        is none (pipelining: the client sent it without waiting for a reply)."""
        return self.buffer.peek_line(limit)

    def skip(self, size: int) -> None:
        """Drop `size` bytes already peeked at (a line taken into a pipelined group)."""
        self.buffer.skip(size)
        self._consumed()

    async def read_chunk(self, size: int) -> bytes:
        """Up to `size` bytes as they come (DATA); b"" at the end of the stream, TimeoutError
        after TimeOut of silence."""
        buffer = self.buffer
        while not len(buffer):
            if self._eof:
                return b""
            await self._wait()
        chunk = buffer.take(size)
        self._consumed()
        return chunk

    def unread(self, data: bytes) -> None:
        """Give back bytes read past the end of a message: they are the next command."""
        if data:
            self.buffer.unread(data)

    # -- writing ----------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Write without waiting (the splice's end, and the shutdown's 421)."""
        self.put(data)

    def put(self, data: bytes) -> bool:
        """Write without waiting. True when the client is slow to take it (the transport's
        buffer is over its high-water mark): `await drained()` before writing more. A write to
        a connection already lost is dropped (the next read finds the end)."""
        transport = self.transport
        if transport is None:
            return False
        transport.write(data)
        return self._write_paused

    async def send(self, data: bytes) -> None:
        """Write, and wait (up to TimeOut) while the client is slow to take it: TimeoutError;
        ClientGone if the connection is lost meanwhile."""
        if self.put(data):
            await self.drained()

    async def drained(self) -> None:
        """After a `write` that returned True: until the client took enough of it, up to
        TimeOut (TimeoutError); ClientGone if the connection is lost meanwhile. (Two calls,
        not one coroutine per write: a reply of a lock-step dialogue almost never waits.)"""
        if not self._write_paused or self.transport is None:
            return  # under the transport's high-water mark: nothing to wait for
        waiter = self._loop.create_future()
        self._drain_waiter = waiter
        timer = self._loop.call_later(self.timeout, _expire, waiter)
        try:
            await waiter
        except TimeoutError:
            raise  # (an OSError too: the caller logs the write timeout)
        except OSError:
            raise ClientGone from None
        finally:
            timer.cancel()
            self._drain_waiter = None

    # -- TLS, splice, close -----------------------------------------------------------------

    async def start_tls(self, context: ssl.SSLContext, handshake_timeout: float) -> ssl.SSLObject:
        """The server side of TLS on this connection, right after our 220 to STARTTLS. What the
        client sent behind STARTTLS in clear is dropped first. Errors are the handshake's
        (OSError, EOFError, TimeoutError); the connection is then aborted."""
        transport = self.transport
        if transport is None:
            raise ClientGone
        self.buffer.clear()
        self._reading_paused = False  # (start_tls pauses and resumes the socket itself)
        self.tls = True
        # A handshake that fails reaches the caller as start_tls's exception, on either loop:
        # uvloop also calls connection_lost here (asyncio does not), and on_lost would cancel the
        # caller's task before it could log why (docs/dev/eventloop.md).
        self._handshaking = True
        try:
            tls_transport = await self._loop.start_tls(
                transport, self, context, server_side=True,
                ssl_handshake_timeout=handshake_timeout,
            )
        finally:
            self._handshaking = False
        if tls_transport is None:  # (typeshed allows it; asyncio returns a transport or raises)
            raise ConnectionAbortedError("no TLS transport")
        self.transport = tls_transport
        ssl_object: ssl.SSLObject = tls_transport.get_extra_info("ssl_object")
        return ssl_object

    def end_passthrough(self) -> None:
        """Before a splice: what the client sent behind STARTTLS in clear is dropped."""
        self.buffer.clear()
        self._consumed()
        if self.transport is not None and not self.transport.is_reading():
            self._reading_paused = False
            self.transport.resume_reading()

    async def read(self, size: int) -> bytes:
        """Splice end: up to `size` bytes, no TimeOut of its own (the splice keeps one)."""
        while not len(self.buffer):
            if self._eof:
                return b""
            await self._wait(idle_timeout=False)
        chunk = self.buffer.take(size)
        self._consumed()
        return chunk

    async def drain(self) -> None:
        """Splice end: wait while the client is slow to take what was written."""
        if self._lost:
            raise ConnectionResetError("the client's connection was lost")
        if self._write_paused:
            waiter = self._loop.create_future()
            self._drain_waiter = waiter
            try:
                await waiter
            finally:
                self._drain_waiter = None

    def can_write_eof(self) -> bool:
        return self.transport is not None and self.transport.can_write_eof()

    def write_eof(self) -> None:
        if self.transport is not None:
            self.transport.write_eof()

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default if self.transport is None else self.transport.get_extra_info(name, default)

    def close(self) -> None:
        """Close once what was written has gone out, within TimeOut: a graceful close waits
        for the client to take it, and a client that never reads would keep the connection
        (and its MaxConnections place) for ever."""
        transport = self.transport
        if transport is None:
            return
        if self._write_paused:
            transport.abort()  # it already did not read for a whole TimeOut
            return
        if self._closing:
            # Once only: a second close() of a TLS transport drops its SSL protocol, and the
            # abort after TimeOut with it (the connection then lasts the TLS layer's 30 s).
            return
        self._closing = True
        transport.close()
        self._deadline.start(self.timeout)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
