"""The command line: the options and the plan they make, and main(): check the tools, run the
benchmark, print the report, write it as markdown and JSON if asked; the exit status (see
__main__.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from ..clamd import ClamdError
from . import tlsrow, wanrow
from .lab import BenchError
from .procstat import busy_cpu_seconds, load_average, machine_info, own_cpu_seconds
from .report import Report
from .results import summarize
from .runs import execute
from .tools import check_tools
from .workload import DIRECT, OURS, SCENARIO_KEYS, SCENARIOS, TARGETS, C, Plan


def _csv(choices: Sequence[str], name: str):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {name} {', '.join(bad) or '(none)'} (choose from {', '.join(choices)})")
        return items

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lab.bench",
        description="Benchmark this project's clamsmtpd against the C clamsmtpd on loopback: "
        "smtp-source load, smtp-sink next hop, a private clamd; plus the ceilings "
        "'direct' (smtp-source to smtp-sink) and 'clamd alone' (INSTREAM).",
    )
    parser.add_argument("--quick", action="store_true",
                        help="one round with fewer messages (under a minute)")
    parser.add_argument("--rounds", type=int,
                        help="rounds, proxies alternated (default 3, --quick 1)")
    parser.add_argument("--messages", type=int,
                        help="messages per smtp-source run, every load (default: per load)")
    parser.add_argument("--latency-messages", type=int,
                        help="messages per latency run, every load (default: per load)")
    parser.add_argument("--scenarios", type=_csv(SCENARIO_KEYS, "scenario"),
                        default=SCENARIO_KEYS, metavar="LIST",
                        help=f"loads to run, of {','.join(SCENARIO_KEYS)} (default: all)")
    parser.add_argument("--targets", type=_csv(TARGETS, "target"), default=TARGETS,
                        metavar="LIST",
                        help=f"what to measure, of {','.join(TARGETS)} (default: all)")
    parser.add_argument("--sessions", type=int,
                        help="parallel sessions, every load (default: 20, 10, 4, 4 per load)")
    parser.add_argument("--no-latency", action="store_true",
                        help="skip the latency client runs (p50/p99)")
    parser.add_argument("--keep-connection", action="store_true",
                        help="smtp-source -d: several messages per connection (default: one "
                        "connection per message); the latency client always connects per message")
    parser.add_argument("--timeout", type=float,
                        help="seconds allowed per run (default: 120 or 180 per load; "
                        "--quick: 20 or 60)")
    parser.add_argument("--tls", action="store_true",
                        help="only the TLS row: ours with TLS on both legs against the same "
                        "load in clear, 1 KB and 100 KB (--quick: fewer messages)")
    parser.add_argument("--wan", action="store_true",
                        help="the WAN row: one pipelining session of 20 messages, the next hop "
                             "25 ms away each way (a delay line): direct, ours, the C one")
    parser.add_argument("--markdown", metavar="FILE", help="also write the results as markdown")
    parser.add_argument("--json", metavar="FILE", help="also write every run as JSON")
    parser.add_argument("--workdir", metavar="DIR",
                        help="keep configs and logs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    for name in ("rounds", "messages", "latency_messages", "sessions"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.timeout is not None and args.timeout <= 0:
        parser.error("--timeout must be positive")
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    scenarios = tuple(dataclasses.replace(s, sessions=args.sessions or s.sessions)
                      for s in SCENARIOS if s.key in args.scenarios)
    messages, latency_messages, timeouts = {}, {}, {}
    for s in scenarios:
        default = s.quick if args.quick else (s.messages, s.latency_messages, s.timeout)
        messages[s.key] = args.messages or default[0]
        latency_messages[s.key] = args.latency_messages or args.messages or default[1]
        timeouts[s.key] = args.timeout or default[2]
    targets = tuple(t for t in TARGETS if t in args.targets)
    return Plan(scenarios, targets, args.rounds, messages, latency_messages, timeouts,
                latency=not args.no_latency, keep_connection=args.keep_connection)


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):
    raise _Stop(signal.Signals(signum).name)


def run_benchmark(args: argparse.Namespace, say=print, plan: Plan | None = None) -> Report:
    """Everything but printing the report: start, measure, stop, summarize (`plan`: the one
    make_plan(args) makes, if main() has it already)."""
    plan = plan or make_plan(args)
    own_workdir = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="clamsmtp-bench-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    start = time.monotonic()
    busy0, own0, load0 = busy_cpu_seconds(), own_cpu_seconds(), load_average()
    try:
        machine = machine_info()
        runs = execute(plan, workdir, say)
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    seconds = time.monotonic() - start
    busy1, own1 = busy_cpu_seconds(), own_cpu_seconds()
    machine["background"] = "?"
    if busy0 is not None and busy1 is not None:
        other = max(0.0, (busy1 - busy0) - (own1 - own0))
        machine["background"] = (
            f"other processes used about {other:.1f} CPU s during the {seconds:.0f} s "
            f"({other / seconds * 100:.0f}% of one core); load average {load0} at the start, "
            f"{load_average()} at the end")
    summaries = [summarize(runs, t, s.key) for s in plan.scenarios for t in plan.targets
                 if any(r.target == t and r.scenario == s.key for r in runs)]
    mode = "quick run" if args.quick else "full run"
    if (args.messages or args.latency_messages or args.sessions or args.keep_connection
            or args.scenarios != SCENARIO_KEYS or args.targets != TARGETS):
        mode = "custom run"
    return Report(started, seconds, mode, machine, plan, runs, summaries)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _compare_in_workdir(args: argparse.Namespace, compare) -> list | None:
    """Run one comparison (`compare(workdir)`) in --workdir or a temporary directory removed
    after; None, said on stderr, when its lab could not start."""
    own_workdir = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="clamsmtp-bench-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return compare(workdir)
    except (ClamdError, BenchError) as error:
        _say(f"bench: could not start the lab: {error}")
        return None
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _tls_row(args: argparse.Namespace) -> int:
    runs = _compare_in_workdir(
        args, lambda workdir: tlsrow.run_tls_comparison(workdir, quick=args.quick, say=_say))
    if runs is None:
        return 1
    print(tlsrow.table(runs), flush=True)
    return 0 if tlsrow.ok(runs) else 1


def _wan_row(args: argparse.Namespace) -> int:
    problems = check_tools(make_plan(args))
    if problems:
        for problem in problems:
            print(f"bench: {problem}", file=sys.stderr)
        return 2
    targets = tuple(t for t in (DIRECT, OURS, C) if t in args.targets)
    runs = _compare_in_workdir(args, lambda workdir: wanrow.run_wan_comparison(
        workdir, quick=args.quick, targets=targets, say=_say))
    if runs is None:
        return 1
    print(wanrow.table(runs), flush=True)
    return 0 if wanrow.ok(runs) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tls:
        return _tls_row(args)
    if args.wan:
        return _wan_row(args)
    plan = make_plan(args)
    problems = check_tools(plan)
    if problems:
        for problem in problems:
            print(f"bench: {problem}", file=sys.stderr)
        return 2

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        report = run_benchmark(args, say, plan)
    except (ClamdError, BenchError) as error:
        say(f"bench: could not start the lab: {error}")
        return 1
    except (KeyboardInterrupt, _Stop):
        say("bench: interrupted; everything it started is stopped")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(report.text(), flush=True)
    if args.markdown:
        Path(args.markdown).write_text(report.markdown())
        say(f"bench: markdown written to {args.markdown}")
    if args.json:
        Path(args.json).write_text(json.dumps(report.as_json(), indent=1) + "\n")
        say(f"bench: JSON written to {args.json}")
    return 0 if report.ok else 1
