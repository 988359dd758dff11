"""What to do with a scanned message: a pure function of the scan result and the policy.

No sockets and no files here, so the whole policy is one table test. The relay carries the
verdict out: forward (with which extra header), or answer the client itself and RSET the next hop.
Every status the log's `status=` can show is made here or in `Unscanned`, so the log's vocabulary
is in one place.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .scanner import CLEAN, VIRUS, ScanResult

FORWARD, DISCARD, REJECT, TEMPFAIL = "forward", "discard", "reject", "tempfail"

# The C original's exact reply strings (clamsmtp-behaviour.md 5.10).
REPLY_DISCARDED = "250 Virus Detected; Discarded Email"
REPLY_REJECTED = "550 Virus Detected; Content Rejected"
REPLY_LOCAL_ERROR = "451 Local Error"
INFECTED_HEADER = b"X-Virus-Infected: Virus Detected!\r\n"
#: The header on mail delivered without a scan. Never the configured scan header (Header:),
#: which says the message was scanned: a filter downstream must be able to tell the two apart.
NOT_SCANNED_HEADER = "X-Virus-Not-Scanned"


class Unscanned(enum.StrEnum):
    """Why a message went on without a scan: logged `status=UNSCANNED:<reason>`.

    One family, so one logcheck rule (`status=UNSCANNED:[a-z]+`) matches every reason, and a
    new reason is added here and nowhere else.
    """

    ERROR = "error"  # the scan could not be done, and ScanErrorAction is pass
    SIZE = "size"  # over MaxScanSize or clamd's StreamMaxLength, and OversizeAction is pass
    NETWORK = "network"  # the client's address is in SkipNetworks
    AUTHENTICATED = "authenticated"  # the next hop accepted the client's AUTH (SkipAuthenticated)
    TLS = "tls"  # the session was encrypted end to end, so the proxy never saw the message

    @property
    def status(self) -> str:
        """The `status=` value of the log line."""
        return f"UNSCANNED:{self.value}"

    @property
    def header(self) -> bytes:
        """The header line added to the message (CRLF-terminated)."""
        return f"{NOT_SCANNED_HEADER}: {self.value}\r\n".encode()


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: str  # FORWARD | DISCARD | REJECT | TEMPFAIL
    reply: str | None = None  # our own reply to the client (None: relay the next hop's)
    extra_header: bytes = b""  # added after the configured Header when forwarding
    infected: bool = False  # quarantine and VirusAction apply
    status: str = CLEAN  # the `status=` of the log line
    scanned: bool = True  # False: the configured scan header is not added


def decide(result: ScanResult, action: str) -> Verdict:
    """Map a scan result and the configured Action to what happens to the message."""
    status = result.log_status
    if result.status == CLEAN:
        return Verdict(FORWARD, status=status)
    if result.status == VIRUS:
        if action == "pass":
            return Verdict(FORWARD, extra_header=INFECTED_HEADER, infected=True, status=status)
        if action == "bounce":
            return Verdict(REJECT, REPLY_REJECTED, infected=True, status=status)
        return Verdict(DISCARD, REPLY_DISCARDED, infected=True, status=status)
    # clamd down, slow or confused: never lose the mail, never pass it unscanned.
    return Verdict(TEMPFAIL, REPLY_LOCAL_ERROR, status=status)


def unscanned(reason: Unscanned) -> Verdict:
    """A message that goes on without a scan: the not-scanned header instead of the scan header."""
    return Verdict(FORWARD, extra_header=reason.header, status=reason.status, scanned=False)
