"""A WAN delay line for the lab: a TCP relay that holds every chunk for N ms in each direction.

This kernel has no netem (`tc qdisc ... netem delay` is not available), and loopback has no
latency, so round trips cost nothing there. Put this between the proxy and the next hop (or a
client and the next hop) and each round trip costs 2 x N ms, as to a remote MX:

    with DelayLine("127.0.0.1", next_hop_port, delay=0.025) as line:
        ... OutAddress: 127.0.0.1:<line.port> ...

It models latency only, not bandwidth or loss: a chunk read at t is written at t + delay, in
order; a half-close (FIN) is delayed like data. It runs its own event loop in a thread, so a
test or the benchmark can use it from blocking code.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading

from .clamd import free_tcp_port


class DelayLine:
    """Listen on host:port (a free port unless given) and relay each connection to
    target_host:target_port, every chunk held `delay` seconds in each direction."""

    def __init__(self, host: str, target_port: int, *, delay: float = 0.025,
                 target_host: str | None = None, port: int = 0) -> None:
        self.host = host
        self.target = (target_host or host, target_port)
        self.delay = delay
        self.port = port or free_tcp_port()
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._tasks: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        #: with trace=True: (time read, "up" or "down", chunk) of every chunk, for a test or
        #: a look at how a dialogue is batched into writes
        self.trace: list[tuple[float, str, bytes]] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def start(self) -> DelayLine:
        self._thread = threading.Thread(target=self._run, name="delay-line", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(self._shutdown)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> DelayLine:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._connection, self.host, self.port)
            )
        except OSError as e:
            self._error = e
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
            for writer in list(self._writers):  # every socket closed before the loop is
                writer.close()
            loop.run_until_complete(asyncio.sleep(0.01))
        finally:
            loop.close()

    def _shutdown(self) -> None:
        assert self._loop is not None
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        self._loop.call_later(0.05, self._loop.stop)

    async def _connection(self, client_r: asyncio.StreamReader,
                          client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(client_w)
        self.connections += 1
        try:
            try:
                server_r, server_w = await asyncio.wait_for(
                    asyncio.open_connection(*self.target), 10)
            except (OSError, TimeoutError):
                return
            self._writers.add(server_w)
            for writer in (client_w, server_w):
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                await asyncio.gather(self._pump(client_r, server_w, "up"),
                                     self._pump(server_r, client_w, "down"))
            except asyncio.CancelledError:
                pass  # stop(): asyncio's stream callback would log a cancelled task's exception
            finally:
                server_w.close()
        finally:
            client_w.close()
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    direction: str) -> None:
        """One direction: read as it comes, write each chunk `delay` after it was read."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, chunk = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not chunk:
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                    return
                writer.write(chunk)
                await writer.drain()

        sender = asyncio.ensure_future(deliver())
        try:
            while True:
                try:
                    chunk = await reader.read(65536)
                except OSError:
                    chunk = b""
                queue.put_nowait((loop.time() + self.delay, chunk))
                if self.trace is not None:
                    self.trace.append((loop.time(), direction, chunk))
                if not chunk:
                    break
            await sender
        except (OSError, ConnectionError):
            pass
        finally:
            if not sender.done():
                sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError, ConnectionError):
                await sender
