"""InfectedHostLimit / InfectedHostBlock: a client that sent too many infected messages is
refused at connect for a while (containment of an infected machine behind a gateway).

One table for the daemon, kept across SIGHUP, in memory only: it starts empty at every start
(a restart lifts every block). It is bounded: at most `MAX_HOSTS` addresses with recent
infections and `MAX_HOSTS` blocked ones; past that the oldest entry goes (and is logged), so a
flood of infected senders costs memory in proportion to the bound, never more.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque

from . import metrics
from .maillog import log

#: The most addresses tracked (with recent infections), and the most blocked at once.
MAX_HOSTS = 10000


class InfectedHosts:
    """Counts infected messages per client address; blocks an address that reaches the limit."""

    def __init__(self, max_hosts: int = MAX_HOSTS) -> None:
        self.max_hosts = max_hosts
        self.count = 0  # 0: containment off
        self.window = 0.0
        self.block = 0.0
        self._recent: OrderedDict[str, deque[float]] = OrderedDict()
        self._blocked: OrderedDict[str, float] = OrderedDict()  # address -> end (monotonic)
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._heard: set[str] = set()  # blocks another worker started (Workers): not logged here

    def configure(self, limit: tuple[int, int] | None, block: float) -> None:
        """Apply InfectedHostLimit (COUNT, SECONDS) and InfectedHostBlock; at start and SIGHUP.
        Turning it off lifts every block; blocks already running keep their end time."""
        if limit is None:
            if self._blocked:
                log.info("InfectedHostLimit is off: %d blocked host(s) unblocked",
                         len(self._blocked))
            for address in list(self._blocked):
                self._unblock(address, quiet=True)
            self._recent.clear()
            self.count = 0
            return
        count, window = limit
        if count != self.count:
            self._recent.clear()  # the old counts were against another limit
        self.count, self.window, self.block = count, float(window), float(block)

    def blocked_for(self, address: str) -> float:
        """Seconds `address` stays blocked (0: not blocked)."""
        end = self._blocked.get(address)
        if end is None:
            return 0.0
        left = end - time.monotonic()
        if left <= 0:
            self._unblock(address)
            return 0.0
        return left

    def record(self, address: str, now: float | None = None, *, heard: bool = False) -> bool:
        """An infected message from `address` (at `now`, monotonic); True when it makes the
        address blocked now. `heard`: another worker's message (Workers > 1), counted the same,
        but the block it may start is that worker's to log and count in the metrics."""
        if not self.count or address in self._blocked:
            return False
        now = time.monotonic() if now is None else now
        times = self._recent.pop(address, None)
        if times is None:
            times = deque(maxlen=self.count)
            if len(self._recent) >= self.max_hosts:
                self._recent.popitem(last=False)  # the address infected longest ago
        times.append(now)
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) < self.count:
            self._recent[address] = times
            return False
        self._start_block(address, now + self.block, heard)
        return True

    def blocked_until(self) -> list[tuple[str, float]]:
        """The blocks running now: (address, end), for a worker that starts (Workers > 1)."""
        return list(self._blocked.items())

    def recent_infections(self) -> list[tuple[str, float]]:
        """The infected messages still counted against the limit, (address, time): for a
        worker that starts (Workers > 1)."""
        return [(address, when) for address, times in self._recent.items() for when in times]

    def counted(self, address: str, when: float) -> bool:
        """This infected message (address, time) is counted already (heard twice)."""
        return when in self._recent.get(address, ())

    def hear_block(self, address: str, end: float) -> None:
        """A block another worker holds (Workers > 1), until `end` (monotonic)."""
        if self.count and address not in self._blocked and end > time.monotonic():
            self._start_block(address, end, heard=True)

    def _start_block(self, address: str, end: float, heard: bool = False) -> None:
        if len(self._blocked) >= self.max_hosts:
            oldest = next(iter(self._blocked))
            log.warning("infected host table full (%d): %s unblocked early", self.max_hosts,
                        oldest)
            self._unblock(oldest, quiet=True)
        self._blocked[address] = end
        metrics.INFECTED_HOSTS_BLOCKED.inc()
        if heard:
            self._heard.add(address)
        else:
            metrics.INFECTED_HOST_BLOCKS.inc()
            log.warning("host %s blocked for %d s: %d infected messages within %d s "
                        "(InfectedHostLimit)", address, self.block, self.count, self.window)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # (no loop: the end is seen by blocked_for)
        self._timers[address] = loop.call_later(end - time.monotonic(), self._unblock, address)

    def _unblock(self, address: str, quiet: bool = False) -> None:
        if self._blocked.pop(address, None) is None:
            return
        timer = self._timers.pop(address, None)
        if timer is not None:
            timer.cancel()
        metrics.INFECTED_HOSTS_BLOCKED.dec()
        if address in self._heard:
            self._heard.discard(address)
            quiet = True
        if not quiet:
            log.info("host %s no longer blocked (InfectedHostBlock over)", address)

    def __len__(self) -> int:
        return len(self._blocked)
