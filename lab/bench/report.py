"""The report: the results and ratio tables as text or markdown, the heading and the result
line, and every run as JSON."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .results import Run, Summary
from .workload import CLAMD, OURS, TARGET_NAMES, TARGETS, C, Plan, Scenario


def _num(value: float | None, digits: int = 3) -> str:
    """A number to about `digits` significant digits, '-' for none."""
    if value is None:
        return "-"
    if value == 0:
        return "0"
    magnitude = len(str(int(abs(value)))) if abs(value) >= 1 else 0
    return f"{value:.{max(digits - magnitude, 0)}f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}"


RESULT_COLUMNS = ("load", "target", "msg/s", "range", "p50 ms", "p99 ms", "CPU ms/msg",
                  "clamd ms/msg", "peak RSS MB", "accepted", "notes")
RATIO_COLUMNS = ("load", "ours/C msg/s", "ours/clamd msg/s", "C/clamd msg/s", "ours/C p50",
                 "ours/C p99", "ours/C CPU/msg", "ours/C RSS")


def result_rows(summaries: Iterable[Summary], scenarios: dict[str, Scenario]) -> list[list[str]]:
    rows = []
    for s in summaries:
        notes = [f"{count}x {text}" for text, count in s.failures.items()]
        notes += s.errors + s.notes
        if s.latency_counted < s.latency_runs:
            notes.insert(0, f"p50/p99 from {s.latency_counted} of {s.latency_runs} timed runs")
        if s.runs and not s.counted:
            notes.insert(0, "FAILED")
        elif s.counted < s.runs:
            notes.insert(0, f"msg/s from {s.counted} of {s.runs} runs")
        rows.append([
            scenarios[s.scenario].label,
            TARGET_NAMES[s.target],
            _num(s.rate),
            f"{_num(s.rate_min)}-{_num(s.rate_max)}" if s.counted > 1 else "",
            _num(s.p50_ms),
            _num(s.p99_ms),
            _num(s.cpu_ms),
            _num(s.clamd_cpu_ms),
            _num(s.rss_mb),
            f"{s.accepted}/{s.attempted}",
            "; ".join(notes),
        ])
    return rows


def ratio_rows(summaries: Sequence[Summary], scenarios: Sequence[Scenario]) -> list[list[str]]:
    by_key = {(s.target, s.scenario): s for s in summaries}
    rows = []
    for scenario in scenarios:
        ours, c, clamd = (by_key.get((t, scenario.key)) for t in (OURS, C, CLAMD))
        if ours is None and c is None:
            continue

        def get(summary: Summary | None, attr: str) -> float | None:
            return getattr(summary, attr) if summary is not None else None

        rows.append([
            scenario.label,
            _ratio(get(ours, "rate"), get(c, "rate")),
            _ratio(get(ours, "rate"), get(clamd, "rate")),
            _ratio(get(c, "rate"), get(clamd, "rate")),
            _ratio(get(ours, "p50_ms"), get(c, "p50_ms")),
            _ratio(get(ours, "p99_ms"), get(c, "p99_ms")),
            _ratio(get(ours, "cpu_ms"), get(c, "cpu_ms")),
            _ratio(get(ours, "rss_mb"), get(c, "rss_mb")),
        ])
    return rows


def text_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(columns, *rows, strict=False)]
    numeric = [i for i, name in enumerate(columns) if name not in ("load", "target", "notes")]

    def line(cells: Sequence[str]) -> str:
        parts = [cell.rjust(w) if i in numeric else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(parts).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths])]
                     + [line(row) for row in rows])


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    numeric = {i for i, name in enumerate(columns) if name not in ("load", "target", "notes")}
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---:" if i in numeric else "---" for i in range(len(columns))) + "|"
    body = ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join([head, rule, *body])


@dataclass
class Report:
    started: str
    seconds: float
    mode: str
    machine: dict[str, str]
    plan: Plan
    runs: list[Run]
    summaries: list[Summary]

    @property
    def ok(self) -> bool:
        """Every run of ours and of the ceilings counted. The C clamsmtpd is the reference:
        what it loses is reported (result line, notes) but does not fail the benchmark."""
        mine = [s for s in self.summaries if s.target != C]
        return bool(self.summaries) and all(s.ok for s in mine)

    def result(self) -> str:
        lines = []
        for target in TARGETS:
            bad = [s for s in self.summaries if s.target == target and not s.ok]
            if not bad:
                continue
            lost = sum(s.attempted - s.accepted for s in bad)
            sent = sum(s.attempted for s in self.summaries if s.target == target)
            loads = ", ".join(self._label(s.scenario) for s in bad)
            lines.append(f"{TARGET_NAMES[target]}: {lost} of {sent} messages not accepted, "
                         f"or a run failed ({loads}; see notes)")
        if not lines:
            return "every message of every run accepted"
        return "; ".join(lines) + ("" if self.ok else "; the benchmark FAILED")

    def _label(self, key: str) -> str:
        return next(s.label for s in self.plan.scenarios if s.key == key)

    def _heading(self) -> list[str]:
        m = self.machine
        loads = ", ".join(
            f"{s.label}: {self.plan.messages[s.key]} msgs"
            + (f" + {self.plan.latency_messages[s.key]} timed" if self.plan.latency else "")
            + f" x {self.plan.rounds_of(s)} round(s)"
            for s in self.plan.scenarios)
        return [
            f"clamsmtpd benchmark, {self.started}, {self.mode} "
            f"({self.plan.rounds} round(s), {self.seconds:.0f} s)",
            f"machine: {m['nproc']} x {m['cpu']}, {m['memory']}, kernel {m['kernel']}, "
            f"Python {m['python']}",
            f"software: {m['clamd']}; C clamsmtpd: {m['C clamsmtpd']}; ours: {m['ours']}; "
            f"postfix {m['postfix (smtp-source, smtp-sink)']} (smtp-source, smtp-sink)",
            f"load per run: {loads}",
            f"background: {m.get('background', '?')}",
        ]

    def text(self) -> str:
        scenarios = {s.key: s for s in self.plan.scenarios}
        parts = self._heading() + [
            "",
            text_table(RESULT_COLUMNS, result_rows(self.summaries, scenarios)),
            "",
            text_table(RATIO_COLUMNS, ratio_rows(self.summaries, self.plan.scenarios)),
            "",
            "result: " + self.result(),
        ]
        return "\n".join(parts)

    def markdown(self) -> str:
        scenarios = {s.key: s for s in self.plan.scenarios}
        head = self._heading()
        parts = [
            f"## Results: {self.started}, {self.mode}",
            "",
            *[f"- {line}" for line in head[1:]],
            f"- total time {self.seconds:.0f} s",
            "",
            markdown_table(RESULT_COLUMNS, result_rows(self.summaries, scenarios)),
            "",
            markdown_table(RATIO_COLUMNS, ratio_rows(self.summaries, self.plan.scenarios)),
            "",
            f"Result: {self.result()}.",
            "",
        ]
        return "\n".join(parts)

    def as_json(self) -> dict:
        def run_dict(run: Run) -> dict:
            # not dataclasses.asdict: it would rebuild each Counter from (key, value) pairs
            d = {f.name: getattr(run, f.name) for f in dataclasses.fields(run)}
            d["failures"], d["latency_failures"] = dict(run.failures), dict(run.latency_failures)
            d["rate"] = run.rate
            d["counts"] = run.counts
            d["latencies"] = [round(x, 6) for x in run.latencies]
            return d

        return {
            "started": self.started,
            "seconds": self.seconds,
            "mode": self.mode,
            "machine": self.machine,
            "plan": dataclasses.asdict(self.plan),
            "summaries": [dataclasses.asdict(s) for s in self.summaries],
            "runs": [run_dict(r) for r in self.runs],
        }
