"""A worker's metrics do not ask the kernel for the pid at every change (issue #15: about 9 of
the 27 getpid() calls per message with Workers: 2, strace -c). prometheus-client's multiprocess
values check os.getpid() on every inc/set/observe to notice a fork; a worker never forks a
Python child, so metrics.share_between_processes gives them the pid read once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# os.getpid is counted before prometheus-client is imported: its multiprocess values take
# os.getpid as a default argument at import.
SCRIPT = """
import os, sys
calls = 0
real = os.getpid
def counting():
    global calls
    calls += 1
    return real()
os.getpid = counting
from appliance import metrics
metrics.share_between_processes(sys.argv[1])
before = calls
for _ in range(1000):
    metrics.CONNECTIONS.inc()
    metrics.ACTIVE.inc()
    metrics.SCAN_SECONDS.observe(0.001)
    metrics.ACTIVE.dec()
print(calls - before)
"""


def test_a_workers_metrics_do_not_call_getpid_per_change(tmp_path):
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == 0, f"{result.stdout.strip()} getpid() calls for 4000 changes"
