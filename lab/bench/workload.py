"""What the benchmark runs: the targets it measures, the loads (scenarios) and the plan of a
run, and the messages of its own clients, like smtp-source's."""

from __future__ import annotations

import email.utils
import itertools
import os
from dataclasses import dataclass

HOST = "127.0.0.1"
SENDER = "a@example.com"
RECIPIENT = "b@example.com"
HELO_NAME = "bench.example.com"
KB = 1024
MB = 1024 * KB

# target keys, in the order rows are printed
DIRECT, CLAMD, C, OURS, OURS2, OURSW2 = "direct", "clamd", "c", "ours", "ours2", "oursw2"
OURSAIO = "oursaio"
TARGETS = (DIRECT, CLAMD, C, OURS, OURSAIO, OURS2, OURSW2)
PROXIES = (C, OURS, OURSAIO, OURS2, OURSW2)
#: ours: EventLoop's default (uvloop where installed); oursaio: ours with `EventLoop: asyncio`;
#: ours2: ours with `ClamAddress` listing two private clamds (the second started on demand);
#: oursw2: ours with `Workers: 2` (one clamd)
TARGET_NAMES = {DIRECT: "direct", CLAMD: "clamd alone", C: "C clamsmtpd", OURS: "ours",
                OURSAIO: "ours asyncio", OURS2: "ours 2clamds", OURSW2: "ours 2workers"}


@dataclass(frozen=True)
class Scenario:
    """One load: `messages` of `size` payload bytes over `sessions` parallel sessions."""

    key: str
    size: int
    sessions: int
    messages: int  # per smtp-source run (and per "clamd alone" run)
    latency_messages: int  # per latency-client run
    timeout: float  # seconds, per run (smtp-source, latency client, clamd alone)
    quick: tuple[int, int, float]  # messages, latency_messages, timeout with --quick
    max_rounds: int | None = None  # None: every round

    @property
    def label(self) -> str:
        return f"{human_size(self.size)} x{self.sessions}"


SCENARIOS = (
    Scenario("1k", 1 * KB, 20, 1000, 400, 120.0, quick=(200, 60, 20.0)),
    Scenario("100k", 100 * KB, 10, 500, 200, 120.0, quick=(100, 40, 20.0)),
    Scenario("5m", 5 * MB, 4, 40, 16, 180.0, quick=(8, 4, 60.0)),
    # the peak-RSS load: 4 concurrent 25 MB messages, in one round only
    Scenario("25m", 25 * MB, 4, 8, 4, 180.0, quick=(4, 4, 60.0), max_rounds=1),
)
SCENARIO_KEYS = tuple(s.key for s in SCENARIOS)


def human_size(size: int) -> str:
    if size % MB == 0:
        return f"{size // MB} MB"
    if size % KB == 0:
        return f"{size // KB} KB"
    return f"{size} B"


# -- the message ------------------------------------------------------------------------------


def message_timeout(size: int) -> float:
    """How long the latency client and "clamd alone" wait for one message of `size` bytes
    before counting it as failed (a proxy answers a small one in milliseconds)."""
    return 10.0 + 2.0 * size / MB


def source_payload(length: int) -> bytes:
    """The body `smtp-source -l length` sends: 78 characters and CRLF per line, each line
    starting with a digit, the last line unterminated (smtp-source ends it with CRLF . CRLF)."""
    data = bytearray(b"X" * length)
    for end in range(80, length, 80):
        data[end - 80] = ord("0123456789"[(end // 80) % 10])
        data[end - 2 : end] = b"\r\n"
    return bytes(data)


_serials = itertools.count(1)


def message_header() -> bytes:
    """Headers like smtp-source's, with a Message-Id never used before in this process: clamd
    keeps a cache of clean files by hash, so identical messages would be scanned only once
    (smtp-source's Message-Id and Date differ from message to message too)."""
    return (
        f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\n"
        f"Date: {email.utils.formatdate(usegmt=True)}\r\n"
        f"Message-Id: <bench.{os.getpid()}.{next(_serials)}@{HELO_NAME}>\r\n\r\n"
    ).encode()


def message_body(size: int) -> bytes:
    """The body of `smtp-source -l size` as it is on the wire before the final dot."""
    return source_payload(size) + b"\r\n"


# -- the plan ---------------------------------------------------------------------------------


@dataclass
class Plan:
    scenarios: tuple[Scenario, ...]
    targets: tuple[str, ...]
    rounds: int
    messages: dict[str, int]
    latency_messages: dict[str, int]
    timeouts: dict[str, float]
    latency: bool
    keep_connection: bool

    def rounds_of(self, scenario: Scenario) -> int:
        return min(self.rounds, scenario.max_rounds or self.rounds)
