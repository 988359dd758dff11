"""metrics.forget: a clamd a reload took out of the pool leaves the metrics quietly, with one
process and with Workers (prometheus-client's multiprocess mode cannot remove a label set and
warns on stderr when asked to)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
from prometheus_client import generate_latest
from appliance import metrics
if sys.argv[1] == "workers":
    metrics.share_between_processes(sys.argv[2])
metrics.CLAMD_UP.labels("clamd-a").set(1)
metrics.forget(metrics.CLAMD_UP, "clamd-a")
metrics.forget(metrics.CLAMD_UP, "never-seen")
if sys.argv[1] == "one":
    assert b'clamd="clamd-a"' not in generate_latest(metrics.REGISTRY)
print("ok")
"""


def _run(mode: str, directory: Path) -> subprocess.CompletedProcess[str]:
    # -W error: a warning (prometheus-client's "Removal of labels has not been implemented in
    # multi-process mode") fails the run; it is a fresh process because the mode is global
    return subprocess.run([sys.executable, "-W", "error", "-c", SCRIPT, mode, str(directory)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def test_forget_removes_the_label_set_in_one_process(tmp_path):
    result = _run("one", tmp_path)
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr


def test_forget_is_quiet_in_a_worker(tmp_path):
    result = _run("workers", tmp_path)
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr
