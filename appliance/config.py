"""clamsmtpd.conf: parsed once into a frozen, validated ``Config``.

The syntax and directive names are those of clamsmtp 1.10 so existing files keep working;
its bugs are not copied (``ScanHeader`` works, ``ClamAddress`` gets port 3310). Every
problem is reported as ``file:line: Directive: what is wrong (what is accepted)`` so an
admin can fix the file without reading the source.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import ipaddress
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from appliance.addresses import Address, parse_address
from appliance.eventloop import INSTALL_HINT, EventLoop, resolve, uvloop_problem
from appliance.header import template_problems
from appliance.replies import REPLY_REJECTED

DEFAULT_CONFIG_PATH = "/etc/clamsmtpd.conf"
DEFAULT_HEADER = "X-Virus-Scanned: ClamAV using ClamSMTP"
#: MaxScanSize's bounds and units (K, M, G are powers of 1024, as clamd.conf's StreamMaxLength)
MAX_SCAN_SIZE = 4 << 30
SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
#: The original's reply to an infected message with Action: bounce; RejectMessage replaces it.
DEFAULT_REJECT_MESSAGE = REPLY_REJECTED
MAX_VIRUS_PATTERN = 200
DEFAULT_INFECTED_HOST_BLOCK = 3600
MAX_INFECTED_COUNT = 1000
MAX_BLOCK_SECONDS = 7 * 86400
MAX_REJECT_MESSAGE = 400  # an SMTP reply line is at most 512 bytes, the virus name included
MAX_HEADER_BYTES = 1024
MAX_CONNECTIONS = 10240
MAX_SECONDS = 86400  # TimeOut / KeepAlives upper bound: one day
MAX_CLAMDS = 32  # ClamAddress: more is surely a mistake
MAX_WORKERS = 64  # Workers: more processes than this is surely a mistake
DEFAULT_SCAN_TIMEOUT = 120.0  # ScanTimeout: clamav-milter's ReadTimeout

OUT_PORT, LISTEN_PORT, CLAM_PORT, METRICS_PORT = 25, 10025, 3310, 9330
LISTEN_HOST, CLAM_HOST = "0.0.0.0", "127.0.0.1"

_TRUE = frozenset({"1", "yes", "true", "t", "on"})
_FALSE = frozenset({"0", "no", "false", "f", "off"})
_LIST_SEPARATORS = re.compile(r"[\s,]+")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_ADDRESS_FORMS = "PORT, IPv4[:PORT], [IPv6][:PORT], HOST[:PORT] or /unix/socket/path"


# The choices of the directives that take a word. StrEnums: a member is the very string the
# file, the log and --check-config show, so `f"{config.action}"` prints `drop` as before.


class Action(enum.StrEnum):
    """`Action`: what an infected message gets."""

    DROP = "drop"  # the client is told it was taken (250), nothing is delivered
    BOUNCE = "bounce"  # RejectMessage (a 5xx) to the client
    PASS = "pass"  # delivered with X-Virus-Infected


class ScanErrorAction(enum.StrEnum):
    """`ScanErrorAction`: what a message that could not be scanned gets."""

    DEFER = "defer"  # 451, the client retries
    PASS = "pass"  # delivered unscanned, with X-Virus-Not-Scanned


class OversizeAction(enum.StrEnum):
    """`OversizeAction`: what a message too big to scan gets."""

    PASS = "pass"
    DEFER = "defer"
    REJECT = "reject"


class OutTLS(enum.StrEnum):
    """`OutTLS`: STARTTLS towards the next hop."""

    NONE = "none"
    MAY = "may"
    ENCRYPT = "encrypt"
    VERIFY = "verify"

    @property
    def required(self) -> bool:
        """The next hop's leg must be encrypted: no mail crosses in clear."""
        return self in (OutTLS.ENCRYPT, OutTLS.VERIFY)


class ClientTLS(enum.StrEnum):
    """`ClientTLS`: STARTTLS towards clients."""

    OFF = "off"
    ON = "on"
    PASSTHROUGH = "passthrough"


class Transparency(enum.Enum):
    """`TransparentProxy`: off, on (the destination the client dialled, from our address) or
    full (that destination, from the client's own address: TPROXY and IP_TRANSPARENT).

    False only when off, so `if config.transparent_proxy:` still means "the next hop is the
    client's original destination" in both transparent modes.
    """

    OFF = "off"
    ON = "on"
    FULL = "full"

    def __bool__(self) -> bool:
        return self is not Transparency.OFF


class ConfigError(Exception):
    """A configuration problem, located by file, line (0 = whole file) and directive."""

    def __init__(self, file: str, line: int, directive: str | None, reason: str) -> None:
        super().__init__(file, line, directive, reason)
        self.file = file
        self.line = line
        self.directive = directive
        self.reason = reason

    def __str__(self) -> str:
        return _located(self.file, self.line, self.directive, self.reason)


@dataclass(frozen=True)
class Config:
    """The effective configuration; constructing one validates it."""

    @property
    def worker_count(self) -> int:
        """The processes that serve: `Workers`, with auto resolved to the number of CPUs."""
        return self.workers or len(os.sched_getaffinity(0)) or 1

    @property
    def effective_oversize_action(self) -> OversizeAction | None:
        """OversizeAction as it applies: pass by default once MaxScanSize is set; None (a
        message too big for clamd is a scan error, as in 1.10) when neither is set."""
        if self.oversize_action is not None:
            return self.oversize_action
        return OversizeAction.PASS if self.max_scan_size is not None else None

    path: str
    out_address: Address | None
    listen: Address = Address(host=LISTEN_HOST, port=LISTEN_PORT, port_only=True)
    clam_addresses: tuple[Address, ...] = (Address(path="/var/run/clamav/clamd"),)
    header: str = DEFAULT_HEADER
    temp_directory: str = "/tmp"
    action: Action = Action.DROP
    quarantine: bool = False
    virus_action: str | None = None
    virus_action_as_root: bool = False
    max_connections: int = 64
    workers: int = 1  # worker processes; 0: auto (one per CPU), see .worker_count
    event_loop: EventLoop = EventLoop.AUTO  # auto: uvloop when installed (appliance/eventloop.py)
    timeout: float = 180.0
    scan_timeout: float = DEFAULT_SCAN_TIMEOUT
    keepalives: int = 0
    xclient: bool = False
    transparent_proxy: Transparency = Transparency.OFF
    user: str | None = None
    pid_file: str | None = None
    metrics_listen: Address | None = None  # opt-in Prometheus endpoint
    scan_error_action: ScanErrorAction = ScanErrorAction.DEFER  # a scan that could not be done
    reject_message: str = DEFAULT_REJECT_MESSAGE  # Action: bounce's reply, %v = the virus name
    max_scan_size: int | None = None  # bytes; a bigger message is not scanned (OversizeAction)
    oversize_action: OversizeAction | None = None  # None: see effective_oversize_action
    out_tls: OutTLS = OutTLS.MAY           # STARTTLS towards the next hop
    out_tls_name: str | None = None        # name the next hop's certificate must carry (verify)
    tls_ca_file: str | None = None         # CAs for verify; None: the system store
    client_tls: ClientTLS = ClientTLS.OFF  # STARTTLS towards clients
    tls_certificate: str | None = None     # PEM certificate (chain) shown to clients
    tls_key: str | None = None             # PEM private key; None: in the certificate file
    skip_networks: tuple[IPNetwork, ...] = ()  # clients whose mail is relayed unscanned
    skip_authenticated: bool = False  # a session whose AUTH the next hop accepted: unscanned
    virus_allow: tuple[str, ...] = ()  # virus name patterns delivered with X-Virus-Found
    infected_host_limit: tuple[int, int] | None = None  # (COUNT, SECONDS); None: off
    infected_host_block: int = DEFAULT_INFECTED_HOST_BLOCK  # seconds a blocked host waits
    debug_files: bool = False
    warnings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Check each value as its directive's row does (a Config built in code, e.g. by
        `replace`, gets the same checks and words as the file), then the ones between them."""
        for directive in DIRECTIVES:
            if directive.alias_of is None:
                value = getattr(self, directive.field)
                try:
                    checked = directive.kind.check(value)
                except ValueError as error:
                    raise ValueError(f"{directive.name}: {error}") from None
                if checked is not value:  # e.g. Config(action="bounce"): the enum member
                    object.__setattr__(self, directive.field, checked)
        if self.out_address is None and not self.transparent_proxy:
            raise ValueError("no OutAddress specified (required unless TransparentProxy is on)")
        problem = tls_problem(
            self.out_tls, self.client_tls, hostname=self.out_tls_hostname,
            transparent=bool(self.transparent_proxy), certificate=self.tls_certificate,
        )
        if problem:
            raise ValueError(problem[1])

    @property
    def out_tls_hostname(self) -> str | None:
        """The name to verify and send as SNI: OutTLSName, else OutAddress's host if a name."""
        return out_tls_hostname(self.out_tls_name, self.out_address)


def out_tls_hostname(name: str | None, out: Address | None) -> str | None:
    if name:
        return name
    if out is None or out.is_unix or out.port_only or not out.host or _is_ip(out.host):
        return None
    return out.host


def tls_problem(out_tls: OutTLS, client_tls: ClientTLS, *, hostname: str | None, transparent: bool,
                certificate: str | None) -> tuple[str, str] | None:
    """(directive, reason) when the TLS directives do not fit together, else None."""
    if out_tls == OutTLS.VERIFY and hostname is None:
        if transparent:
            return ("OutTLS", "verify needs OutTLSName: in transparent mode the proxy knows "
                    "only the next hop's IP address, not the name its certificate must carry")
        return ("OutTLS", "verify needs OutTLSName: OutAddress is not a host name, so there "
                "is no name to check the next hop's certificate against")
    if client_tls == ClientTLS.ON and not certificate:
        return ("ClientTLS", "on needs TLSCertificate: (and TLSKey:), the certificate shown "
                "to clients")
    if client_tls == ClientTLS.PASSTHROUGH and out_tls.required:
        return ("ClientTLS", f"passthrough cannot be combined with OutTLS: {out_tls} "
                "(the next hop's TLS is then the client's own; use OutTLS: may or none)")
    return None


def replace(config: Config, **changes: Any) -> Config:
    """A copy with some fields changed (e.g. ``-p`` overriding PidFile), validated again."""
    return dataclasses.replace(config, **changes)


def load_config(path: str) -> Config:
    """Read and parse ``path``; an unreadable file is a ConfigError at line 0."""
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except OSError as error:
        reason = f"cannot read configuration file: {error.strerror or error}"
        raise ConfigError(path, 0, None, reason) from None
    try:
        text, note = data.decode("utf-8"), None
    except UnicodeDecodeError as error:
        # Paths may legitimately hold such bytes; surrogateescape keeps them exact.
        text = data.decode("utf-8", "surrogateescape")
        line = data.count(b"\n", 0, error.start) + 1
        note = _located(path, line, None, "not valid UTF-8; undecodable bytes are kept as is")
    config = parse_config(text, path)
    return replace(config, warnings=(note, *config.warnings)) if note else config


def parse_config(text: str, path: str) -> Config:
    """Parse the text of a clamsmtpd.conf; ``path`` is only used in messages."""
    values: dict[str, Any] = {}
    warnings: list[str] = []
    lines: dict[str, int] = {}  # directive -> the line it was last set on
    for number, raw in enumerate(text.removeprefix("\ufeff").split("\n"), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, value = line.partition(":")
        name, value = name.strip(), value.strip()
        if not colon:
            known = _BY_NAME.get(line.split()[0].lower())
            if known:
                reason = f"invalid config line (expected '{known.name}: value')"
                raise ConfigError(path, number, known.name, reason)
            reason = f"invalid config line '{_show(line)}' (expected 'Directive: value')"
            raise ConfigError(path, number, None, reason)
        if not name:
            reason = f"invalid config line '{_show(line)}' (no directive name before ':')"
            raise ConfigError(path, number, None, reason)
        directive = _BY_NAME.get(name.lower())
        if directive is None:
            raise ConfigError(path, number, _show(name), _unknown_directive(name))
        try:
            if "\0" in value:
                raise ValueError("value contains a NUL character")
            notes = directive.read(value, values)
        except ValueError as error:
            raise ConfigError(path, number, directive.name, str(error)) from None
        warnings.extend(_located(path, number, directive.name, note) for note in notes)
        lines[directive.name] = number

    if values.get("transparent_proxy") and values.get("out_address") is not None:
        note = "ignored because TransparentProxy is on"
        warnings.append(_located(path, lines["OutAddress"], "OutAddress", note))
        values["out_address"] = None
    elif not values.get("transparent_proxy") and values.get("out_address") is None:
        reason = "no OutAddress specified (required unless TransparentProxy is on)"
        raise ConfigError(path, 0, "OutAddress", reason)
    problem = tls_problem(
        values.get("out_tls", OutTLS.MAY), values.get("client_tls", ClientTLS.OFF),
        hostname=out_tls_hostname(values.get("out_tls_name"), values.get("out_address")),
        transparent=bool(values.get("transparent_proxy")),
        certificate=values.get("tls_certificate"),
    )
    if problem:
        directive_name, reason = problem
        raise ConfigError(path, lines.get(directive_name, 0), directive_name, reason)
    try:
        return Config(
            path=path,
            out_address=values.pop("out_address", None),
            warnings=tuple(warnings),
            **values,
        )
    except ValueError as error:  # a safety net: each value was checked as it was read
        raise ConfigError(path, 0, None, str(error)) from None


def describe(config: Config) -> str:
    """The effective configuration in clamsmtpd.conf syntax (parses back to an equal Config):
    one line per directive of the registry, in its order, as its row says to show it."""
    lines = [f"# effective configuration of {_show(config.path)}"]
    for directive in DIRECTIVES:
        lines += directive.describe(config)
    return "\n".join(lines) + "\n"


# --- kinds of value: read from the file, checked, shown; one wording for each problem ---


class _Kind:
    """How one kind of value is read (`parse`, ValueError with the reason), checked when a
    Config is built in code (`check`: the value as Config holds it, or ValueError with the same
    reason), and written back by --check-config (`show`)."""

    def parse(self, text: str) -> Any:
        raise NotImplementedError

    def check(self, value: Any) -> Any:
        return value

    def show(self, value: Any) -> str:
        return "" if value is None else str(value)


@dataclass(frozen=True)
class _AddressKind(_Kind):
    default_host: str | None
    default_port: int

    def parse(self, text: str) -> Address:
        if not text:
            raise ValueError(f"empty value (expected {_ADDRESS_FORMS})")
        try:
            return parse_address(
                text, default_host=self.default_host, default_port=self.default_port
            )
        except ValueError as error:
            reason = _show(str(error), limit=200)
            if text not in str(error):
                reason = f"invalid address '{_show(text)}': {reason}"
            if "expected" not in reason:
                reason += f" (expected {_ADDRESS_FORMS})"
            raise ValueError(reason) from None

    def show(self, value: Address | None) -> str:
        return "" if value is None else _format_address(value)


@dataclass(frozen=True)
class _Optional(_Kind):
    """An empty value turns the setting off (an extension directive, so off by default)."""

    kind: _Kind

    def parse(self, text: str) -> Any:
        return self.kind.parse(text) if text else None

    def check(self, value: Any) -> Any:
        return None if value is None else self.kind.check(value)

    def show(self, value: Any) -> str:
        return "" if value is None else self.kind.show(value)


class _ClamAddresses(_Kind):
    """One or more clamds, separated by commas or spaces (so a unix path cannot hold either)."""

    one = _AddressKind(CLAM_HOST, CLAM_PORT)

    def parse(self, text: str) -> tuple[Address, ...]:
        parts = [part for part in re.split(r"[,\s]+", text) if part]
        self._count(len(parts))
        addresses: list[Address] = []
        seen: set[tuple[str | None, int | None, str | None]] = set()
        for part in parts:
            address = self.one.parse(part)
            endpoint = (address.host, address.port, address.path)  # "3310" is 127.0.0.1:3310
            if endpoint in seen:
                raise ValueError(f"'{_show(part)}' is listed twice")
            seen.add(endpoint)
            addresses.append(address)
        return tuple(addresses)

    def check(self, value: tuple[Address, ...]) -> tuple[Address, ...]:
        self._count(len(value))
        return value

    @staticmethod
    def _count(count: int) -> None:
        if not count:
            raise ValueError(f"empty value (expected one or more of {_ADDRESS_FORMS})")
        if count > MAX_CLAMDS:
            raise ValueError(f"{count} addresses (at most {MAX_CLAMDS})")

    def show(self, value: tuple[Address, ...]) -> str:
        return ", ".join(map(_format_address, value))


class _Flag(_Kind):
    def parse(self, text: str) -> bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(f"invalid value '{_show(text)}' (expected on or off, yes or no, 1 or 0)")

    def show(self, value: bool) -> str:
        return "on" if value else "off"


@dataclass(frozen=True)
class _Whole(_Kind):
    """A whole number from `low` to `high` in the file. The time-outs are floats: code may set
    a fraction above 0 (the lab's short time-outs)."""

    low: int
    high: int
    unit: str
    kind: type[int] | type[float] = int

    @property
    def expected(self) -> str:
        return f"a whole number of {self.unit} from {self.low} to {self.high}"

    def parse(self, text: str) -> int | float:
        number = int(text) if text.isascii() and text.isdigit() and len(text) <= 9 else None
        if number is None or not self.low <= number <= self.high:
            raise ValueError(f"invalid value '{_show(text)}' (expected {self.expected})")
        return self.kind(number)

    def check(self, value: int | float) -> int | float:
        above_low = value > 0 if self.kind is float else value >= self.low
        if not (above_low and value <= self.high):
            raise ValueError(f"invalid value '{value}' (expected {self.expected})")
        return value

    def show(self, value: int | float) -> str:
        return f"{value:g}" if self.kind is float else str(value)


class _Workers(_Kind):
    """`auto` (kept as 0: one process per CPU, resolved by Config.worker_count) or a number."""

    number = _Whole(1, MAX_WORKERS, "processes")

    def parse(self, text: str) -> int:
        if text.lower() == "auto":
            return 0
        try:
            return int(self.number.parse(text))
        except ValueError:
            raise ValueError(self._reason(text)) from None

    def check(self, value: int) -> int:
        if not 0 <= value <= MAX_WORKERS:
            raise ValueError(self._reason(str(value)))
        return value

    @staticmethod
    def _reason(text: str) -> str:
        return (f"invalid value '{_show(text)}' (expected auto, or a whole number of processes "
                f"from 1 to {MAX_WORKERS})")

    def show(self, value: int) -> str:
        return "auto" if value == 0 else str(value)


@dataclass(frozen=True)
class _Choice(_Kind):
    """One word of an enum, in any case; `optional`: None (not set) is a value too."""

    kind: type[enum.StrEnum]
    optional: bool = False

    def parse(self, text: str) -> enum.StrEnum:
        try:
            return self.kind(text.lower())
        except ValueError:
            raise ValueError(self._reason(text)) from None

    def check(self, value: str | None) -> enum.StrEnum | None:
        if value is None and self.optional:
            return None
        try:
            return self.kind(str(value))
        except ValueError:
            raise ValueError(self._reason(str(value))) from None

    def _reason(self, text: str) -> str:
        choices = tuple(self.kind)
        expected = ", ".join(choices[:-1]) + " or " + choices[-1]
        return f"invalid value '{_show(text)}' (expected {expected})"


@dataclass(frozen=True)
class _EventLoopKind(_Choice):
    """EventLoop: a word of `EventLoop`; uvloop only where it can be imported."""

    kind: type[enum.StrEnum] = EventLoop

    def parse(self, text: str) -> EventLoop:
        return self.check(super().parse(text))

    def check(self, value: str | None) -> EventLoop:
        choice = EventLoop(str(super().check(value)))
        problem = uvloop_problem() if choice is EventLoop.UVLOOP else None
        if problem:
            raise ValueError(f"{problem}: {INSTALL_HINT}")
        return choice


@dataclass(frozen=True)
class _Text(_Kind):
    """Free text; `what` names a required value, None means an empty value clears it."""

    what: str | None = None

    def parse(self, text: str) -> str | None:
        return self.check(text or None)

    def check(self, value: str | None) -> str | None:
        if not value and self.what is not None:
            raise ValueError(f"empty value (expected {self.what})")
        return value


class _User(_Kind):
    def parse(self, text: str) -> str | None:
        if not text:
            raise ValueError("empty value (expected a user name or a numeric uid)")
        return self.check(text)

    def check(self, value: str | None) -> str | None:
        if value is not None and (not value or any(c.isspace() or c == ":" for c in value)):
            raise ValueError(f"invalid value '{_show(value)}' (expected a user name or a "
                             "numeric uid)")
        return value


class _Header(_Kind):
    """A header template, with the original's escapes (\\r \\n \\t); "" means no header."""

    def parse(self, text: str) -> str:
        return self.check(_unescape(text).strip())

    def check(self, value: str) -> str:
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            raise ValueError("value is not valid UTF-8 (save the file as UTF-8)") from None
        if size > MAX_HEADER_BYTES:
            raise ValueError(f"header too long ({size} bytes, at most {MAX_HEADER_BYTES})")
        return value

    def show(self, value: str) -> str:
        return _escape(value)


class _Transparency(_Kind):
    def parse(self, text: str) -> Transparency:
        if text.lower() == "full":
            return Transparency.FULL
        try:
            on = _Flag().parse(text)
        except ValueError:
            raise ValueError(f"invalid value '{_show(text)}' (expected on, off or full)") from None
        return Transparency.ON if on else Transparency.OFF

    def check(self, value: Transparency | bool) -> Transparency:
        if isinstance(value, bool):  # Config(transparent_proxy=True) as before
            return Transparency.ON if value else Transparency.OFF
        return Transparency(value)

    def show(self, value: Transparency) -> str:
        return value.value


class _TLSName(_Kind):
    def parse(self, text: str) -> str | None:
        if text and (any(c.isspace() or c in "/:[]" for c in text) or _is_ip(text)):
            raise ValueError(f"invalid value '{_show(text)}' (expected the host name the next "
                             "hop's certificate carries, e.g. mail.example.org)")
        return text or None


class _RejectMessage(_Kind):
    def parse(self, text: str) -> str:
        return self.check(text)

    def check(self, value: str) -> str:
        problem = reject_message_problem(value)
        if problem:
            raise ValueError(problem)
        return value


class _Size(_Kind):
    """MaxScanSize: bytes, with K, M or G; empty: none."""

    def parse(self, text: str) -> int | None:
        return parse_size(text) if text else None

    def check(self, value: int | None) -> int | None:
        if value is not None and not 1 <= value <= MAX_SCAN_SIZE:
            raise ValueError(f"size '{value}' out of range (expected 1 to 4G)")
        return value

    def show(self, value: int | None) -> str:
        return "" if value is None else format_size(value)


class _Networks(_Kind):
    def parse(self, text: str) -> tuple[IPNetwork, ...]:
        networks: list[IPNetwork] = []
        for word in _LIST_SEPARATORS.split(text.strip()):
            if not word:
                continue
            try:
                network = ipaddress.ip_network(word)
            except ValueError:
                try:
                    fixed = ipaddress.ip_network(word, strict=False)
                except ValueError:
                    raise ValueError(f"invalid network '{_show(word)}' (expected addresses or "
                                     "CIDR networks such as 192.0.2.0/24 or 2001:db8::/32)"
                                     ) from None
                raise ValueError(f"'{_show(word)}' has host bits set (did you mean {fixed}?)"
                                 ) from None
            mapped = getattr(network.network_address, "ipv4_mapped", None)
            if mapped is not None and network.prefixlen >= 96:  # clients are seen as plain IPv4
                network = ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}")
            if network not in networks:
                networks.append(network)
        return tuple(networks)

    def show(self, value: tuple[IPNetwork, ...]) -> str:
        return " ".join(map(str, value))


class _Patterns(_Kind):
    def parse(self, text: str) -> tuple[str, ...]:
        patterns: list[str] = []
        for word in _LIST_SEPARATORS.split(text.strip()):
            if not word:
                continue
            if not word.isascii() or not word.isprintable() or len(word) > MAX_VIRUS_PATTERN:
                raise ValueError(f"invalid pattern '{_show(word)}' (expected a virus name or a "
                                 f"shell wildcard such as PUA.*, printable ASCII, at most "
                                 f"{MAX_VIRUS_PATTERN} characters)")
            if word.strip("*?") == "":
                raise ValueError(f"pattern '{_show(word)}' matches every virus (use Action: "
                                 "pass to deliver them all)")
            if word not in patterns:
                patterns.append(word)
        return tuple(patterns)

    def show(self, value: tuple[str, ...]) -> str:
        return " ".join(value)


class _HostLimit(_Kind):
    """InfectedHostLimit: COUNT SECONDS; empty: off."""

    expected = (f"expected COUNT SECONDS: 1 to {MAX_INFECTED_COUNT} infected messages within "
                f"1 to {MAX_SECONDS} seconds, e.g. 3 600")

    def parse(self, text: str) -> tuple[int, int] | None:
        if not text:
            return None
        words = text.split()
        if len(words) != 2 or not all(w.isascii() and w.isdigit() and len(w) < 10 for w in words):
            raise ValueError(f"invalid value '{_show(text)}' ({self.expected})")
        return self.check((int(words[0]), int(words[1])))

    def check(self, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None:
            count, seconds = value
            if not (1 <= count <= MAX_INFECTED_COUNT and 1 <= seconds <= MAX_SECONDS):
                raise ValueError(f"value '{count} {seconds}' out of range ({self.expected})")
        return value

    def show(self, value: tuple[int, int] | None) -> str:
        return "" if value is None else "{} {}".format(*value)


def reject_message_problem(text: str) -> str | None:
    """Why ``text`` cannot be RejectMessage's reply (None: it can): a permanent (5xx) code, a
    space, some text, printable ASCII on one line, room left for the virus name."""
    expected = "expected a 5xx code, a space and a text, e.g. 550 5.7.1 Virus found: %v"
    if not text:
        return f"empty value ({expected})"
    if len(text) > MAX_REJECT_MESSAGE:
        return f"too long ({len(text)} characters, at most {MAX_REJECT_MESSAGE})"
    if not text.isascii() or not text.isprintable():
        return "only printable ASCII on one line is allowed in an SMTP reply"
    code, space, rest = text.partition(" ")
    if not (len(code) == 3 and code.isdigit() and code[0] == "5") or not space or not rest.strip():
        return f"'{_show(text)}' is not a permanent SMTP reply ({expected})"
    return None


def parse_size(value: str) -> int:
    """``25M`` -> 26214400: a whole number with an optional K, M or G (powers of 1024)."""
    text = value.strip().upper().removesuffix("B")
    number, unit = (text[:-1], text[-1]) if text[-1:] in ("K", "M", "G") else (text, "")
    number = number.strip()
    if not number.isascii() or not number.isdigit() or len(number) > 12:
        raise ValueError(f"invalid size '{_show(value)}' (expected a number of bytes, "
                         "optionally with K, M or G, e.g. 25M)")
    size = int(number) * SIZE_UNITS[unit]
    if not 1 <= size <= MAX_SCAN_SIZE:
        raise ValueError(f"size '{_show(value)}' out of range (expected 1 to 4G)")
    return size


def format_size(size: int) -> str:
    """The inverse of ``parse_size``: the largest unit that divides ``size`` exactly."""
    for unit in ("G", "M", "K"):
        if size % SIZE_UNITS[unit] == 0:
            return f"{size // SIZE_UNITS[unit]}{unit}"
    return str(size)


# --- the registry: one row per directive (docs/dev/config.md) ---


class Reload(enum.Enum):
    """What SIGHUP does with a changed directive (server.Appliance.reload)."""

    LIVE = "yes"  # new connections use the new value
    RESTART = "restart"  # the old value stays; the log says a restart is needed
    PARTLY = "partly"  # TransparentProxy: off <-> on at once, to or from full needs a restart


@dataclass(frozen=True)
class Directive:
    """One directive: everything the parser, --check-config, SIGHUP and the man page test know
    of it. Its default is the Config field's (`default`)."""

    name: str  # as clamsmtpd.conf writes it
    field: str  # the Config field it sets
    kind: _Kind  # how its value is read, checked and shown
    reload: Reload = Reload.LIVE
    #: a deprecated directive: the warning each use gets (accepted; left out of the list of
    #: directives an unknown name is told about)
    deprecated: str | None = None
    #: an old name that sets another directive's field (Bounce, ScanHeader): not shown itself
    alias_of: str | None = None
    #: --check-config's comment for an empty value (None, "", False), e.g. "not set (...)"
    unset: str | Callable[[Config], str] | None = None
    #: comment lines --check-config writes before the directive's line
    comment: Callable[[Config], list[str]] | None = None
    #: warnings about a value that is accepted (Header's unknown % symbols)
    notes: Callable[[Any], list[str]] | None = None
    #: how the value is stored: the default sets the field (Bounce: off changes nothing)
    store: Callable[[Any, dict[str, Any]], None] | None = None

    @property
    def default(self) -> Any:
        """The value when the file does not set it (OutAddress: None, it is required)."""
        default = Config.__dataclass_fields__[self.field].default
        return None if default is dataclasses.MISSING else default

    def read(self, text: str, values: dict[str, Any]) -> list[str]:
        """Parse one line's value into `values`; the warnings it gets. ValueError: the reason."""
        value = self.kind.parse(text)
        if self.store is not None:
            self.store(value, values)
        else:
            values[self.field] = value
        notes = self.notes(value) if self.notes is not None else []
        return [self.deprecated, *notes] if self.deprecated else notes

    def describe(self, config: Config) -> list[str]:
        """--check-config's lines for this directive (none for an alias)."""
        if self.alias_of is not None:
            return []
        value = getattr(config, self.field)
        lines = self.comment(config) if self.comment is not None else []
        if self.unset is not None and not value:
            unset = self.unset if isinstance(self.unset, str) else self.unset(config)
            return [*lines, f"# {self.name}: {unset}"]
        return [*lines, f"{self.name}: {self.kind.show(value)}".rstrip()]


def _workers_comment(config: Config) -> list[str]:
    if config.workers:
        return []
    return [f"# Workers: auto is {config.worker_count} here (the number of CPUs)"]


def _event_loop_comment(config: Config) -> list[str]:
    if config.event_loop is not EventLoop.AUTO:
        return []
    return [f"# EventLoop: auto is {resolve(config.event_loop)} here"]


def _out_address_comment(config: Config) -> list[str]:
    """A comment line for the two OutAddress forms that are easy to mistake for each other."""
    out = config.out_address
    if out is None or out.is_unix:
        return []
    if out.port_only:
        return [f"# OutAddress: a bare port: the loopback feature, each connection's mail goes "
                f"back to its client's own address, port {out.port}"]
    if out.host in ("0.0.0.0", "::"):
        return [f"# OutAddress: {out.host} is this host (an ordinary address, not the loopback "
                f"feature, which is a bare port)"]
    return []


def _bounce(on: bool, values: dict[str, Any]) -> None:
    if on:
        values["action"] = Action.BOUNCE


_SECONDS = _Whole(1, MAX_SECONDS, "seconds", float)

#: Every directive, in the order --check-config shows them.
DIRECTIVES: tuple[Directive, ...] = (
    Directive("OutAddress", "out_address", _AddressKind(None, OUT_PORT),
              unset="not used (TransparentProxy is on)", comment=_out_address_comment),
    Directive("Listen", "listen", _AddressKind(LISTEN_HOST, LISTEN_PORT), Reload.RESTART),
    Directive("ClamAddress", "clam_addresses", _ClamAddresses()),
    Directive("Header", "header", _Header(), notes=template_problems),
    Directive("ScanHeader", "header", _Header(), notes=template_problems, alias_of="Header",
              deprecated='please use "Header" option instead of "ScanHeader"'),
    Directive("TempDirectory", "temp_directory", _Text("a directory path")),
    Directive("Action", "action", _Choice(Action)),
    Directive("Bounce", "action", _Flag(), alias_of="Action", store=_bounce,
              deprecated='please use "Action" option instead of "Bounce"'),
    Directive("Quarantine", "quarantine", _Flag()),
    Directive("VirusAction", "virus_action", _Text()),
    Directive("VirusActionAsRoot", "virus_action_as_root", _Flag()),
    Directive("MaxConnections", "max_connections", _Whole(1, MAX_CONNECTIONS, "connections")),
    Directive("Workers", "workers", _Workers(), Reload.RESTART, comment=_workers_comment),
    Directive("EventLoop", "event_loop", _EventLoopKind(), Reload.RESTART,
              comment=_event_loop_comment),
    Directive("TimeOut", "timeout", _SECONDS),
    Directive("ScanTimeout", "scan_timeout", _SECONDS),
    Directive("KeepAlives", "keepalives", _Whole(0, MAX_SECONDS, "seconds")),
    Directive("XClient", "xclient", _Flag()),
    Directive("TransparentProxy", "transparent_proxy", _Transparency(), Reload.PARTLY),
    Directive("User", "user", _User(), Reload.RESTART, unset="not set (no privilege drop)"),
    Directive("PidFile", "pid_file", _Text(), Reload.RESTART),
    Directive("MetricsListen", "metrics_listen",
              _Optional(_AddressKind(LISTEN_HOST, METRICS_PORT)), Reload.RESTART,
              unset="not set (no metrics endpoint)"),
    Directive("OutTLS", "out_tls", _Choice(OutTLS)),
    Directive("OutTLSName", "out_tls_name", _TLSName(), unset=lambda config: (
        f"not set (next hop's name: {config.out_tls_hostname or 'unknown'})")),
    Directive("TLSCAFile", "tls_ca_file", _Text(), unset="not set (the system's CA store)"),
    Directive("ClientTLS", "client_tls", _Choice(ClientTLS)),
    Directive("TLSCertificate", "tls_certificate", _Text()),  # read again at SIGHUP
    Directive("TLSKey", "tls_key", _Text()),
    Directive("DebugFiles", "debug_files", _Flag(), unset="off (has no effect)",
              deprecated="this option has no effect (deprecated)"),
    Directive("ScanErrorAction", "scan_error_action", _Choice(ScanErrorAction)),
    Directive("RejectMessage", "reject_message", _RejectMessage()),
    Directive("MaxScanSize", "max_scan_size", _Size(),
              unset="not set (no limit but clamd's StreamMaxLength)"),
    Directive("OversizeAction", "oversize_action", _Choice(OversizeAction, optional=True),
              unset="not set (pass with MaxScanSize; else too big for clamd is a scan error, "
              "as in 1.10)"),
    Directive("SkipNetworks", "skip_networks", _Networks()),
    Directive("SkipAuthenticated", "skip_authenticated", _Flag()),
    Directive("VirusAllow", "virus_allow", _Patterns()),
    Directive("InfectedHostLimit", "infected_host_limit", _HostLimit(),
              unset="not set (no containment)"),
    Directive("InfectedHostBlock", "infected_host_block",
              _Whole(1, MAX_BLOCK_SECONDS, "seconds")),
)
_BY_NAME = {directive.name.lower(): directive for directive in DIRECTIVES}
#: Directives a running daemon cannot take over on SIGHUP: Config field -> directive.
RESTART_ONLY = {d.field: d.name for d in DIRECTIVES if d.reload is Reload.RESTART}


# --- helpers ---


def _located(file: str, line: int, directive: str | None, message: str) -> str:
    return f"{file}:{line}: {directive}: {message}" if directive else f"{file}:{line}: {message}"


def _unknown_directive(name: str) -> str:
    close = difflib.get_close_matches(name.lower(), _BY_NAME, n=1, cutoff=0.75)
    if close:
        return f"unknown directive (did you mean '{_BY_NAME[close[0]].name}'?)"
    listed = ", ".join(sorted(d.name for d in DIRECTIVES if not d.deprecated))
    return f"unknown directive (expected one of {listed})"


def _unescape(value: str) -> str:
    """Apply the original's escapes: \\r \\n \\t, and \\X -> X for any other X."""
    out: list[str] = []
    chars = iter(value)
    for char in chars:
        if char == "\\":
            following = next(chars, None)
            if following is None:
                out.append(char)  # a trailing backslash stays
            else:
                out.append({"r": "\r", "n": "\n", "t": "\t"}.get(following, following))
        else:
            out.append(char)
    return "".join(out)


def _escape(template: str) -> str:
    """The inverse of ``_unescape``, so describe() output parses back unchanged."""
    return (
        template.replace("\\", "\\\\")
        .replace("\r", "\\r")
        .replace("\n", "\\n")
        .replace("\t", "\\t")
    )


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _format_address(address: Address) -> str:
    return str(address.port) if address.port_only else str(address)


def _show(text: str, limit: int = 80) -> str:
    """Text fit for a message: undecodable bytes as \\xNN, control characters escaped, clipped."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    text = "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
