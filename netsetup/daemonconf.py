"""The two lines of clamsmtpd.conf netsetup needs: ``Listen`` and ``TransparentProxy``.

netsetup imports nothing from the daemon, so this reads the file the way clamsmtpd does
(lines left-trimmed, empty and ``#`` lines skipped, name and value split at the first ``:``,
the last ``Listen`` wins) but looks at no other directive.  The value forms follow
clamsmtpd.conf(5): ``PORT``, ``a.b.c.d[:PORT]``, ``[v6][:PORT]``, a bare IPv6 literal,
``hostname[:PORT]``; a unix socket path cannot be the target of a REDIRECT.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from netsetup.errors import UsageError

DEFAULT_CONFIG_PATH = "/etc/clamsmtpd.conf"
DEFAULT_LISTEN_PORT = 10025

_HOSTNAME = re.compile(r"^[A-Za-z][^\s/\\:]{0,253}$")


@dataclass(frozen=True)
class Listen:
    host: str | None  # None: all addresses (a port-only Listen)
    port: int
    origin: str  # "file:line" or a phrase saying where the value came from

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        try:
            return ipaddress.ip_address(self.host) if self.host else None
        except ValueError:
            return None  # a hostname

    def __str__(self) -> str:
        if self.host is None:
            return str(self.port)
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def _is_number(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes '³' and '３', which int() refuses or reads."""
    return text.isascii() and text.isdigit()


def _port(text: str, where: str) -> int:
    if not _is_number(text) or not 1 <= int(text) <= 65535:
        raise UsageError(f"{where}: Listen: invalid port {text!r}")
    return int(text)


def parse_listen_value(value: str, where: str) -> Listen:
    """One Listen value -> Listen; UsageError naming ``where`` if netsetup cannot use it."""
    value = value.strip()
    if not value:
        raise UsageError(f"{where}: Listen: empty value")
    if _is_number(value):
        return Listen(None, _port(value, where), where)
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep:
            raise UsageError(f"{where}: Listen: missing ']' in {value!r}")
        port = DEFAULT_LISTEN_PORT
        if rest:
            if not rest.startswith(":"):
                raise UsageError(f"{where}: Listen: unexpected {rest!r} after ']'")
            port = _port(rest[1:], where)
        return Listen(_check_ip(host, 6, where), port, where)
    if value.count(":") >= 2:
        return Listen(_check_ip(value, 6, where), DEFAULT_LISTEN_PORT, where)
    host, sep, port_text = value.partition(":")
    port = _port(port_text, where) if sep else DEFAULT_LISTEN_PORT
    if re.fullmatch(r"[0-9.]+", host):
        return Listen(_check_ip(host, 4, where), port, where)
    if "/" in value:
        raise UsageError(
            f"{where}: Listen is the unix socket {value!r}; a REDIRECT needs a TCP port "
            "(give --proxy-port)"
        )
    if not _HOSTNAME.match(host):
        raise UsageError(f"{where}: Listen: invalid address {value!r}")
    return Listen(host, port, where)


def _check_ip(text: str, version: int, where: str) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise UsageError(f"{where}: Listen: invalid IPv{version} address {text!r}") from None
    if address.version != version:
        raise UsageError(f"{where}: Listen: invalid IPv{version} address {text!r}")
    return str(address)


def parse_listen(text: str, path: str) -> Listen:
    """The effective Listen of a whole config file text (the default when it has none)."""
    found = Listen(None, DEFAULT_LISTEN_PORT, f"{path}: no Listen line, clamsmtpd's default")
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.lstrip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() == "listen":
            found = parse_listen_value(value, f"{path}:{number}")
    return found


def parse_transparent(text: str, path: str) -> tuple[str, str]:
    """(mode, where it came from): "tproxy" for ``TransparentProxy: full``, else "redirect"
    (the last line wins, as in clamsmtpd; a value clamsmtpd refuses reads as redirect)."""
    found = ("redirect", f"{path}: no TransparentProxy: full")
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.lstrip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() == "transparentproxy":
            full = value.strip().lower() == "full"
            found = ("tproxy" if full else "redirect",
                     f"{path}:{number}: TransparentProxy: {value.strip()}")
    return found


def _read(path: str, explicit: bool) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except FileNotFoundError:
        if explicit:
            raise UsageError(f"{path}: no such config file (-f/--config)") from None
        return None
    except OSError as error:
        raise UsageError(f"{path}: cannot read: {error.strerror}") from None


def read_listen(path: str, *, explicit: bool) -> Listen:
    """Listen from the file at ``path``.

    A missing file is an error only when the path was given on the command line; the default
    path missing means the daemon's default port.
    """
    text = _read(path, explicit)
    if text is None:
        return Listen(None, DEFAULT_LISTEN_PORT, f"{path} not found, clamsmtpd's default")
    return parse_listen(text, path)


def read_mode(path: str, *, explicit: bool) -> tuple[str, str]:
    """(mode, origin) from the TransparentProxy line of the file at ``path``."""
    text = _read(path, explicit)
    if text is None:
        return "redirect", f"{path} not found"
    return parse_transparent(text, path)
