"""What /proc says: the CPU seconds and peak RSS of a process, the busy CPU time and load
average of the whole machine, and what the machine and the software compared are (for the
report's heading)."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path

from .tools import C_DAEMON, CLAMD_BINARY

CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- /proc ------------------------------------------------------------------------------------


def cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a whole process (every thread), or None if it is gone."""
    if pid is None:
        return None
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _tree(pid: int) -> list[int]:
    """`pid` and its children (a daemon with Workers: its workers)."""
    try:
        return [pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]
    except (OSError, ValueError):
        return [pid]


def tree_cpu_seconds(pid: int | None) -> float | None:
    """cpu_seconds of a process and its children now (None if the process is gone): the
    whole of a daemon with Workers, whose parent serves nothing."""
    if pid is None:
        return None
    own = cpu_seconds(pid)
    if own is None:
        return None
    return own + sum(cpu_seconds(child) or 0.0 for child in _tree(pid)[1:])


def tree_peak_rss_kb(pid: int) -> int | None:
    """peak_rss_kb summed over a process and its children (each worker's own peak)."""
    peaks = [peak_rss_kb(p) for p in _tree(pid)]
    return None if peaks[0] is None else sum(p or 0 for p in peaks)


def peak_rss_kb(pid: int) -> int | None:
    """VmHWM: the process's peak resident set size since it started, in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


# -- the machine ------------------------------------------------------------------------------


def _command_output(argv: list[str]) -> str:
    """The first line a command printed (stdout, else stderr), or "" when it is missing, did
    not finish or failed (a non-zero exit status: its output is an error, not the answer)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    if done.returncode != 0:
        return ""
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0].strip() if lines else ""


def machine_info() -> dict[str, str]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    from appliance import __version__

    repo = Path(__file__).resolve().parents[2]  # the checkout: lab/bench/procstat.py
    commit = _command_output(["git", "-C", str(repo), "describe", "--always", "--dirty"])
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": model,
        "memory": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "clamd": _command_output([CLAMD_BINARY, "--version"]) or "?",
        "C clamsmtpd": _command_output([C_DAEMON, "-v"]) or "?",
        "ours": f"{__version__} (git {commit})" if commit else __version__,  # "": no checkout
        "postfix (smtp-source, smtp-sink)": _command_output(
            ["dpkg-query", "-W", "-f", "${Version}", "postfix"]) or "?",
    }


def busy_cpu_seconds() -> float | None:
    """CPU time all processors spent busy since boot (user, nice, system, irq, softirq)."""
    try:
        values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = values
    return (user + nice + system + irq + softirq) / CLK_TCK


def own_cpu_seconds() -> float:
    """CPU time of this process and its children that have been waited for: the whole
    benchmark once everything it started has stopped."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def load_average() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except (OSError, IndexError):
        return "?"
