"""ClientTLS: passthrough: copy two connections into each other, byte for byte, until both end.

What flows is the client's TLS session with the next hop: the proxy cannot read it, so it only
moves bytes, with TimeOut counted from the last byte in either direction.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

CHUNK = 1 << 16


class End(Protocol):
    """One side of a splice: the client's channel, or a StreamEnd of the next hop's streams."""

    async def read(self, size: int) -> bytes: ...
    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...
    def can_write_eof(self) -> bool: ...
    def write_eof(self) -> None: ...


class StreamEnd:
    """An asyncio (reader, writer) pair as a splice end."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.read = reader.read
        self.write = writer.write
        self.drain = writer.drain
        self.can_write_eof = writer.can_write_eof
        self.write_eof = writer.write_eof


async def splice(a: End, b: End, timeout: float) -> tuple[int, int, bool]:
    """Copy a -> b and b -> a until both directions have ended (an end of stream is passed on
    as one, with write_eof), or nothing moved for `timeout` seconds in either direction.
    Returns (bytes a -> b, bytes b -> a, whether it ended on the timeout)."""
    loop = asyncio.get_running_loop()
    last = [loop.time()]
    idle = [False]

    async def pump(reader: End, writer: End) -> int:
        moved = 0
        while True:
            try:
                async with asyncio.timeout(timeout):
                    data = await reader.read(CHUNK)
            except TimeoutError:
                if loop.time() - last[0] < timeout:
                    continue  # the other direction is busy: the session is not idle
                idle[0] = True
                return moved
            except OSError:
                return moved
            if not data:
                with contextlib.suppress(OSError, RuntimeError):
                    if writer.can_write_eof():
                        writer.write_eof()
                return moved
            last[0] = loop.time()
            moved += len(data)
            try:
                writer.write(data)  # (to a lost connection: asyncio drops it, uvloop raises)
                async with asyncio.timeout(timeout):
                    await writer.drain()
            except (TimeoutError, OSError, RuntimeError):
                return moved

    forward = loop.create_task(pump(a, b))
    backward = loop.create_task(pump(b, a))
    try:
        done, _ = await asyncio.wait([forward, backward], return_when=asyncio.FIRST_COMPLETED)
        if idle[0]:
            for task in (forward, backward):
                task.cancel()
        await asyncio.wait([forward, backward])
    finally:
        for task in (forward, backward):
            task.cancel()
    sent = forward.result() if not forward.cancelled() else 0
    received = backward.result() if not backward.cancelled() else 0
    return sent, received, idle[0]
