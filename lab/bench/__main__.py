"""Benchmark this project's clamsmtpd against the C clamsmtpd, on loopback, in one run.

    smtp-source ─┬─> C clamsmtpd (/usr/sbin/clamsmtpd) ─┬─> smtp-sink (discards)
    (the load)   ├─> ours (python -m appliance.cli)   ─┘
                 └─> smtp-sink directly ("direct": the ceiling without a proxy)
    Python threads ─> clamd INSTREAM ("clamd alone": the ceiling for any scanning proxy)

Both proxies get equivalent configurations (the same private clamd, the same next hop, the same
MaxConnections and TimeOut, each its own TempDirectory) and a fresh process for every run, so
that VmHWM (peak RSS since process start) belongs to that run's load. The two proxies are
alternated over the rounds. Per run:

- throughput: `smtp-source` sends N messages of one size over S parallel sessions, one
  connection per message (smtp-source's default); msg/s = N / wall time. A run counts only if
  every message got 250; rejections are counted by reply text (smtp-source runs with -A).
- latency: a small asyncio client sends messages of the same size over the same number of
  sessions and times each one from the DATA command to the 250 after the final dot.
- CPU seconds per message of the proxy process (utime+stime of /proc/<pid>/stat: all threads)
  and of clamd, from deltas around the smtp-source run.

Every message the bench's own clients send has a new Message-Id, as smtp-source's have: clamd
caches clean results by content hash, so identical messages would be scanned only once.

Timeouts bound everything: per run (smtp-source, latency client, "clamd alone"), per message in
the Python clients, at start-up and at stop. A run with a timeout, a crash or any message not
answered 250 does not count and is reported; a proxy that hung on a load is not tried on it
again in later rounds. Exit status: 0 when every run of ours and of the ceilings counted (the C
clamsmtpd is the reference: what it loses is reported, not a failure), 1 otherwise, 2 when
tools are missing or not run as root.

    python -m lab.bench              # full run, a few minutes
    python -m lab.bench --quick      # under a minute
    python -m lab.bench --scenarios 1k --targets ours --rounds 1   # what to profile
    python -m lab.bench --tls        # the TLS row: both legs TLS against clear

scripts/bench runs scripts/setup first; docs/performance.md explains the columns.
"""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
