"""Run commands on a throwaway brand-new Debian 12 root with scripts/fresh (not collected: no
test_ prefix). For tests of what a new machine goes through (installing a .deb, the README's
commands); slow: the first call builds the cached root (a few minutes), every call unpacks it
(seconds) and runs apt and the like for real.

    result = run_fresh("apt-get install -y ./clamsmtp_*.deb", copy=[deb], checkout=False)
    assert result.returncode == 0, result.stdout

Each command's output is in result.logs[i] (index in the order given).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FRESH = REPO / "scripts" / "fresh"

needs_fresh = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="scripts/fresh needs root and unshare (util-linux)")


@dataclass
class FreshResult:
    returncode: int
    stdout: str  # scripts/fresh's own lines: one PASS/FAIL line per command, the result
    logs: list[str]  # each command's output


def run_fresh(*commands: str, copy: list[str | Path] = (), checkout: bool = True,
              timeout: float = 3600, log_dir: Path | None = None) -> FreshResult:
    """`scripts/fresh --run CMD...` in a new root; copied files are in /root/files, the commands
    run in /root/clamsmtp (the checkout, unless `checkout=False`)."""
    import tempfile

    logs = Path(log_dir or tempfile.mkdtemp(prefix="clamsmtp-fresh-logs."))
    argv = [str(FRESH), "--log-dir", str(logs), "--timeout", str(int(timeout))]
    for command in commands:
        argv += ["--run", command]
    if copy:
        argv += ["--copy", *map(str, copy)]
    if not checkout:
        argv.append("--no-checkout")
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout * max(len(commands), 1) + 900)
    texts = [(logs / f"{i:02d}.log").read_text(errors="replace")
             if (logs / f"{i:02d}.log").exists() else "" for i in range(1, len(commands) + 1)]
    return FreshResult(done.returncode, done.stdout + done.stderr, texts)
