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


class ClientTLS(enum.StrEnum):
    """`ClientTLS`: STARTTLS towards clients."""

    OFF = "off"
    ON = "on"
    PASSTHROUGH = "passthrough"


ACTIONS = tuple(Action)


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


#: The Config fields that hold a word, and its enum: a plain string given to Config() is turned
#: into the member (so Config(action="bounce") and replace(config, out_tls="none") still work).
_WORDS: dict[str, type[enum.StrEnum]] = {
    "action": Action, "scan_error_action": ScanErrorAction, "oversize_action": OversizeAction,
    "out_tls": OutTLS, "client_tls": ClientTLS,
}


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
        given: object = self.transparent_proxy  # a bool too: Config(transparent_proxy=True)
        if isinstance(given, bool):  # as before
            mode = Transparency.ON if given else Transparency.OFF
            object.__setattr__(self, "transparent_proxy", mode)
        for field, kind in _WORDS.items():  # Config(action="bounce") as before
            value = getattr(self, field)
            if value is not None and not isinstance(value, kind):
                try:
                    object.__setattr__(self, field, kind(value))
                except ValueError:
                    raise ValueError(f"invalid {field} {value!r} (expected "
                                     f"{_alternatives(tuple(kind))})") from None
        if self.out_address is None and not self.transparent_proxy:
            raise ValueError("no OutAddress specified (required unless TransparentProxy is on)")
        if not 1 <= self.max_connections <= MAX_CONNECTIONS:
            raise ValueError(f"max_connections must be 1 to {MAX_CONNECTIONS}")
        if not 0 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"workers must be 0 (auto) to {MAX_WORKERS}")
        if not 0 < self.timeout <= MAX_SECONDS:
            raise ValueError(f"timeout must be more than 0 and at most {MAX_SECONDS} seconds")
        if not 0 < self.scan_timeout <= MAX_SECONDS:
            raise ValueError(f"scan_timeout must be more than 0 and at most {MAX_SECONDS} seconds")
        if not 1 <= len(self.clam_addresses) <= MAX_CLAMDS:
            raise ValueError(f"clam_addresses must list 1 to {MAX_CLAMDS} addresses")
        if not 0 <= self.keepalives <= MAX_SECONDS:
            raise ValueError(f"keepalives must be 0 to {MAX_SECONDS} seconds")
        if not self.temp_directory:
            raise ValueError("empty temp_directory")
        if self.infected_host_limit is not None:
            count, seconds = self.infected_host_limit
            if not (1 <= count <= MAX_INFECTED_COUNT and 1 <= seconds <= MAX_SECONDS):
                raise ValueError(f"invalid infected_host_limit {self.infected_host_limit!r}")
        if not 1 <= self.infected_host_block <= MAX_BLOCK_SECONDS:
            raise ValueError(f"infected_host_block must be 1 to {MAX_BLOCK_SECONDS} seconds")
        if self.max_scan_size is not None and not 1 <= self.max_scan_size <= MAX_SCAN_SIZE:
            raise ValueError(f"max_scan_size must be 1 to {MAX_SCAN_SIZE} bytes")
        problem = reject_message_problem(self.reject_message)
        if problem:
            raise ValueError(f"reject_message: {problem}")
        tls = tls_problem(
            self.out_tls, self.client_tls, hostname=self.out_tls_hostname,
            transparent=bool(self.transparent_proxy), certificate=self.tls_certificate,
        )
        if tls:
            raise ValueError(tls[1])

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
    if client_tls == ClientTLS.PASSTHROUGH and out_tls in (OutTLS.ENCRYPT, OutTLS.VERIFY):
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
            word = line.split()[0]
            known = _DIRECTIVES.get(word.lower())
            if known:
                reason = f"invalid config line (expected '{known[0]}: value')"
                raise ConfigError(path, number, known[0], reason)
            reason = f"invalid config line '{_show(line)}' (expected 'Directive: value')"
            raise ConfigError(path, number, None, reason)
        if not name:
            reason = f"invalid config line '{_show(line)}' (no directive name before ':')"
            raise ConfigError(path, number, None, reason)
        if name.lower() not in _DIRECTIVES:
            raise ConfigError(path, number, _show(name), _unknown_directive(name))
        directive, handler = _DIRECTIVES[name.lower()]
        try:
            if "\0" in value:
                raise ValueError("value contains a NUL character")
            notes = handler(value, values)
        except ValueError as error:
            raise ConfigError(path, number, directive, str(error)) from None
        warnings.extend(_located(path, number, directive, note) for note in notes)
        lines[directive] = number

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
        directive, reason = problem
        raise ConfigError(path, lines.get(directive, 0), directive, reason)
    try:
        return Config(
            path=path,
            out_address=values.pop("out_address", None),
            warnings=tuple(warnings),
            **values,
        )
    except ValueError as error:  # a safety net: the handlers check everything first
        raise ConfigError(path, 0, None, str(error)) from None


def describe(config: Config) -> str:
    """The effective configuration in clamsmtpd.conf syntax (parses back to an equal Config)."""
    out = config.out_address
    lines = [
        f"# effective configuration of {_show(config.path)}",
        *_out_address_meaning(out),
        f"OutAddress: {_format_address(out)}"
        if out is not None
        else "# OutAddress: not used (TransparentProxy is on)",
        f"Listen: {_format_address(config.listen)}",
        f"ClamAddress: {', '.join(map(_format_address, config.clam_addresses))}",
        f"Header: {_escape(config.header)}".rstrip(),
        f"TempDirectory: {config.temp_directory}",
        f"Action: {config.action}",
        f"Quarantine: {_onoff(config.quarantine)}",
        f"VirusAction: {config.virus_action or ''}".rstrip(),
        f"VirusActionAsRoot: {_onoff(config.virus_action_as_root)}",
        f"MaxConnections: {config.max_connections}",
        *([f"# Workers: auto is {config.worker_count} here (the number of CPUs)", "Workers: auto"]
          if config.workers == 0 else [f"Workers: {config.workers}"]),
        f"TimeOut: {config.timeout:g}",
        f"ScanTimeout: {config.scan_timeout:g}",
        f"KeepAlives: {config.keepalives}",
        f"XClient: {_onoff(config.xclient)}",
        f"TransparentProxy: {config.transparent_proxy.value}",
        f"User: {config.user}" if config.user else "# User: not set (no privilege drop)",
        f"PidFile: {config.pid_file or ''}".rstrip(),
        f"MetricsListen: {_format_address(config.metrics_listen)}"
        if config.metrics_listen is not None
        else "# MetricsListen: not set (no metrics endpoint)",
        f"OutTLS: {config.out_tls}",
        f"OutTLSName: {config.out_tls_name}" if config.out_tls_name
        else f"# OutTLSName: not set (next hop's name: {config.out_tls_hostname or 'unknown'})",
        f"TLSCAFile: {config.tls_ca_file}" if config.tls_ca_file
        else "# TLSCAFile: not set (the system's CA store)",
        f"ClientTLS: {config.client_tls}",
        f"TLSCertificate: {config.tls_certificate or ''}".rstrip(),
        f"TLSKey: {config.tls_key or ''}".rstrip(),
        "DebugFiles: on" if config.debug_files else "# DebugFiles: off (has no effect)",
        f"ScanErrorAction: {config.scan_error_action}",
        f"RejectMessage: {config.reject_message}",
        f"MaxScanSize: {format_size(config.max_scan_size)}"
        if config.max_scan_size is not None
        else "# MaxScanSize: not set (no limit but clamd's StreamMaxLength)",
        f"OversizeAction: {config.oversize_action}"
        if config.oversize_action is not None
        else "# OversizeAction: not set (pass with MaxScanSize; else too big for clamd is a scan "
        "error, as in 1.10)",
        f"SkipNetworks: {' '.join(map(str, config.skip_networks))}".rstrip(),
        f"SkipAuthenticated: {_onoff(config.skip_authenticated)}",
        f"VirusAllow: {' '.join(config.virus_allow)}".rstrip(),
        "InfectedHostLimit: {} {}".format(*config.infected_host_limit)
        if config.infected_host_limit is not None
        else "# InfectedHostLimit: not set (no containment)",
        f"InfectedHostBlock: {config.infected_host_block}",
    ]
    return "\n".join(lines) + "\n"


# --- directive handlers: (value, values) -> warnings; raise ValueError with the reason ---

_Handler = Callable[[str, dict[str, Any]], list[str]]


def _address_handler(field: str, default_host: str | None, default_port: int) -> _Handler:
    def handle(value: str, values: dict[str, Any]) -> list[str]:
        if not value:
            raise ValueError(f"empty value (expected {_ADDRESS_FORMS})")
        try:
            values[field] = parse_address(
                value, default_host=default_host, default_port=default_port
            )
        except ValueError as error:
            reason = _show(str(error), limit=200)
            if value not in str(error):
                reason = f"invalid address '{_show(value)}': {reason}"
            if "expected" not in reason:
                reason += f" (expected {_ADDRESS_FORMS})"
            raise ValueError(reason) from None
        return []

    return handle


def _clam_addresses(value: str, values: dict[str, Any]) -> list[str]:
    """One or more clamds, separated by commas or spaces (so a unix path cannot hold either)."""
    parts = [part for part in re.split(r"[,\s]+", value) if part]
    if not parts:
        raise ValueError(f"empty value (expected one or more of {_ADDRESS_FORMS})")
    if len(parts) > MAX_CLAMDS:
        raise ValueError(f"{len(parts)} addresses (at most {MAX_CLAMDS})")
    one = _address_handler("clam_address", CLAM_HOST, CLAM_PORT)
    addresses: list[Address] = []
    seen: set[tuple[str | None, int | None, str | None]] = set()
    for part in parts:
        one(part, values)
        address = values.pop("clam_address")
        endpoint = (address.host, address.port, address.path)  # "3310" is 127.0.0.1:3310
        if endpoint in seen:
            raise ValueError(f"'{_show(part)}' is listed twice")
        seen.add(endpoint)
        addresses.append(address)
    values["clam_addresses"] = tuple(addresses)
    return []


def _bool_handler(field: str, note: str | None = None) -> _Handler:
    def handle(value: str, values: dict[str, Any]) -> list[str]:
        values[field] = _parse_bool(value)
        return [note] if note else []

    return handle


def _int_handler(field: str, low: int, high: int, unit: str, kind: type = int) -> _Handler:
    def handle(value: str, values: dict[str, Any]) -> list[str]:
        if not value.isascii() or not value.isdigit() or len(value) > 9:
            number = None
        else:
            number = int(value)
        if number is None or not low <= number <= high:
            expected = f"a whole number of {unit} from {low} to {high}"
            raise ValueError(f"invalid value '{_show(value)}' (expected {expected})")
        values[field] = kind(number)
        return []

    return handle


def _string_handler(field: str, what: str | None) -> _Handler:
    """``what`` names a required value; None means an empty value clears the setting."""

    def handle(value: str, values: dict[str, Any]) -> list[str]:
        if not value and what is not None:
            raise ValueError(f"empty value (expected {what})")
        values[field] = value or None
        return []

    return handle


def _optional(field: str, handler: _Handler) -> _Handler:
    """An empty value turns the setting off (an extension directive, so off by default)."""

    def handle(value: str, values: dict[str, Any]) -> list[str]:
        if not value:
            values[field] = None
            return []
        return handler(value, values)

    return handle


def _choice(field: str, kind: type[enum.StrEnum]) -> _Handler:
    def handle(value: str, values: dict[str, Any]) -> list[str]:
        try:
            values[field] = kind(value.lower())
        except ValueError:
            expected = _alternatives(tuple(kind))
            raise ValueError(f"invalid value '{_show(value)}' (expected {expected})") from None
        return []

    return handle


def _alternatives(choices: tuple[str, ...]) -> str:
    """("a", "b", "c") -> "a, b or c"."""
    return ", ".join(choices[:-1]) + " or " + choices[-1]


def _tls_name(value: str, values: dict[str, Any]) -> list[str]:
    if value and (any(c.isspace() or c in "/:[]" for c in value) or _is_ip(value)):
        raise ValueError(f"invalid value '{_show(value)}' (expected the host name the next "
                         "hop's certificate carries, e.g. mail.example.org)")
    values["out_tls_name"] = value or None
    return []


def _bounce(value: str, values: dict[str, Any]) -> list[str]:
    if _parse_bool(value):
        values["action"] = Action.BOUNCE
    return ['please use "Action" option instead of "Bounce"']


def _header(value: str, values: dict[str, Any]) -> list[str]:
    template = _unescape(value).strip()
    try:
        size = len(template.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("value is not valid UTF-8 (save the file as UTF-8)") from None
    if size > MAX_HEADER_BYTES:
        raise ValueError(f"header too long ({size} bytes, at most {MAX_HEADER_BYTES})")
    values["header"] = template
    return template_problems(template)


def _scan_header(value: str, values: dict[str, Any]) -> list[str]:
    return ['please use "Header" option instead of "ScanHeader"', *_header(value, values)]


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


def _reject_message(value: str, values: dict[str, Any]) -> list[str]:
    problem = reject_message_problem(value)
    if problem:
        raise ValueError(problem)
    values["reject_message"] = value
    return []


def _transparency(value: str, values: dict[str, Any]) -> list[str]:
    if value.lower() == "full":
        values["transparent_proxy"] = Transparency.FULL
        return []
    try:
        on = _parse_bool(value)
    except ValueError:
        shown = _show(value)
        raise ValueError(f"invalid value '{shown}' (expected on, off or full)") from None
    values["transparent_proxy"] = Transparency.ON if on else Transparency.OFF
    return []


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


def _max_scan_size(value: str, values: dict[str, Any]) -> list[str]:
    values["max_scan_size"] = parse_size(value) if value else None
    return []


def _skip_networks(value: str, values: dict[str, Any]) -> list[str]:
    networks: list[IPNetwork] = []
    for word in _LIST_SEPARATORS.split(value.strip()):
        if not word:
            continue
        try:
            network = ipaddress.ip_network(word)
        except ValueError:
            try:
                fixed = ipaddress.ip_network(word, strict=False)
            except ValueError:
                raise ValueError(f"invalid network '{_show(word)}' (expected addresses or CIDR "
                                 "networks such as 192.0.2.0/24 or 2001:db8::/32)") from None
            raise ValueError(f"'{_show(word)}' has host bits set (did you mean {fixed}?)") from None
        mapped = getattr(network.network_address, "ipv4_mapped", None)
        if mapped is not None and network.prefixlen >= 96:  # clients are seen as plain IPv4
            network = ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}")
        if network not in networks:
            networks.append(network)
    values["skip_networks"] = tuple(networks)
    return []


def _virus_allow(value: str, values: dict[str, Any]) -> list[str]:
    patterns: list[str] = []
    for word in _LIST_SEPARATORS.split(value.strip()):
        if not word:
            continue
        if not word.isascii() or not word.isprintable() or len(word) > MAX_VIRUS_PATTERN:
            raise ValueError(f"invalid pattern '{_show(word)}' (expected a virus name or a "
                             f"shell wildcard such as PUA.*, printable ASCII, at most "
                             f"{MAX_VIRUS_PATTERN} characters)")
        if word.strip("*?") == "":
            raise ValueError(f"pattern '{_show(word)}' matches every virus (use Action: pass "
                             "to deliver them all)")
        if word not in patterns:
            patterns.append(word)
    values["virus_allow"] = tuple(patterns)
    return []


def _infected_host_limit(value: str, values: dict[str, Any]) -> list[str]:
    if not value:
        values["infected_host_limit"] = None
        return []
    words = value.split()
    expected = (f"expected COUNT SECONDS: 1 to {MAX_INFECTED_COUNT} infected messages within "
                f"1 to {MAX_SECONDS} seconds, e.g. 3 600")
    if len(words) != 2 or not all(w.isascii() and w.isdigit() and len(w) < 10 for w in words):
        raise ValueError(f"invalid value '{_show(value)}' ({expected})")
    count, seconds = int(words[0]), int(words[1])
    if not (1 <= count <= MAX_INFECTED_COUNT and 1 <= seconds <= MAX_SECONDS):
        raise ValueError(f"value '{_show(value)}' out of range ({expected})")
    values["infected_host_limit"] = (count, seconds)
    return []


def _workers(value: str, values: dict[str, Any]) -> list[str]:
    if value.lower() == "auto":
        values["workers"] = 0
        return []
    try:
        return _int_handler("workers", 1, MAX_WORKERS, "processes")(value, values)
    except ValueError:
        raise ValueError(f"invalid value '{_show(value)}' (expected auto, or a whole number of "
                         f"processes from 1 to {MAX_WORKERS})") from None


def _user(value: str, values: dict[str, Any]) -> list[str]:
    if not value or any(char.isspace() or char == ":" for char in value):
        shown = f"invalid value '{_show(value)}'" if value else "empty value"
        raise ValueError(f"{shown} (expected a user name or a numeric uid)")
    values["user"] = value
    return []


_DIRECTIVES: dict[str, tuple[str, _Handler]] = {
    name.lower(): (name, handler)
    for name, handler in [
        ("OutAddress", _address_handler("out_address", None, OUT_PORT)),
        ("Listen", _address_handler("listen", LISTEN_HOST, LISTEN_PORT)),
        ("ClamAddress", _clam_addresses),
        ("Header", _header),
        ("ScanHeader", _scan_header),
        ("TempDirectory", _string_handler("temp_directory", "a directory path")),
        ("Action", _choice("action", Action)),
        ("Bounce", _bounce),
        ("Quarantine", _bool_handler("quarantine")),
        ("VirusAction", _string_handler("virus_action", None)),
        ("VirusActionAsRoot", _bool_handler("virus_action_as_root")),
        ("MaxConnections", _int_handler("max_connections", 1, MAX_CONNECTIONS, "connections")),
        ("Workers", _workers),
        ("TimeOut", _int_handler("timeout", 1, MAX_SECONDS, "seconds", float)),
        ("ScanTimeout", _int_handler("scan_timeout", 1, MAX_SECONDS, "seconds", float)),
        ("KeepAlives", _int_handler("keepalives", 0, MAX_SECONDS, "seconds")),
        ("XClient", _bool_handler("xclient")),
        ("TransparentProxy", _transparency),
        ("User", _user),
        ("PidFile", _string_handler("pid_file", None)),
        ("MetricsListen", _optional(
            "metrics_listen", _address_handler("metrics_listen", LISTEN_HOST, METRICS_PORT)
        )),
        ("OutTLS", _choice("out_tls", OutTLS)),
        ("OutTLSName", _tls_name),
        ("TLSCAFile", _string_handler("tls_ca_file", None)),
        ("ClientTLS", _choice("client_tls", ClientTLS)),
        ("TLSCertificate", _string_handler("tls_certificate", None)),
        ("TLSKey", _string_handler("tls_key", None)),
        ("DebugFiles", _bool_handler("debug_files", "this option has no effect (deprecated)")),
        ("ScanErrorAction", _choice("scan_error_action", ScanErrorAction)),
        ("RejectMessage", _reject_message),
        ("MaxScanSize", _max_scan_size),
        ("OversizeAction", _choice("oversize_action", OversizeAction)),
        ("SkipNetworks", _skip_networks),
        ("SkipAuthenticated", _bool_handler("skip_authenticated")),
        ("VirusAllow", _virus_allow),
        ("InfectedHostLimit", _infected_host_limit),
        ("InfectedHostBlock", _int_handler("infected_host_block", 1, MAX_BLOCK_SECONDS, "seconds")),
    ]
}
_DEPRECATED = frozenset({"Bounce", "ScanHeader", "DebugFiles"})


# --- helpers ---


def _located(file: str, line: int, directive: str | None, message: str) -> str:
    return f"{file}:{line}: {directive}: {message}" if directive else f"{file}:{line}: {message}"


def _parse_bool(value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ValueError(f"invalid value '{_show(value)}' (expected on or off, yes or no, 1 or 0)")


def _unknown_directive(name: str) -> str:
    known = {key: canonical for key, (canonical, _) in _DIRECTIVES.items()}
    close = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.75)
    if close:
        return f"unknown directive (did you mean '{known[close[0]]}'?)"
    listed = ", ".join(sorted(set(known.values()) - _DEPRECATED))
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


def _out_address_meaning(out: Address | None) -> list[str]:
    """A comment line for the two OutAddress forms that are easy to mistake for each other."""
    if out is None or out.is_unix:
        return []
    if out.port_only:
        return [f"# OutAddress: a bare port: the loopback feature, each connection's mail goes "
                f"back to its client's own address, port {out.port}"]
    if out.host in ("0.0.0.0", "::"):
        return [f"# OutAddress: {out.host} is this host (an ordinary address, not the loopback "
                f"feature, which is a bare port)"]
    return []
def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _format_address(address: Address) -> str:
    return str(address.port) if address.port_only else str(address)


def _onoff(flag: bool) -> str:
    return "on" if flag else "off"


def _show(text: str, limit: int = 80) -> str:
    """Text fit for a message: undecodable bytes as \\xNN, control characters escaped, clipped."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    text = "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
