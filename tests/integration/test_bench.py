"""The benchmark (lab/bench/, scripts/bench): a smoke test on a tiny load, and the
parts that can be checked without running one.

The smoke test runs the real thing end to end (private clamd, smtp-sink, the C clamsmtpd, ours,
smtp-source, the latency client, the INSTREAM client) and checks the shape of the results, not
their speed: every target measured, rates above zero, every message accepted. The others give
the loads servers that do not answer (a fake clamd, a listener that never greets) with a short
per-message timeout, run execute() on a fake lab and fake loads, and check what the report's
heading gets from commands that fail.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import socket
import socketserver
import struct
import subprocess
import sys
import tempfile
import threading
from collections import Counter

import pytest

import appliance
from lab import bench
from lab.bench import cli, loads, procstat, runs
from lab.bench.loads import LoadResult, SourceResult

as_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="the benchmark runs as root (smtp-sink -u, the C clamsmtpd's "
    "path-based SCAN by a root clamd)")
with_tools = pytest.mark.skipif(
    not all(shutil.which(tool) or os.access(f"/usr/sbin/{tool}", os.X_OK)
            for tool in ("smtp-source", "smtp-sink", "clamd"))
    or not os.access(bench.C_DAEMON, os.X_OK),
    reason="needs smtp-source/smtp-sink (postfix), clamd and the C clamsmtpd "
    "(scripts/setup installs them)")


@as_root
@with_tools
def test_a_tiny_benchmark_measures_every_target_and_every_message_is_accepted(tmp_path, capsys):
    json_path, markdown_path = tmp_path / "bench.json", tmp_path / "bench.md"
    # 4 sessions: the C clamsmtpd's listen backlog of 5 is enough for them (see
    # docs/performance.md for what happens with 20).
    status = bench.main(["--quick", "--rounds", "1", "--messages", "20", "--sessions", "4",
                         "--scenarios", "1k", "--workdir", str(tmp_path / "work"),
                         "--json", str(json_path), "--markdown", str(markdown_path)])
    out = capsys.readouterr().out
    assert status == 0, out

    report = json.loads(json_path.read_text())
    summaries = {s["target"]: s for s in report["summaries"]}
    assert set(summaries) == set(bench.TARGETS)
    for target, summary in summaries.items():
        assert summary["runs"] == summary["counted"] == 1, summary
        assert summary["rate"] > 0, summary
        assert summary["attempted"] == summary["accepted"] > 0, summary
        assert summary["failures"] == {} and summary["errors"] == [], summary
        assert 0 < summary["p50_ms"] <= summary["p99_ms"], summary
        if target in bench.PROXIES:
            assert summary["cpu_ms"] is not None and summary["cpu_ms"] >= 0, summary
            assert summary["clamd_cpu_ms"] is not None, summary
            assert summary["rss_mb"] > 0, summary
    for run in report["runs"]:
        assert run["counts"] and run["messages"] == run["accepted"] == 20, run
        if run["target"] != bench.CLAMD:
            assert run["latency_messages"] == run["latency_accepted"] == 20, run
    assert report["machine"]["nproc"].isdigit()

    # the printed table and the markdown section show the same rows
    for name in ("direct", "clamd alone", "C clamsmtpd", "ours", "ours asyncio", "ours 2clamds",
                 "ours 2workers"):
        assert name in out
        assert name in markdown_path.read_text()
    assert "ours/C msg/s" in out and "every message of every run accepted" in out
    assert markdown_path.read_text().startswith("## Results")


# -- "clamd alone": a scan without a reply is a failure of that message ------------------------


class _Handler(socketserver.BaseRequestHandler):
    """Reads one zINSTREAM stream; answers "stream: OK" if the server's `answer(n)` says so for
    this n-th connection (from 1), else holds the connection open without a word."""

    def handle(self) -> None:
        server = self.server
        stream = self.request.makefile("rb")
        if stream.read(10) != b"zINSTREAM\0":
            return
        while len(header := stream.read(4)) == 4 and (length := struct.unpack("!I", header)[0]):
            stream.read(length)
        with server.lock:
            number = next(server.numbers)
        if server.answer(number):
            self.request.sendall(b"stream: OK\0")
        else:
            server.done.wait(30)


class _FakeClamd(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, answer) -> None:
        super().__init__(path, _Handler)
        self.answer, self.numbers = answer, itertools.count(1)
        self.lock, self.done = threading.Lock(), threading.Event()


@contextlib.contextmanager
def fake_clamd(answer):
    """A unix socket path where a fake clamd listens (see _Handler)."""
    with tempfile.TemporaryDirectory(prefix="bench-") as directory:
        server = _FakeClamd(os.path.join(directory, "clamd.sock"), answer)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield server.server_address
        finally:
            server.done.set()
            server.shutdown()
            server.server_close()
            thread.join()


def test_clamd_alone_counts_a_scan_without_reply_as_a_failure_and_goes_on(monkeypatch):
    monkeypatch.setattr(loads, "message_timeout", lambda size: 1.0)
    with fake_clamd(lambda n: n != 1) as path:  # the first scan never gets a reply
        result = loads.run_clamd_alone(path, b"hello\r\n", 6, 2, 30.0)
    assert result.error is None and not result.hung, result
    assert result.failures == Counter({"no reply within 1 s": 1})
    assert result.accepted == len(result.latencies) == 5


def test_clamd_alone_times_out_only_at_the_runs_deadline(monkeypatch):
    monkeypatch.setattr(loads, "message_timeout", lambda size: 1.0)
    with fake_clamd(lambda n: False) as path:
        # one session: the first scan fails after 1 s, the second is cut at the deadline (1.5 s)
        result = loads.run_clamd_alone(path, b"hello\r\n", 10, 1, 1.5)
    assert result.error == "clamd scans timed out after 2 s" and result.hung, result
    assert result.failures == Counter({"no reply within 1 s": 1})
    assert result.accepted == 0


# -- a stall is a hang: no latency run, not tried again ----------------------------------------


@pytest.mark.skipif(not os.access(loads.tool("smtp-source"), os.X_OK),
                    reason="needs smtp-source (postfix; scripts/setup installs it)")
def test_smtp_source_on_a_server_that_never_greets_stalls_and_is_hung(monkeypatch):
    monkeypatch.setattr(loads, "message_timeout", lambda size: 1.0)
    with socket.create_server(("127.0.0.1", 0)) as listener:  # never accepts: no greeting
        result = loads.run_smtp_source(listener.getsockname()[1], 1024, 1, 2, 30.0)
    assert result.hung and result.error is not None, result
    assert result.error.startswith("smtp-source stalled: no message completed for 1 s"), result


class _FakeLab:
    """What execute() and measure_proxy() use of a Lab; each proxy is a sleeping process, on a
    "port" that names its target (the fake loads tell the targets apart by it)."""

    clamd_pid = None
    sink_port = 0
    ports = {bench.C: 1, bench.OURS: 2}

    def __init__(self, workdir) -> None:
        self.workdir = workdir

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def clamd_cpu(self) -> None:
        return None

    def start_proxy(self, target: str, notes: list[str]):
        spool = self.workdir / f"{target}-spool"
        spool.mkdir(exist_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        return proc, self.ports[target], self.workdir / f"{target}.log", spool


def test_a_proxy_that_stalled_gets_no_latency_run_and_is_not_tried_again(monkeypatch, tmp_path):
    """ours stalls (hung); the C one loses messages (a failure, not a hang): only ours is left
    out of the latency run and of the later rounds."""
    source_calls, latency_calls = Counter(), Counter()

    def fake_source(port, size, sessions, messages, timeout, *, keep_connection=False):
        source_calls[port] += 1
        if source_calls[port] % 2:  # the warm-up before each load
            return SourceResult(0.1, messages, Counter(), None)
        if port == _FakeLab.ports[bench.OURS]:
            return SourceResult(10.0, 0, Counter(), "smtp-source stalled: no message completed "
                                f"for 10 s (0 of {messages} done)", hung=True)
        return SourceResult(1.0, messages - 1, Counter(), "smtp-source completed "
                            f"{messages - 1} of {messages} messages")

    def fake_latency(port, body, messages, sessions, timeout):
        latency_calls[port] += 1
        return LoadResult([0.01] * messages, messages, Counter(), None, 0.1)

    monkeypatch.setattr(runs, "Lab", _FakeLab)
    monkeypatch.setattr(runs, "run_smtp_source", fake_source)
    monkeypatch.setattr(runs, "run_latency_client", fake_latency)
    plan = cli.make_plan(cli.parse_args(["--rounds", "3", "--scenarios", "1k", "--messages", "5",
                                         "--targets", "c,ours"]))
    done = runs.execute(plan, tmp_path, say=lambda text: None)

    assert sorted((r.target, r.round) for r in done) == [
        (bench.C, 1), (bench.C, 2), (bench.C, 3), (bench.OURS, 1)]
    ours = next(r for r in done if r.target == bench.OURS)
    assert ours.hung and "stalled" in ours.error and ours.latency_messages == 0, ours
    assert not any(r.hung for r in done if r.target == bench.C)
    assert latency_calls == Counter({_FakeLab.ports[bench.C]: 3})


# -- the report's heading: no error text for a version -----------------------------------------


def test_command_output_is_empty_when_the_command_fails_or_is_missing(tmp_path):
    assert procstat._command_output(
        ["git", "-C", str(tmp_path), "describe", "--always", "--dirty"]) == ""  # no checkout
    assert procstat._command_output(
        [sys.executable, "-c", "import sys; sys.exit('fatal: broken')"]) == ""
    assert procstat._command_output([str(tmp_path / "missing")]) == ""
    assert procstat._command_output([sys.executable, "-c", "print('v 1.2'); print('x')"]) == "v 1.2"
    assert procstat._command_output(  # a version on stderr, exit status 0: still the answer
        [sys.executable, "-c", "import sys; print('v 3', file=sys.stderr)"]) == "v 3"


def test_the_heading_leaves_the_git_commit_out_outside_a_checkout(monkeypatch):
    monkeypatch.setattr(procstat, "_command_output", lambda argv: "")
    machine = procstat.machine_info()
    assert machine["ours"] == appliance.__version__
    assert machine["clamd"] == machine["C clamsmtpd"] == "?"
    monkeypatch.setattr(procstat, "_command_output",
                        lambda argv: "d48070e" if argv[0] == "git" else "1.0")
    assert procstat.machine_info()["ours"] == f"{appliance.__version__} (git d48070e)"


def test_main_makes_the_plan_once(monkeypatch, capsys):
    made = []

    def make_plan(args):
        made.append(args)
        return real_make_plan(args)

    def execute(plan, workdir, say):
        raise bench.BenchError("not started")

    real_make_plan = cli.make_plan
    monkeypatch.setattr(cli, "make_plan", make_plan)
    monkeypatch.setattr(cli, "check_tools", lambda plan: [])
    monkeypatch.setattr(cli, "execute", execute)
    monkeypatch.setattr(cli, "machine_info", lambda: {})
    assert cli.main(["--quick", "--scenarios", "1k"]) == 1
    assert "could not start the lab: not started" in capsys.readouterr().err
    assert len(made) == 1


@as_root
@pytest.mark.skipif(shutil.which("clamd") is None and not os.path.exists(bench.CLAMD_BINARY),
                    reason="needs clamd (scripts/setup installs it)")
def test_the_tls_row_measures_both_legs_tls_against_clear(tmp_path, capsys):
    """`scripts/bench --tls --quick`: every message accepted in both rows, the TLS row really
    over TLS on both legs (a clear next-hop leg counts as a failure), and the cost line."""
    status = bench.main(["--tls", "--quick", "--workdir", str(tmp_path / "work")])
    out = capsys.readouterr().out
    assert status == 0, out
    assert re.search(r"1 KB x\d+  TLS/TLS .* 60/60 accepted", out), out
    assert re.search(r"100 KB x\d+  clear .* 30/30 accepted", out), out
    assert "1 KB: TLS rate" in out and "100 KB: TLS rate" in out


@as_root
@with_tools
def test_the_wan_row_counts_round_trips(tmp_path, capsys):
    """`scripts/bench --wan --quick`: the three rows, every message accepted, and the writes
    that crossed the delay line towards the next hop per message (each waits for a reply: the
    round trips): direct 2, ours 3 (the group, DATA after the scan, the body), the C one at
    least 4 (it hides PIPELINING); EHLO and QUIT add 0.1 over 20 messages. Counted, not
    timed: speed is the benchmark's to report."""
    status = bench.main(["--wan", "--quick", "--workdir", str(tmp_path / "work")])
    out = capsys.readouterr().out
    assert status == 0, out
    rows = {m[1]: float(m[2]) for m in re.finditer(
        r"  (direct|ours|C clamsmtpd) .* ([\d.]+) next-hop writes/msg", out)}
    assert (rows["direct"], rows["ours"]) == (2.1, 3.1), out
    assert rows["C clamsmtpd"] >= 4.1, out  # (it also writes a message in several pieces)
    assert re.search(r"ours .* pipelined +20/20 accepted", out), out
    assert re.search(r"C clamsmtpd .* one command at a time +20/20 accepted", out), out
