"""The measurements: one run of a proxy, of the direct ceiling or of clamd alone under a
scenario; execute() starts the lab, measures every (round, scenario, target) and stops it."""

from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path

from .. import stop_process
from .lab import BenchError, Lab, _file_size, _log_lines
from .loads import run_clamd_alone, run_latency_client, run_smtp_source
from .procstat import cpu_seconds, tree_cpu_seconds, tree_peak_rss_kb
from .results import Run, percentile
from .workload import (
    CLAMD,
    DIRECT,
    HOST,
    KB,
    PROXIES,
    TARGET_NAMES,
    Plan,
    Scenario,
    message_body,
)


def measure_proxy(lab: Lab, plan: Plan, target: str, scenario: Scenario, round_no: int) -> Run:
    run = Run(target, scenario.key, round_no)
    messages = plan.messages[scenario.key]
    timeout = plan.timeouts[scenario.key]
    try:
        proc, port, log_path, spool = lab.start_proxy(target, run.notes)
    except BenchError as error:
        run.error = str(error)
        return run
    log_offset = _file_size(log_path)
    try:
        # Warm-up (not counted): the first connections pay for imports, thread starts, ...
        warm = run_smtp_source(port, KB, min(scenario.sessions, 4),
                               2 * min(scenario.sessions, 4), 30.0)
        if warm.error or warm.failures:
            run.error = "warm-up failed: " + (warm.error or ", ".join(warm.failures))
            return run
        cpu0, clamd0 = tree_cpu_seconds(proc.pid), lab.clamd_cpu()
        result = run_smtp_source(port, scenario.size, scenario.sessions, messages, timeout,
                                 keep_connection=plan.keep_connection)
        cpu1, clamd1 = tree_cpu_seconds(proc.pid), lab.clamd_cpu()
        run.messages, run.seconds, run.failures = messages, result.seconds, result.failures
        run.accepted = max(0, min(result.completed, messages) - sum(result.failures.values()))
        run.error, run.hung = result.error, result.hung
        if None not in (cpu0, cpu1):
            run.proxy_cpu = cpu1 - cpu0
        if None not in (clamd0, clamd1):
            run.clamd_cpu = clamd1 - clamd0
        run.rss_kb = tree_peak_rss_kb(proc.pid)
        if proc.poll() is not None:
            run.error = f"the proxy exited with status {proc.returncode} during the load"
            return run
        if plan.latency and not run.hung:
            lat = run_latency_client(port, message_body(scenario.size),
                                     plan.latency_messages[scenario.key],
                                     scenario.sessions, timeout)
            run.latencies, run.latency_accepted = lat.latencies, lat.accepted
            run.latency_messages = plan.latency_messages[scenario.key]
            run.latency_failures, run.latency_error = lat.failures, lat.error
            if proc.poll() is not None:
                run.latency_error = f"the proxy exited with status {proc.returncode}"
    finally:
        status = stop_process(proc)
        if status not in (0, -signal.SIGTERM):
            run.notes.append(f"exit status {status} after SIGTERM")
        lines = _log_lines(log_path, log_offset)
        if lines:
            run.notes.append(f"{len(lines)} log line(s) at -d 0, e.g. {lines[0][:120]!r}")
        left = list(spool.iterdir()) if spool.is_dir() else []
        if left:
            run.notes.append(f"{len(left)} file(s) left in TempDirectory after stop")
            for path in left:
                with contextlib.suppress(OSError):
                    path.unlink()
    return run


def measure_direct(lab: Lab, plan: Plan, scenario: Scenario, round_no: int) -> Run:
    run = Run(DIRECT, scenario.key, round_no)
    messages, timeout = plan.messages[scenario.key], plan.timeouts[scenario.key]
    result = run_smtp_source(lab.sink_port, scenario.size, scenario.sessions, messages, timeout,
                             keep_connection=plan.keep_connection)
    run.messages, run.seconds, run.failures = messages, result.seconds, result.failures
    run.accepted = max(0, min(result.completed, messages) - sum(result.failures.values()))
    run.error, run.hung = result.error, result.hung
    if plan.latency and run.error is None:
        lat = run_latency_client(lab.sink_port, message_body(scenario.size),
                                 plan.latency_messages[scenario.key], scenario.sessions, timeout)
        run.latencies, run.latency_accepted = lat.latencies, lat.accepted
        run.latency_messages = plan.latency_messages[scenario.key]
        run.latency_failures, run.latency_error = lat.failures, lat.error
    return run


def measure_clamd(lab: Lab, plan: Plan, scenario: Scenario, round_no: int) -> Run:
    """INSTREAM scans of the message; each scan's time is also its latency."""
    assert lab.clamd is not None
    run = Run(CLAMD, scenario.key, round_no)
    messages, timeout = plan.messages[scenario.key], plan.timeouts[scenario.key]
    clamd0 = cpu_seconds(lab.clamd_pid)
    result = run_clamd_alone(lab.clamd.socket_path, message_body(scenario.size), messages,
                             scenario.sessions, timeout)
    clamd1 = cpu_seconds(lab.clamd_pid)
    run.messages, run.seconds, run.accepted = messages, result.seconds, result.accepted
    run.failures, run.error, run.hung = result.failures, result.error, result.hung
    if None not in (clamd0, clamd1):
        run.clamd_cpu = clamd1 - clamd0
    run.latencies = result.latencies
    if not lab.clamd.is_running():
        run.error = "clamd exited"
    return run


def measure(lab: Lab, plan: Plan, target: str, scenario: Scenario, round_no: int) -> Run:
    if target == DIRECT:
        return measure_direct(lab, plan, scenario, round_no)
    if target == CLAMD:
        return measure_clamd(lab, plan, scenario, round_no)
    return measure_proxy(lab, plan, target, scenario, round_no)


def run_order(plan: Plan, round_no: int) -> list[str]:
    """Ceilings first, then the two proxies, in alternating order from round to round."""
    proxies = [t for t in PROXIES if t in plan.targets]
    if round_no % 2 == 0:
        proxies.reverse()
    return [t for t in (DIRECT, CLAMD) if t in plan.targets] + proxies


def progress(run: Run, scenario: Scenario) -> str:
    name = TARGET_NAMES[run.target]
    text = f"{scenario.label:>10}  {name:<12} "
    if run.messages and run.error is None:
        text += f"{run.rate:8.1f} msg/s  {run.accepted}/{run.messages} accepted"
    elif run.messages:
        text += f"{run.accepted}/{run.messages} accepted in {run.seconds:.1f} s"
    if run.proxy_cpu is not None and run.messages:
        text += f"  cpu {run.proxy_cpu / run.messages * 1000:.2f} ms/msg"
    if run.latencies:
        text += f"  p50 {percentile(run.latencies, 50) * 1000:.1f} ms"
    if run.error:
        text += f"  FAILED: {run.error}"
    if run.failures or run.latency_failures:
        text += f"  failures: {dict(run.failures + run.latency_failures)}"
    if run.latency_error:
        text += f"  latency: {run.latency_error}"
    return text + f"  ({run.wall:.1f} s)"


def execute(plan: Plan, workdir: Path, say=print) -> list[Run]:
    """Start the lab, run every (round, scenario, target), stop the lab; the runs."""
    lab = Lab(workdir)
    runs: list[Run] = []
    hung: set[tuple[str, str]] = set()  # a target that hung on a scenario is not retried
    try:
        lab.start()
        say(f"bench: clamd pid {lab.clamd_pid}, smtp-sink on {HOST}:{lab.sink_port}, "
            f"work directory {workdir}")
        for round_no in range(1, plan.rounds + 1):
            say(f"bench: round {round_no} of {plan.rounds}")
            for scenario in plan.scenarios:
                if round_no > plan.rounds_of(scenario):
                    continue
                for target in run_order(plan, round_no):
                    if (target, scenario.key) in hung:
                        continue
                    began = time.monotonic()
                    run = measure(lab, plan, target, scenario, round_no)
                    run.wall = time.monotonic() - began
                    runs.append(run)
                    say("bench:   " + progress(run, scenario))
                    if run.hung:
                        hung.add((target, scenario.key))
    finally:
        lab.stop()
    return runs
