"""The clamd pool: which clamd scans a message, and what happens when one fails.

`ClamAddress` may list several clamds. A scan goes to the healthy clamd with the fewest scans in
flight; one that refuses, times out, passes ScanTimeout or answers garbage is taken out of the
pool and probed with PING in the background until it answers again. A scan that failed because
of its clamd is retried once on another one; the message gets ERROR (a 451) only when no clamd
could scan it. When every clamd is out, scans still try them (as the original did with its one
clamd): a clamd that has just come back is used at once, not only after the next probe.

Scans run on the event loop (instream.py); each clamd has its own semaphore, that clamd's bound on
concurrent scans, so a slow clamd cannot take the turns of the others.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Sequence

from . import metrics
from .addresses import Address
from .instream import CLEAN, ERROR, OVERSIZE, VIRUS, Clamd, Outcome, ScanResult, ScanStatus
from .maillog import log as daemon_log
from .spool import Spool

__all__ = ["CLEAN", "ERROR", "OVERSIZE", "VIRUS", "ScanResult", "ScanStatus", "Scanner"]

#: First and longest wait between two PINGs to a clamd that is out of the pool.
PROBE_FIRST, PROBE_MAX = 1.0, 15.0
#: A scan that failed on its clamd is tried on at most this many clamds in all.
MAX_SCAN_TRIES = 2


class Health:
    """Whether a clamd is in the pool, and when it is PINGed next: this process's own view.
    With `Workers`, the daemon's (shared.SharedHealth: one slot per clamd in shared memory), so
    that a clamd one worker took out is out for all, and one PING brings it back for all."""

    #: one view for the daemon (a slot in shared memory)
    shared = False

    def __init__(self) -> None:
        self.up = True
        self.next_probe = 0.0  # time.monotonic(): one clock for every process of the host
        self.wait = 0.0  # the last wait between two PINGs

    def out(self, now: float) -> None:
        self.up = False
        self.wait = PROBE_FIRST
        self.next_probe = now + PROBE_FIRST


#: How a pool gets its clamds' Health, by clamd name (None: one of its own)
HealthSource = Callable[[str], Health | None]


class _Member:
    """A clamd of the pool and its state."""

    def __init__(self, clamd: Clamd, concurrency: int, health: Health) -> None:
        self.clamd = clamd
        self.turns = asyncio.Semaphore(concurrency)  # scans on this clamd at once
        self.health = health
        self.in_flight = 0
        self.probe: asyncio.Task[None] | None = None

    @property
    def up(self) -> bool:
        return self.health.up


class Scanner:
    """Scans spooled messages with the clamds of `addresses`, at most `concurrency` at a time
    on each."""

    def __init__(
        self,
        addresses: Sequence[Address],
        timeout: float,
        scan_timeout: float,
        concurrency: int,
        health: HealthSource | None = None,
    ) -> None:
        """`health`: the daemon's view of each clamd (Workers), else the pool keeps its own."""
        if not addresses:
            raise ValueError("no clamd address")
        self.addresses = tuple(addresses)
        self.timeout = timeout
        self.scan_timeout = scan_timeout
        self.concurrency = concurrency
        self._members = []
        for address in self.addresses:
            clamd = Clamd(address, timeout, self.scan_timeout)
            shared = health(clamd.name) if health is not None else None
            self._members.append(_Member(clamd, concurrency, shared or Health()))
        self._turn = itertools.count()
        self._retired = False
        #: clamd_up is this process's to show (Workers: 1); with Workers, the daemon's metrics
        #: read it from the shared slots (metrics.share_between_processes)
        self._own_gauge = health is None
        for member in self._members:
            self._gauge(member, 1)

    def _pick(self, tried: set[_Member]) -> _Member | None:
        """The clamd for the next try: an untried one in the pool with the fewest scans in
        flight (taking turns among equals); if none is in the pool, an untried one out of it."""
        if len(self._members) == 1:  # (the usual ClamAddress)
            return None if self._members[0] in tried else self._members[0]
        turn = next(self._turn)
        size = len(self._members)
        order = [self._members[(turn + i) % size] for i in range(size)]
        for want_up in (True, False):
            candidates = [m for m in order if m.up == want_up and m not in tried]
            if candidates:
                return min(candidates, key=lambda m: m.in_flight)
        return None

    def _watch_down(self) -> None:
        """Every clamd out of the pool has a probe here: one another worker took out too (its
        prober may have died; the PINGs are shared out by the slot's next_probe)."""
        for member in self._members:
            if member.probe is None and not member.up and not self._retired:
                member.probe = asyncio.get_running_loop().create_task(self._probe(member))

    async def scan(
        self, spool: Spool,
        log: logging.LoggerAdapter[logging.Logger] | logging.Logger | None = None,
    ) -> ScanResult:
        """Scan the spooled message; ERROR only when no clamd could (see the module's doc)."""
        log = log or daemon_log
        tried: set[_Member] = set()
        failures = 0
        result = ScanResult(ERROR, detail="no clamd to scan with")
        if len(self._members) > 1 and self._members[0].health.shared:
            self._watch_down()
        while failures < MAX_SCAN_TRIES:
            member = self._pick(tried)
            if member is None:
                break
            if tried:
                log.warning("scanning again on clamd at %s", member.clamd.name)
            tried.add(member)
            outcome = await self._attempt(member, spool)
            result = outcome.result
            if not outcome.clamd_failed:
                if not member.up:
                    self._back(member)
                metrics.child(metrics.CLAMD_SCANS, member.clamd.name, result.status.lower()).inc()
                return result
            metrics.child(metrics.CLAMD_SCANS, member.clamd.name, "failed").inc()
            log.warning("clamd at %s failed: %s", member.clamd.name, result.detail)
            self._out(member, result.detail)
            if outcome.sent:  # a refused connection costs nothing: only real tries count
                failures += 1
        return result

    async def _attempt(self, member: _Member, spool: Spool) -> Outcome:
        member.in_flight += 1
        try:
            # ScanTimeout counts from the start of the scan: waiting for a turn on this clamd
            # is not its failure.
            async with member.turns:
                with spool.open() as body:
                    return await member.clamd.scan(body)
        except OSError as e:
            detail = f"cannot read spool file: {e.strerror or e}"
            return Outcome(ScanResult(ERROR, detail=detail, clamd=member.clamd.name))
        finally:
            member.in_flight -= 1

    def _out(self, member: _Member, why: str) -> None:
        """Take a failed clamd out of the pool, and PING it until it answers. (Out already:
        another worker took it out, and said so.)"""
        if member.up:
            member.health.out(time.monotonic())
            self._gauge(member, 0)
            others = sum(m.up for m in self._members)
            daemon_log.error("clamd at %s is out of the pool (%s); %d other clamd%s in it",
                             member.clamd.name, why, others, "" if others == 1 else "s")
        if member.probe is None and not self._retired:
            member.probe = asyncio.get_running_loop().create_task(self._probe(member))

    def _back(self, member: _Member) -> None:
        member.health.up = True
        self._gauge(member, 1)
        daemon_log.warning("clamd at %s answers again: back in the pool", member.clamd.name)
        if member.probe is not None and member.probe is not asyncio.current_task():
            member.probe.cancel()
        member.probe = None

    def _gauge(self, member: _Member, up: int) -> None:
        # a reload's new pool owns the gauge of a clamd in both; a shared one is the daemon's
        if not self._retired and self._own_gauge:
            metrics.CLAMD_UP.labels(member.clamd.name).set(up)

    async def _probe(self, member: _Member) -> None:
        """PING at 1, 2, 4, 8, then every 15 s. The schedule is in the clamd's Health: with
        Workers, whichever worker's turn comes first PINGs, and the others wait for the next
        turn (two at the same instant: two PINGs, no harm)."""
        health = member.health
        try:
            while not health.up:
                now = time.monotonic()
                if now < health.next_probe:
                    await asyncio.sleep(health.next_probe - now)
                    continue
                health.wait = min(health.wait * 2, PROBE_MAX)
                health.next_probe = now + health.wait
                if await member.clamd.ping(min(self.timeout, PROBE_MAX)):
                    if not health.up:
                        self._back(member)
                    break
        finally:
            if member.probe is asyncio.current_task():
                member.probe = None

    async def check(self, timeout: float) -> list[str]:
        """The clamds that do not answer PING within `timeout` (at start-up and reload)."""
        answers = await asyncio.gather(*(m.clamd.ping(timeout) for m in self._members))
        return [m.clamd.name for m, ok in zip(self._members, answers, strict=True) if not ok]

    def retire(self) -> None:
        """A reload replaced this scanner: no more probes (scans in flight still finish)."""
        self._retired = True
        for member in self._members:
            if member.probe is not None:
                member.probe.cancel()
            if self._own_gauge:
                metrics.forget(metrics.CLAMD_UP, member.clamd.name)

    def close(self) -> None:
        self.retire()
