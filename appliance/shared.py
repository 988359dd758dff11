"""What stays one for the whole daemon when `Workers` > 1: the count of open connections
(MaxConnections), the connection ids, and the table of the proxy's own outgoing connections
(the loop guard). Why this shape: docs/dev/workers.md.

It lives in one anonymous shared memory mapping that the parent makes before the first fork,
so every worker (and every replacement of one) sees the same pages. Each worker writes only
its own slots and ports, and nothing takes a lock: a worker killed at any instant leaves
nothing held, and the parent clears what was its (`forget`) before a replacement starts.
With `Workers: 1` none of this exists: the daemon runs as it always did.
"""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import mmap
from collections.abc import Iterator

from .addresses import plain_ip
from .upstream import OwnConnections

#: The first connection id, as the one-process daemon (maillog): ids stay `%06X`-shaped.
FIRST_ID = 0x100000
_PORTS = 1 << 16
#: A port's state in the loop guard's table.
_FREE, _BOUND, _CONNECTED = 0, 1, 2
#: How often a worker looks again at a port another worker is still connecting from.
_POLL = 0.01


class DaemonState:
    """The shared pages; `worker(index)` is one worker's view of them."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        counts = ctypes.c_int64 * workers
        ports = ctypes.c_uint8 * _PORTS
        addresses = (ctypes.c_uint8 * 16) * _PORTS
        sizes = [ctypes.sizeof(kind) for kind in (counts, counts, ports, ports, addresses)]
        self._map = mmap.mmap(-1, sum(sizes))  # anonymous and MAP_SHARED: one copy across fork
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        #: open sessions, per worker
        self.active = counts.from_buffer(self._map, offsets[0])
        #: connection ids issued, per worker slot (a replacement goes on from its predecessor)
        self.issued = counts.from_buffer(self._map, offsets[1])
        #: per local port of an outgoing connection: the worker's index + 1 that bound it ...
        self.owner = ports.from_buffer(self._map, offsets[2])
        #: ... _FREE, _BOUND or _CONNECTED ...
        self.port_state = ports.from_buffer(self._map, offsets[3])
        #: ... and its local address, as IPv6 (IPv4 v4-mapped)
        self.address = addresses.from_buffer(self._map, offsets[4])

    def open_connections(self) -> int:
        return sum(self.active)

    def forget(self, index: int) -> None:
        """Worker `index` is dead (parent, before its replacement): its sessions are gone, its
        outgoing ports too. Its count of issued ids stays, so ids are never issued twice."""
        self.active[index] = 0
        mark = index + 1
        for port in range(_PORTS):
            if self.owner[port] == mark:
                self.port_state[port] = _FREE
                self.owner[port] = 0

    def worker(self, index: int) -> WorkerState:
        return WorkerState(self, index)


class WorkerState:
    """One worker's handle on the daemon-wide state."""

    def __init__(self, state: DaemonState, index: int) -> None:
        self.state = state
        self.index = index

    def claim(self, limit: int) -> bool:
        """Count one more open connection if the daemon has fewer than `limit`.

        Counted first, checked after: two workers taking the last place at the same instant
        may both refuse (one 421 too many, retried by the client), but never both accept.
        """
        active = self.state.active
        active[self.index] += 1
        if self.state.open_connections() > limit:
            active[self.index] -= 1
            return False
        return True

    def release(self) -> None:
        self.state.active[self.index] -= 1

    def connection_ids(self) -> Iterator[int]:
        """This worker's ids: FIRST_ID + k * workers + index for its k-th connection, so no two
        workers (nor a worker and its replacement) ever issue the same id."""
        issued, workers, index = self.state.issued, self.state.workers, self.index
        while True:
            k = issued[index]
            issued[index] = k + 1
            yield (FIRST_ID + k * workers + index) & 0xFFFFFFFF or FIRST_ID

    def sessions(self) -> SharedSessions:
        return SharedSessions(self)

    def own_connections(self) -> SharedOwnConnections:
        return SharedOwnConnections(self)


class SharedSessions(set):  # type: ignore[type-arg]
    """The worker's live sessions (what `RelayContext.sessions` holds); a session leaving
    gives its place back to the daemon-wide count. The place is taken by `claim` in the
    server, before the session is made: a session in this set has been counted once."""

    def __init__(self, worker: WorkerState) -> None:
        super().__init__()
        self.worker = worker

    def discard(self, item: object) -> None:
        if item in self:
            super().discard(item)
            self.worker.release()


class SharedOwnConnections(OwnConnections):
    """The loop guard's table for every worker: a connection worker A made to a next hop
    that comes back in to worker B is recognised by B too."""

    def __init__(self, worker: WorkerState) -> None:
        super().__init__()
        self.worker = worker

    def bound(self, port: int) -> None:
        super().bound(port)
        state = self.worker.state
        state.owner[port] = self.worker.index + 1
        state.port_state[port] = _BOUND

    def connected(self, port: int, local: tuple[str, int]) -> None:
        super().connected(port, local)
        state = self.worker.state
        if state.owner[port] == self.worker.index + 1:
            state.address[port][:] = list(_packed(local[0]))
            state.port_state[port] = _CONNECTED  # after the address: readers see a whole one

    def closed(self, port: int) -> None:
        super().closed(port)
        state = self.worker.state
        if state.owner[port] == self.worker.index + 1:
            state.port_state[port] = _FREE
            state.owner[port] = 0

    async def is_ours(self, peer: tuple[str, int], wait: float = 5.0) -> bool:
        if await super().is_ours(peer, wait):
            return True
        state, port = self.worker.state, peer[1]
        if state.owner[port] in (0, self.worker.index + 1):
            return False  # nobody's, or this worker's own (answered above)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while state.port_state[port] == _BOUND and loop.time() < deadline:
            await asyncio.sleep(_POLL)  # the other worker's connect() has not returned yet
        if state.port_state[port] != _CONNECTED:
            return False
        return bytes(state.address[port]) == _packed(peer[0])


def _packed(host: str) -> bytes:
    """An address as 16 bytes, IPv4 as v4-mapped IPv6: one form for either family."""
    ip = ipaddress.ip_address(plain_ip(host))
    if ip.version == 4:
        ip = ipaddress.IPv6Address(f"::ffff:{ip}")
    return ip.packed
