"""The results: a Run (one target under one scenario in one round) and the Summary of the
rounds of a target under a scenario."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from .workload import CLAMD


@dataclass
class Run:
    """One measurement of one target under one scenario in one round."""

    target: str
    scenario: str
    round: int
    messages: int = 0
    accepted: int = 0
    seconds: float = 0.0
    failures: Counter = field(default_factory=Counter)
    error: str | None = None  # the run did not complete (timeout, crash, ...)
    hung: bool = False  # the load timed out or stalled: not run on this scenario again
    proxy_cpu: float | None = None  # seconds during the throughput load
    clamd_cpu: float | None = None
    rss_kb: int | None = None
    latencies: list[float] = field(default_factory=list)  # seconds, DATA -> 250
    latency_messages: int = 0
    latency_accepted: int = 0
    latency_failures: Counter = field(default_factory=Counter)
    latency_error: str | None = None
    notes: list[str] = field(default_factory=list)
    wall: float = 0.0  # seconds the whole measurement took (start, warm-up, loads, stop)

    @property
    def counts(self) -> bool:
        """Throughput counts only when the run completed and every message was accepted."""
        return self.error is None and self.messages > 0 and self.accepted == self.messages

    @property
    def latency_counts(self) -> bool:
        return (self.latency_error is None and self.latency_messages > 0
                and self.latency_accepted == self.latency_messages)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Summary:
    """The rounds of one target under one scenario, combined."""

    target: str
    scenario: str
    runs: int
    counted: int
    rate: float | None  # median msg/s of the counted runs
    rate_min: float | None
    rate_max: float | None
    p50_ms: float | None
    p99_ms: float | None
    latency_samples: int
    latency_runs: int  # runs that timed messages
    latency_counted: int  # ... of which every message was accepted (the p50/p99 come from them)
    cpu_ms: float | None  # median proxy CPU ms per message
    clamd_cpu_ms: float | None
    rss_mb: float | None  # max VmHWM over the runs
    attempted: int
    accepted: int
    failures: dict[str, int]
    errors: list[str]
    notes: list[str]

    @property
    def ok(self) -> bool:
        return self.counted == self.runs and self.runs > 0 and self.accepted == self.attempted


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), interpolated between the closest ranks."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(runs: Sequence[Run], target: str, scenario: str) -> Summary:
    mine = [r for r in runs if r.target == target and r.scenario == scenario]
    counted = [r for r in mine if r.counts]
    rates = [r.rate for r in counted]
    # "clamd alone" times every scan of its load; the others have a separate latency run
    timed = [r for r in mine if r.latency_messages or r.target == CLAMD]
    timed_counted = [r for r in timed if (r.counts if r.target == CLAMD else r.latency_counts)]
    latencies = [x for r in timed_counted for x in r.latencies]

    def per_message(attr: str) -> float | None:
        values = [getattr(r, attr) / r.messages * 1000 for r in counted
                  if getattr(r, attr) is not None]
        return statistics.median(values) if values else None

    failures: Counter = Counter()
    for r in mine:
        failures.update(r.failures)
        failures.update(r.latency_failures)
    rss = [r.rss_kb for r in mine if r.rss_kb is not None]
    errors = [f"round {r.round}: {r.error}" for r in mine if r.error]
    errors += [f"round {r.round} (latency): {r.latency_error}" for r in mine if r.latency_error]
    notes = list(dict.fromkeys(n for r in mine for n in r.notes))
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    return Summary(
        target=target,
        scenario=scenario,
        runs=len(mine),
        counted=len(counted),
        rate=statistics.median(rates) if rates else None,
        rate_min=min(rates) if rates else None,
        rate_max=max(rates) if rates else None,
        p50_ms=p50 * 1000 if p50 is not None else None,
        p99_ms=p99 * 1000 if p99 is not None else None,
        latency_samples=len(latencies),
        latency_runs=len(timed),
        latency_counted=len(timed_counted),
        cpu_ms=per_message("proxy_cpu"),
        clamd_cpu_ms=per_message("clamd_cpu"),
        rss_mb=max(rss) / 1024 if rss else None,
        attempted=sum(r.messages + r.latency_messages for r in mine),
        accepted=sum(r.accepted + r.latency_accepted for r in mine),
        failures=dict(failures.most_common()),
        errors=errors,
        notes=notes,
    )
