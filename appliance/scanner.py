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
from collections.abc import Sequence

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


class _Member:
    """A clamd of the pool and its state."""

    def __init__(self, clamd: Clamd, concurrency: int) -> None:
        self.clamd = clamd
        self.turns = asyncio.Semaphore(concurrency)  # scans on this clamd at once
        self.up = True
        self.in_flight = 0
        self.probe: asyncio.Task[None] | None = None


class Scanner:
    """Scans spooled messages with the clamds of `addresses`, at most `concurrency` at a time
    on each."""

    def __init__(
        self,
        addresses: Sequence[Address],
        timeout: float,
        scan_timeout: float,
        concurrency: int,
    ) -> None:
        if not addresses:
            raise ValueError("no clamd address")
        self.addresses = tuple(addresses)
        self.timeout = timeout
        self.scan_timeout = scan_timeout
        self.concurrency = concurrency
        self._members = [
            _Member(Clamd(address, timeout, self.scan_timeout), concurrency)
            for address in self.addresses
        ]
        self._turn = itertools.count()
        self._retired = False
        for member in self._members:
            metrics.CLAMD_UP.labels(member.clamd.name).set(1)

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

    async def scan(
        self, spool: Spool,
        log: logging.LoggerAdapter[logging.Logger] | logging.Logger | None = None,
    ) -> ScanResult:
        """Scan the spooled message; ERROR only when no clamd could (see the module's doc)."""
        log = log or daemon_log
        tried: set[_Member] = set()
        failures = 0
        result = ScanResult(ERROR, detail="no clamd to scan with")
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
        """Take a failed clamd out of the pool, and PING it until it answers."""
        if member.up:
            member.up = False
            self._gauge(member, 0)
            others = sum(m.up for m in self._members)
            daemon_log.error("clamd at %s is out of the pool (%s); %d other clamd%s in it",
                             member.clamd.name, why, others, "" if others == 1 else "s")
        if member.probe is None and not self._retired:
            member.probe = asyncio.get_running_loop().create_task(self._probe(member))

    def _back(self, member: _Member) -> None:
        member.up = True
        self._gauge(member, 1)
        daemon_log.warning("clamd at %s answers again: back in the pool", member.clamd.name)
        if member.probe is not None and member.probe is not asyncio.current_task():
            member.probe.cancel()
        member.probe = None

    def _gauge(self, member: _Member, up: int) -> None:
        if not self._retired:  # a reload's new pool owns the gauge of a clamd in both
            metrics.CLAMD_UP.labels(member.clamd.name).set(up)

    async def _probe(self, member: _Member) -> None:
        wait = PROBE_FIRST
        try:
            while not member.up:
                await asyncio.sleep(wait)
                if member.up:
                    break
                if await member.clamd.ping(min(self.timeout, PROBE_MAX)):
                    self._back(member)
                    break
                wait = min(wait * 2, PROBE_MAX)
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
            metrics.forget(metrics.CLAMD_UP, member.clamd.name)

    def close(self) -> None:
        self.retire()
