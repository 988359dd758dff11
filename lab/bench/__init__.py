"""The benchmark: this project's clamsmtpd against the C clamsmtpd on loopback, with the ceilings
"direct" and "clamd alone" (`python -m lab.bench`, scripts/bench). What it measures
and how: __main__.py; the columns: docs/performance.md.

- workload.py: the targets, the loads (Scenario, SCENARIOS), the Plan, the messages.
- tools.py: where smtp-source, smtp-sink, clamd and the C clamsmtpd are; check_tools().
- procstat.py: CPU seconds and peak RSS from /proc; the machine, its CPU time and load.
- loads.py: smtp-source, the asyncio latency client, "clamd alone" (INSTREAM).
- lab.py: the private clamd, smtp-sink and a fresh proxy per run (Lab).
- results.py: Run, Summary, summarize().
- runs.py: one measurement per target, scenario and round; execute().
- report.py: the tables as text and markdown, the result line, JSON (Report).
- tlsrow.py: the TLS row (--tls): its own client and next hop, TLS on both legs vs clear.
- cli.py: the options, run_benchmark() and main().

A module imports only modules above it in this list.
"""

from __future__ import annotations

from .cli import main, make_plan, parse_args, run_benchmark
from .lab import BenchError, Lab
from .loads import run_clamd_alone, run_latency_client, run_smtp_source
from .report import Report
from .results import Run, Summary, summarize
from .runs import execute
from .tools import C_DAEMON, CLAMD_BINARY, check_tools
from .workload import (
    CLAMD,
    DIRECT,
    OURS,
    OURSAIO,
    PROXIES,
    SCENARIOS,
    TARGETS,
    C,
    Plan,
    Scenario,
    message_body,
    message_header,
    message_timeout,
    source_payload,
)

__all__ = [
    "C",
    "CLAMD",
    "CLAMD_BINARY",
    "C_DAEMON",
    "DIRECT",
    "OURS",
    "OURSAIO",
    "PROXIES",
    "SCENARIOS",
    "TARGETS",
    "BenchError",
    "Lab",
    "Plan",
    "Report",
    "Run",
    "Scenario",
    "Summary",
    "check_tools",
    "execute",
    "main",
    "make_plan",
    "message_body",
    "message_header",
    "message_timeout",
    "parse_args",
    "run_benchmark",
    "run_clamd_alone",
    "run_latency_client",
    "run_smtp_source",
    "source_payload",
    "summarize",
]
