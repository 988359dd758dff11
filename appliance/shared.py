"""What stays one for the whole daemon when `Workers` > 1: the count of open connections
(MaxConnections), the connection ids, the table of the proxy's own outgoing connections (the
loop guard), the clamd pool's health, and InfectedHostLimit's table. Why this shape:
docs/dev/workers.md.

It lives in one anonymous shared memory mapping that the parent makes before the first fork,
so every worker (and every replacement of one) sees the same pages. Each worker writes only
its own slots and ports, and nothing takes a lock: a worker killed at any instant leaves
nothing held, and the parent clears what was its (`forget`) before a replacement starts.
With `Workers: 1` none of this exists: the daemon runs as it always did.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import mmap
import socket
import time
from collections.abc import Iterator
from typing import Any, TypeVar

from .addresses import plain_ip
from .containment import InfectedHosts
from .scanner import Health
from .upstream import OwnConnections

_Session = TypeVar("_Session")

#: The first connection id, as the one-process daemon (maillog): ids stay `%06X`-shaped.
FIRST_ID = 0x100000
_PORTS = 1 << 16
#: A port's state in the loop guard's table.
_FREE, _BOUND, _CONNECTED = 0, 1, 2
#: How often a worker looks again at a port another worker is still connecting from.
_POLL = 0.01
#: Bytes of lines packed in one datagram of a handover to a new worker (tell_all).
_DATAGRAM = 16384
#: clamds whose health the workers share (ClamAddress entries past this: each worker its own)
CLAMD_SLOTS = 256
_CLAMD_NAME = 255  # bytes of a clamd's name (a path or host:port) kept in its slot


class _ClamdSlot(ctypes.Structure):
    """One clamd's health for the daemon. `name` and `generation` are written by the parent
    only (at start and at each good SIGHUP, before the workers are told); `down`, `next_probe`
    and `wait` by any worker (whole aligned words: a reader sees the old or the new value)."""

    _fields_ = [
        ("generation", ctypes.c_uint64),  # + 1 each time the slot is given to another clamd
        ("next_probe", ctypes.c_double),
        ("wait", ctypes.c_double),
        ("down", ctypes.c_uint8),
        ("listed", ctypes.c_uint8),  # in the ClamAddress in force (what the metrics show)
        ("name", ctypes.c_char * (_CLAMD_NAME + 1)),
    ]


class DaemonState:
    """The shared pages; `worker(index)` is one worker's view of them."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        counts = ctypes.c_int64 * workers
        ports = ctypes.c_uint8 * _PORTS
        addresses = (ctypes.c_uint8 * 16) * _PORTS
        clamds = _ClamdSlot * CLAMD_SLOTS
        kinds = (counts, counts, ports, ports, addresses, clamds)
        sizes = [ctypes.sizeof(kind) for kind in kinds]
        sizes = [-(-size // 8) * 8 for size in sizes]  # each part on an 8-byte boundary
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
        #: the clamd pool's health, a slot per clamd (set_clamds)
        self.clamds = clamds.from_buffer(self._map, offsets[5])
        #: one datagram inbox per worker slot, [read end, write end]: the InfectedHostLimit
        #: news. Kept open by the parent, so a replacement finds what was sent meanwhile.
        self.inboxes = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
                        for _ in range(workers)]
        for pair in self.inboxes:
            for end in pair:
                end.setblocking(False)

    def close(self) -> None:
        """The parent, at exit."""
        for pair in self.inboxes:
            for end in pair:
                end.close()

    def set_clamds(self, names: list[str]) -> None:
        """The parent, before the first fork and at each good SIGHUP before telling the
        workers: a slot for each clamd of ClamAddress. A clamd already in one keeps it (and its
        health); a new one takes a slot of a clamd no longer listed, starting up."""
        wanted = [name.encode("utf-8", "replace") for name in names]
        slots = self.clamds
        kept = {slot.name for slot in slots if slot.listed and slot.name in wanted}
        for slot in slots:  # (one listed again after a while starts afresh, as a new one)
            slot.listed = slot.name in kept
        free = (slot for slot in slots if not slot.listed)
        for name in wanted:
            if name in kept or len(name) > _CLAMD_NAME:
                continue  # (a name too long: its health stays each worker's own)
            found = next(free, None)
            if found is None:
                return  # more clamds than slots: the others' health stays each worker's own
            slot = found
            slot.generation += 1
            slot.name = name
            slot.down, slot.next_probe, slot.wait, slot.listed = 0, 0.0, 0.0, 1

    def clamd_health(self) -> list[tuple[str, bool]]:
        """(name, up) of each clamd of the ClamAddress in force (the metrics' clamd_up)."""
        return [(slot.name.decode("utf-8", "replace"), not slot.down)
                for slot in self.clamds if slot.listed]

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

    def tell(self, message: str, to: int | None = None) -> None:
        """Send `message` to worker `to`, or to every other worker. A full inbox (a worker
        stopped for a long while) loses it: containment is best effort, mail flow is not."""
        for index, (_, inbox) in enumerate(self.state.inboxes):
            if index != self.index and to in (None, index):
                with contextlib.suppress(OSError):
                    inbox.send(message.encode())

    async def tell_all(self, lines: list[str], to: int, timeout: float = 5.0) -> None:
        """Send many `lines` to worker `to`, packed in datagrams, waiting while its inbox is
        full (its buffer holds a few hundred small datagrams): for a replacement's handover,
        which may be thousands of lines. Given up after `timeout`."""
        inbox = self.state.inboxes[to][1]
        loop = asyncio.get_running_loop()
        packed: list[str] = []
        size = 0
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(timeout):
                for line in [*lines, ""]:
                    if packed and (not line or size + len(line) > _DATAGRAM):
                        await loop.sock_sendall(inbox, "\n".join(packed).encode())
                        packed, size = [], 0
                    packed.append(line)
                    size += len(line) + 1

    def messages(self) -> Iterator[str]:
        """What the other workers sent, line by line, until the inbox is empty (never
        blocks)."""
        inbox = self.state.inboxes[self.index][0]
        while True:
            try:
                datagram = inbox.recv(_DATAGRAM * 2)
            except OSError:  # (BlockingIOError: empty)
                return
            yield from datagram.decode("ascii", "replace").split("\n")

    def clamd_health(self, name: str) -> SharedHealth | None:
        """The daemon's view of clamd `name`, None if it has no slot (scanner.HealthSource)."""
        wanted = name.encode("utf-8", "replace")
        for slot in self.state.clamds:
            if slot.listed and slot.name == wanted:
                return SharedHealth(slot)
        return None

    def infected_hosts(self) -> SharedInfectedHosts:
        return SharedInfectedHosts(self)

    def sessions(self) -> SharedSessions[Any]:  # (of the relay's sessions: a floor above)
        return SharedSessions(self)

    def own_connections(self) -> SharedOwnConnections:
        return SharedOwnConnections(self)


class SharedSessions(set[_Session]):
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


class SharedHealth(Health):
    """A clamd's health in its shared slot: what one worker sees, all see. If the parent gives
    the slot to another clamd (a SIGHUP took this one out of ClamAddress) while this worker's
    old pool still scans with it, the old pool goes on with a view of its own."""

    shared = True

    def __init__(self, slot: _ClamdSlot) -> None:
        self._slot = slot
        self._generation = slot.generation
        self._own = Health()

    def _mine(self) -> _ClamdSlot | Health:
        return self._slot if self._slot.generation == self._generation else self._own

    @property
    def up(self) -> bool:
        slot = self._mine()
        return not slot.down if isinstance(slot, _ClamdSlot) else slot.up

    @up.setter
    def up(self, value: bool) -> None:
        slot = self._mine()
        if isinstance(slot, _ClamdSlot):
            slot.down = not value
        else:
            slot.up = value

    @property
    def next_probe(self) -> float:
        return float(self._mine().next_probe)

    @next_probe.setter
    def next_probe(self, value: float) -> None:
        self._mine().next_probe = value

    @property
    def wait(self) -> float:
        return float(self._mine().wait)

    @wait.setter
    def wait(self, value: float) -> None:
        self._mine().wait = value


class SharedInfectedHosts(InfectedHosts):
    """InfectedHostLimit for the daemon: each worker keeps the whole table, told of every
    other worker's infected messages (counted as its own, with their time) and, when it
    starts, of the blocks running (a replacement asks the others: `start`)."""

    def __init__(self, worker: WorkerState) -> None:
        super().__init__()
        self.worker = worker
        self._handovers: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """With the loop running: read the news as it comes, and ask for the blocks now."""
        loop = asyncio.get_running_loop()
        loop.add_reader(self.worker.state.inboxes[self.worker.index][0], self.receive)
        self.worker.tell(f"H {self.worker.index}")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(
                self.worker.state.inboxes[self.worker.index][0])
        for task in self._handovers:
            task.cancel()

    def record(self, address: str, now: float | None = None, *, heard: bool = False) -> bool:
        now = time.monotonic() if now is None else now
        if not heard and self.count:
            self.receive()  # the others' news first: together they may reach the limit
            self.worker.tell(f"I {now!r} {address}")
        return super().record(address, now, heard=heard)

    def blocked_for(self, address: str) -> float:
        self.receive()  # news sent before this client connected counts for it
        return super().blocked_for(address)

    def receive(self) -> None:
        for message in self.worker.messages():
            kind, _, rest = message.partition(" ")
            try:
                if kind == "I":
                    when, address = rest.split(" ", 1)
                    if not self.counted(address, float(when)):  # (several may hand it over)
                        self.record(address, float(when), heard=True)
                elif kind == "B":
                    until, address = rest.split(" ", 1)
                    self.hear_block(address, float(until))
                elif kind == "H":
                    self._hand_over(int(rest))
            except ValueError:
                continue  # (written by our own workers: not expected)


    def _hand_over(self, to: int) -> None:
        """A new worker asked (`H`): the blocks running and the infections still counted
        below the limit, so that a worker's death loses neither (docs/dev/workers.md)."""
        lines = [f"B {end!r} {host}" for host, end in self.blocked_until()]
        lines += [f"I {when!r} {host}" for host, when in self.recent_infections()]
        if lines:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # (no loop: not a serving worker)
            task = loop.create_task(self.worker.tell_all(lines, to))
            self._handovers.add(task)
            task.add_done_callback(self._handovers.discard)


def _packed(host: str) -> bytes:
    """An address as 16 bytes, IPv4 as v4-mapped IPv6: one form for either family."""
    ip = ipaddress.ip_address(plain_ip(host))
    if ip.version == 4:
        ip = ipaddress.IPv6Address(f"::ffff:{ip}")
    return ip.packed
