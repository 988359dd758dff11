"""What to do with a scanned message: a pure function of the scan result and `Action`.

No sockets and no files here, so the whole policy is one table test. The relay carries the
verdict out: forward (with which extra header), or answer the client itself and RSET the next hop.
"""

from __future__ import annotations

from dataclasses import dataclass

from .scanner import CLEAN, VIRUS, ScanResult

FORWARD, DISCARD, REJECT, TEMPFAIL = "forward", "discard", "reject", "tempfail"

# The C original's exact reply strings (clamsmtp-behaviour.md 5.10).
REPLY_DISCARDED = "250 Virus Detected; Discarded Email"
REPLY_REJECTED = "550 Virus Detected; Content Rejected"
REPLY_LOCAL_ERROR = "451 Local Error"
INFECTED_HEADER = b"X-Virus-Infected: Virus Detected!\r\n"


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: str  # FORWARD | DISCARD | REJECT | TEMPFAIL
    reply: str | None = None  # our own reply to the client (None: relay the next hop's)
    extra_header: bytes = b""  # added after the configured Header when forwarding
    infected: bool = False  # quarantine and VirusAction apply


def decide(result: ScanResult, action: str) -> Verdict:
    """Map a scan result and the configured Action to what happens to the message."""
    if result.status == CLEAN:
        return Verdict(FORWARD)
    if result.status == VIRUS:
        if action == "pass":
            return Verdict(FORWARD, extra_header=INFECTED_HEADER, infected=True)
        if action == "bounce":
            return Verdict(REJECT, REPLY_REJECTED, infected=True)
        return Verdict(DISCARD, REPLY_DISCARDED, infected=True)
    # clamd down, slow or confused: never lose the mail, never pass it unscanned.
    return Verdict(TEMPFAIL, REPLY_LOCAL_ERROR)
