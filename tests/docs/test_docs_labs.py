"""The documented lab, netlab and benchmark commands run here."""

from __future__ import annotations

import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from docskit import IS_ROOT, REPO, SWAKS, documented, entry_argv, needs_root, ok, run, sh, tool
from helpers import free_port


class Lines:
    """A process's output, read by a thread, waited for line by line."""

    def __init__(self, stream) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while not any(text in x for x in self.seen):
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                raise AssertionError(f"{text!r} not in the output:\n" + "\n".join(self.seen))
            self.seen.append(line)
        return "\n".join(self.seen)


@pytest.mark.skipif(tool("clamd") is None or SWAKS is None,
                    reason="needs clamd and swaks (scripts/setup installs them)")
def test_lab_stays_up_and_the_swaks_commands_it_prints_work(tmp_path):
    """README.md: `scripts/lab` stays up and prints two swaks commands, one clean, one with the
    EICAR file; each message the next hop receives is shown. (On free ports, not 10026/10025.)"""
    (command,) = documented("test_lab_stays_up_and_the_swaks_commands_it_prints_work")
    listen, next_hop = free_port(), free_port()
    proc = subprocess.Popen(
        [*entry_argv(command.words), "--listen-port", str(listen), "--next-hop-port",
         str(next_hop), "--workdir", str(tmp_path / "lab")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        output = Lines(proc.stdout)
        text = output.wait_for("Stop with Ctrl-C")
        tries = [x.strip() for x in text.splitlines() if x.strip().startswith("swaks ")]
        assert len(tries) == 2 and "--attach" in tries[1], text
        sent = [sh(attempt) for attempt in tries]
        for result in sent:
            assert result.returncode == 0, result.stdout + result.stderr
        assert "<-  250 Virus Detected; Discarded Email" in sent[1].stdout  # Action: drop
        text = output.wait_for("X-Virus-Scanned=yes")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        text = output.wait_for("lab: stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    received = [x for x in text.splitlines() if "next hop received:" in x]
    assert len(received) == 1 and "from=<alice@example.com>" in received[0], text


def _netlab_problem() -> str | None:
    if not IS_ROOT:
        return "needs root"
    if shutil.which("unshare") is None:
        return "needs unshare (util-linux)"
    from lab import netlab

    problem = netlab.requirements()
    return problem[1] if problem else None


@needs_root
def test_netlab_cleanup_removes_only_leftover_namespaces():
    """`scripts/netlab --cleanup`, in a private mount namespace with its own /run/netns: a
    leftover of a netlab whose process is gone is removed, one of a live process kept."""
    problem = _netlab_problem()
    if problem:
        pytest.skip(f"netlab cannot run here: {problem}")
    (command,) = documented("test_netlab_cleanup_removes_only_leftover_namespaces")
    dead = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    gone, live = f"nlc-{dead}-a1b2c3", f"nlg-{os.getpid()}-d4e5f6"
    argv = " ".join(shlex.quote(a) for a in entry_argv(command.words))
    Path("/run/netns").mkdir(parents=True, exist_ok=True)
    result = ok(run(["unshare", "--mount", "--propagation", "private", "bash", "-c",
                     f"set -e; mount -t tmpfs docs-netns /run/netns; ip netns add {gone}; "
                     f"ip netns add {live}; {argv}; echo LEFT; ip netns list"]))
    left = result.stdout.split("LEFT", 1)[1].split()
    assert live in left and gone not in left, result.stdout
    assert f"removed namespace {gone}" in result.stdout + result.stderr


BENCH_TOOLS = ("smtp-source", "smtp-sink", "clamd")


@needs_root
@pytest.mark.skipif(not all(tool(t) for t in BENCH_TOOLS),
                    reason="needs smtp-source, smtp-sink (postfix) and clamd")
def test_the_small_benchmark_and_its_profile_run(tmp_path):
    """performance.md: the few-seconds run, and the same run under py-spy."""
    commands = documented("test_the_small_benchmark_and_its_profile_run")
    plain = next(c for c in commands if c.words[0] == "scripts/bench")
    profiled = next(c for c in commands if c.words[0].endswith("py-spy"))
    inner = profiled.words[profiled.words.index("--") + 1:]
    assert inner[1:4] == ["-m", "lab.bench", *plain.words[1:2]]
    assert inner[3:] == plain.words[1:], "the profile is of another load than the example"
    # the example run itself is the one profiled: run under py-spy, or alone if it cannot trace
    svg = tmp_path / "ours.svg"
    words = [str(svg) if w == "ours.svg" else w for w in profiled.words]
    words[words.index("--") + 1] = sys.executable
    result = run(entry_argv(words), timeout=120)
    if result.returncode != 0 and re.search(r"ptrace|[Pp]ermission denied", result.stderr):
        result = run(entry_argv(plain.words), timeout=120)
    else:
        assert svg.read_text().lstrip().startswith("<?xml"), result.stderr
    ok(result)
    assert "every message of every run accepted" in result.stdout, result.stdout


def apt_packages_of_setup() -> list[str]:
    """scripts/setup's APT_PACKAGES, read from the script (its words, comments removed)."""
    text = (REPO / "scripts" / "setup").read_text()
    body = re.search(r"^APT_PACKAGES=\((.*?)^\)", text, re.S | re.M)
    assert body, "APT_PACKAGES=( ... ) not found in scripts/setup"
    return [word for line in body.group(1).splitlines() for word in line.split("#")[0].split()]


def test_quoted_setup_output_counts_the_packages_setup_installs():
    """A transcript quoting `setup: apt packages: all N installed` says scripts/setup's N."""
    count = len(apt_packages_of_setup())
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    quoted = [(page.relative_to(REPO), int(n)) for page in pages
              for n in re.findall(r"setup: apt packages: all (\d+) installed", page.read_text())]
    assert quoted, "no transcript quotes scripts/setup's package line any more: drop this test"
    assert [f"{page}: says {n}, scripts/setup installs {count}" for page, n in quoted
            if n != count] == []
