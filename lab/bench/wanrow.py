"""The WAN row (`--wan`): one session sending 20 messages with a client that pipelines when
offered (as Postfix's smtp client does), the next hop 25 ms away each way (the lab's delay
line, lab/delayline.py: this kernel has no netem), measured in one run:

    client ─> delay line ─> smtp-sink                       direct
    client ─> ours       ─> delay line ─> smtp-sink         ours
    client ─> C clamsmtpd ─> delay line ─> smtp-sink        the C one

The client: EHLO; per message MAIL, RCPT and DATA in one write when PIPELINING is offered
(each alone otherwise), then the body and its dot; QUIT after the last. What it reports is the
wall time per message. A round trip to the next hop costs 50 ms, so the rows count the round
trips each path needs per message: direct 2, ours 3 (docs/dev/pipelining.md), the C one 4.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import stop_process
from ..delayline import DelayLine
from .lab import Lab
from .workload import DIRECT, HOST, KB, OURS, RECIPIENT, SENDER, C, message_body, message_header

MESSAGES = 20
DELAY = 0.025  # seconds each way
ROUNDS = 3
NAMES = {DIRECT: "direct", OURS: "ours", C: "C clamsmtpd"}


@dataclass
class WANRun:
    target: str
    messages: int
    seconds: list[float] = field(default_factory=list)  # per round: the whole session
    accepted: int = 0
    pipelined: bool = False  # the client was offered PIPELINING
    failures: dict[str, int] = field(default_factory=dict)
    #: per round: the writes that crossed the delay line towards the next hop, EHLO and QUIT
    #: included. Each one waits for a reply, so per message it counts the round trips.
    writes: list[int] = field(default_factory=list)

    @property
    def writes_per_message(self) -> float | None:
        if not self.writes:
            return None
        return sorted(self.writes)[len(self.writes) // 2] / self.messages

    @property
    def ms_per_message(self) -> float | None:
        if not self.seconds:
            return None
        best = sorted(self.seconds)[len(self.seconds) // 2]  # the median round
        return best / self.messages * 1000


async def _session(port: int, messages: int, timeout: float) -> tuple[int, bool]:
    """One session of `messages` messages; (accepted, whether PIPELINING was offered)."""
    body = message_body(1 * KB)
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            async def reply() -> bytes:
                lines = b""
                while True:
                    line = await reader.readline()
                    if not line:
                        raise ConnectionError("connection closed")
                    lines += line
                    if line[3:4] != b"-":
                        return lines

            async def expect(prefix: bytes, what: str) -> bytes:
                got = await reply()
                if not got.startswith(prefix):
                    raise ConnectionError(f"{what}: {got[:60]!r}")
                return got

            await expect(b"220", "greeting")
            writer.write(b"EHLO bench.example.com\r\n")
            ehlo = await expect(b"250", "EHLO")
            pipelining = any(line[4:].strip().upper() == b"PIPELINING"
                             for line in ehlo.splitlines())
            commands = [f"MAIL FROM:<{SENDER}>".encode(), f"RCPT TO:<{RECIPIENT}>".encode(),
                        b"DATA"]
            accepted = 0
            for _ in range(messages):
                if pipelining:
                    writer.write(b"".join(c + b"\r\n" for c in commands))
                    for prefix, what in ((b"250", "MAIL"), (b"250", "RCPT"), (b"354", "DATA")):
                        await expect(prefix, what)
                else:
                    for command, prefix in zip(commands, (b"250", b"250", b"354"), strict=True):
                        writer.write(command + b"\r\n")
                        await expect(prefix, command.decode())
                writer.write(message_header() + body + b".\r\n")
                await expect(b"250", "end of data")
                accepted += 1
            writer.write(b"QUIT\r\n")
            await reply()
            return accepted, pipelining
        finally:
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()  # (else the socket outlives asyncio.run, unclosed)


def _measure(run: WANRun, port: int, rounds: int, line: DelayLine) -> None:
    asyncio.run(_session(port, 2, 30.0))  # warm-up: imports, clamd's first scan
    for _ in range(rounds):
        time.sleep(0.2)  # the warm-up's (or last round's) QUIT has crossed the line
        line.trace = []
        start = time.perf_counter()
        try:
            accepted, run.pipelined = asyncio.run(_session(port, run.messages, 60.0))
        except (OSError, ConnectionError, TimeoutError) as error:
            key = f"{type(error).__name__}: {error}"[:80]
            run.failures[key] = run.failures.get(key, 0) + 1
            continue
        run.seconds.append(time.perf_counter() - start)
        run.accepted += accepted
        time.sleep(0.2)  # the QUIT crosses the line too
        run.writes.append(sum(1 for _, way, chunk in line.trace if way == "up" and chunk))
        line.trace = None


def run_wan_comparison(workdir: Path, *, quick: bool = False, targets=(DIRECT, OURS, C),
                       say=print) -> list[WANRun]:
    """Each target in turn behind the same delay line to the same smtp-sink; the runs."""
    rounds = 1 if quick else ROUNDS
    lab = Lab(workdir)
    runs: list[WANRun] = []
    try:
        lab.start()
        with DelayLine(HOST, lab.sink_port, delay=DELAY) as line:
            lab.sink_port = line.port  # the proxies' OutAddress: the next hop, 25 ms away
            for target in targets:
                run = WANRun(target, MESSAGES)
                if target == DIRECT:
                    _measure(run, line.port, rounds, line)
                else:
                    notes: list[str] = []
                    proc, port, _, _ = lab.start_proxy(target, notes)
                    try:
                        _measure(run, port, rounds, line)
                    finally:
                        stop_process(proc)
                runs.append(run)
                say("bench: wan  " + row(run, runs[0]))
    finally:
        lab.stop()
    return runs


def row(run: WANRun, direct: WANRun | None = None) -> str:
    ms = run.ms_per_message
    text = f"{NAMES[run.target]:<12} " + (f"{ms:7.1f} ms/msg" if ms is not None else "      ?")
    if direct is not None and direct is not run and ms and direct.ms_per_message:
        text += f"  {ms / direct.ms_per_message:4.2f}x direct"
    elif direct is run:
        text += "  1.00x direct"
    writes = run.writes_per_message
    text += f"  {writes:.2f} next-hop writes/msg" if writes is not None else "  ? writes/msg"
    text += f"  {'pipelined' if run.pipelined else 'one command at a time'}"
    text += f"  {run.accepted}/{run.messages * len(run.seconds)} accepted"
    if run.failures:
        text += f"  failures: {run.failures}"
    return text


def table(runs: list[WANRun]) -> str:
    direct = next((r for r in runs if r.target == DIRECT), None)
    lines = [f"WAN: one session, {MESSAGES} messages of 1 KB, pipelining client, next hop "
             f"{DELAY * 1000:.0f} ms away each way (delay line); median of the rounds",
             *("  " + row(r, direct) for r in runs)]
    return "\n".join(lines)


def ok(runs: list[WANRun]) -> bool:
    """Every run of direct and ours counted (the C one is the reference)."""
    return bool(runs) and all(
        r.seconds and not r.failures and r.accepted == r.messages * len(r.seconds)
        for r in runs if r.target != C)
