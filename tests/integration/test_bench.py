"""Smoke test of the benchmark (appliance/lab/bench/, scripts/bench) on a tiny load.

It runs the real thing end to end (private clamd, smtp-sink, the C clamsmtpd, ours,
smtp-source, the latency client, the INSTREAM client) and checks the shape of the results,
not their speed: every target measured, rates above zero, every message accepted.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from appliance.lab import bench

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the benchmark runs as root (smtp-sink -u, "
                       "the C clamsmtpd's path-based SCAN by a root clamd)"),
    pytest.mark.skipif(
        not all(shutil.which(tool) or os.access(f"/usr/sbin/{tool}", os.X_OK)
                for tool in ("smtp-source", "smtp-sink", "clamd"))
        or not os.access(bench.C_DAEMON, os.X_OK),
        reason="needs smtp-source/smtp-sink (postfix), clamd and the C clamsmtpd "
        "(scripts/setup installs them)"),
]


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
    for name in ("direct", "clamd alone", "C clamsmtpd", "ours"):
        assert name in out
        assert name in markdown_path.read_text()
    assert "ours/C msg/s" in out and "every message of every run accepted" in out
    assert markdown_path.read_text().startswith("## Results")
