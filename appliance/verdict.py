"""What to do with a scanned message: a pure function of the scan result and the policy.

No sockets and no files here, so the whole policy is one table test. The relay carries the
verdict out: forward (with which extra header), or answer the client itself and RSET the next hop.
Every status the log's `status=` can show is made here or in `Unscanned`, so the log's vocabulary
is in one place.
"""

from __future__ import annotations

import enum
import fnmatch
import ipaddress
from dataclasses import dataclass

from .config import Action, Config, IPNetwork, OversizeAction, ScanErrorAction
from .replies import (
    REPLY_DISCARDED,
    REPLY_LOCAL_ERROR,
    REPLY_OVERSIZE_DEFERRED,
    REPLY_OVERSIZE_REJECTED,
    REPLY_REJECTED,
)
from .scanner import CLEAN, OVERSIZE, VIRUS, ScanResult


class Kind(enum.StrEnum):
    """What happens to the message."""

    FORWARD = "forward"  # to the next hop, whose reply the client gets
    DISCARD = "discard"  # nobody gets it; the client is told it was taken (Action: drop)
    REJECT = "reject"  # the client gets a 5xx
    TEMPFAIL = "tempfail"  # the client gets a 4xx and retries


FORWARD, DISCARD, REJECT, TEMPFAIL = Kind.FORWARD, Kind.DISCARD, Kind.REJECT, Kind.TEMPFAIL



class Status(enum.StrEnum):
    """The words of the log line's `status=`: the original's CLEAN, VIRUS and CLAMAV-ERROR,
    and ours. Some take a detail after a colon (`detailed`)."""

    CLEAN = "CLEAN"
    VIRUS = "VIRUS"  # VIRUS:<name> (VIRUS alone when clamd named none)
    CLAMAV_ERROR = "CLAMAV-ERROR"  # the scan could not be done (a message too big for clamd too)
    ALLOWED = "ALLOWED"  # ALLOWED:<name>: delivered because the virus is in VirusAllow
    OVERSIZE = "OVERSIZE"  # refused or deferred as too big to scan (OversizeAction)
    UNSCANNED = "UNSCANNED"  # UNSCANNED:<reason>, see Unscanned

    def detailed(self, detail: str | None) -> str:
        """`VIRUS:Eicar-Test-Signature`; the word alone without a detail."""
        return f"{self.value}:{detail}" if detail else self.value


STATUS_ALLOWED, STATUS_OVERSIZE = Status.ALLOWED, Status.OVERSIZE
INFECTED_HEADER = b"X-Virus-Infected: Virus Detected!\r\n"
#: The header on mail delivered without a scan. Never the configured scan header (Header:),
#: which says the message was scanned: a filter downstream must be able to tell the two apart.
NOT_SCANNED_HEADER = "X-Virus-Not-Scanned"
#: The header on a message whose virus is in VirusAllow (delivered instead of the Action).
ALLOWED_HEADER = "X-Virus-Found"
#: A virus name put in a reply or a header is cut to this many characters.
MAX_VIRUS_NAME = 100


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
        return Status.UNSCANNED.detailed(self.value)

    @property
    def header(self) -> bytes:
        """The header line added to the message (CRLF-terminated)."""
        return f"{NOT_SCANNED_HEADER}: {self.value}\r\n".encode()


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: Kind
    reply: str | None = None  # our own reply to the client (None: relay the next hop's)
    extra_header: bytes = b""  # added after the configured Header when forwarding
    infected: bool = False  # quarantine and VirusAction apply
    status: str = Status.CLEAN  # the `status=` of the log line
    unscanned: Unscanned | None = None  # why it goes on without a scan (then no scan header)

    @property
    def scanned(self) -> bool:
        return self.unscanned is None


@dataclass(frozen=True, slots=True)
class Policy:
    """The directives `decide` applies, apart from the Config (so the table test needs none)."""

    action: Action = Action.DROP  # Action
    scan_error: ScanErrorAction = ScanErrorAction.DEFER  # ScanErrorAction
    reject_message: str = REPLY_REJECTED  # RejectMessage, %v = the virus name
    oversize: OversizeAction | None = None  # as it applies (None: a scan error, as 1.10)
    skip_networks: tuple[IPNetwork, ...] = ()  # SkipNetworks
    skip_authenticated: bool = False  # SkipAuthenticated
    virus_allow: tuple[str, ...] = ()  # VirusAllow: shell wildcards on the virus name

    @classmethod
    def of(cls, config: Config) -> Policy:
        return cls(
            action=config.action,
            scan_error=config.scan_error_action,
            reject_message=config.reject_message,
            oversize=config.effective_oversize_action,
            skip_networks=config.skip_networks,
            skip_authenticated=config.skip_authenticated,
            virus_allow=config.virus_allow,
        )


def decide(result: ScanResult, policy: Policy) -> Verdict:
    """Map a scan result and the configured policy to what happens to the message."""
    status = log_status(result)
    if result.status == CLEAN:
        return Verdict(FORWARD, status=status)
    if result.status == VIRUS:
        if result.virus and any(fnmatch.fnmatchcase(result.virus, p) for p in policy.virus_allow):
            name = safe_virus_name(result.virus)
            header = f"{ALLOWED_HEADER}: {name}\r\n".encode()
            allowed = Status.ALLOWED.detailed(result.virus)
            return Verdict(FORWARD, extra_header=header, status=allowed)
        if policy.action == Action.PASS:
            return Verdict(FORWARD, extra_header=INFECTED_HEADER, infected=True, status=status)
        if policy.action == Action.BOUNCE:
            reply = policy.reject_message.replace("%v", safe_virus_name(result.virus))
            return Verdict(REJECT, reply, infected=True, status=status)
        return Verdict(DISCARD, REPLY_DISCARDED, infected=True, status=status)
    if result.status == OVERSIZE and policy.oversize is not None:
        if policy.oversize == OversizeAction.PASS:
            return unscanned(Unscanned.SIZE)
        if policy.oversize == OversizeAction.REJECT:
            return Verdict(REJECT, REPLY_OVERSIZE_REJECTED, status=STATUS_OVERSIZE)
        return Verdict(TEMPFAIL, REPLY_OVERSIZE_DEFERRED, status=STATUS_OVERSIZE)
    # clamd down, slow or confused: never lose the mail; pass it unscanned only when told to.
    if policy.scan_error == ScanErrorAction.PASS:
        return unscanned(Unscanned.ERROR)
    return Verdict(TEMPFAIL, REPLY_LOCAL_ERROR, status=status)


def log_status(result: ScanResult) -> str:
    """The original's `status=` for a scan result: CLEAN, VIRUS:<name>, or CLAMAV-ERROR for
    anything that is neither (a message too big for clamd included, as in 1.10)."""
    if result.status == VIRUS:
        return Status.VIRUS.detailed(result.virus)
    return Status.CLEAN if result.status == CLEAN else Status.CLAMAV_ERROR


def skip_reason(policy: Policy, client_ip: str, authenticated: bool) -> Unscanned | None:
    """Why this session's mail is not scanned at all (None: it is): the client is in
    SkipNetworks, or the next hop accepted its AUTH and SkipAuthenticated is on."""
    if policy.skip_networks:
        try:
            ip = ipaddress.ip_address(client_ip.partition("%")[0])
        except ValueError:
            ip = None
        if ip is not None and any(ip in network for network in policy.skip_networks):
            return Unscanned.NETWORK
    if policy.skip_authenticated and authenticated:
        return Unscanned.AUTHENTICATED
    return None


def safe_virus_name(name: str | None) -> str:
    """A virus name fit for a reply line or a header: printable ASCII, no CR or LF, bounded.

    The name comes from clamd's database (third-party signatures included), so it is not trusted
    to be any of those."""
    text = "".join(c if " " <= c <= "~" else "?" for c in (name or "Unknown")).strip()
    return (text or "Unknown")[:MAX_VIRUS_NAME]


def unscanned(reason: Unscanned) -> Verdict:
    """A message that goes on without a scan: the not-scanned header instead of the scan header."""
    return Verdict(FORWARD, extra_header=reason.header, status=reason.status, unscanned=reason)
