"""Socket addresses as written in clamsmtpd.conf: ports, IPv4/IPv6 literals, host names, unix paths.

The forms and their order follow clamsmtp's ``sock_any_pton`` (plus IPv6), so existing
configuration files keep their meaning. Host names are kept as text: resolving is the
caller's job at connect time (the original re-resolves OutAddress per connection).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

_DIGITS = re.compile(r"[0-9]+")
_IPV4_SHAPE = re.compile(r"[0-9.]+")
_HOSTNAME = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")
_MAX_HOSTNAME = 254  # the original accepts fewer than 255 characters
_MAX_UNIX_PATH = 107  # sizeof(sun_path) - 1 on Linux


@dataclass(frozen=True)
class Address:
    """One endpoint: a TCP host and port, or a unix socket path."""

    host: str | None = None
    port: int | None = None
    path: str | None = None
    port_only: bool = False

    def __post_init__(self) -> None:
        if self.path is not None:
            if self.host is not None or self.port is not None or self.port_only:
                raise ValueError("a unix socket address has no host or port")
            if not self.path:
                raise ValueError("empty unix socket path")
            return
        if self.port is None:
            raise ValueError("missing port")
        if isinstance(self.port, bool) or not 1 <= self.port <= 65535:
            raise ValueError(f"port {self.port} out of range (expected 1-65535)")
        if self.host is None and not self.port_only:
            raise ValueError("missing host")
        if self.host is not None and not self.host:
            raise ValueError("empty host")

    @property
    def is_unix(self) -> bool:
        """True for a unix socket path."""
        return self.path is not None

    @property
    def is_ipv6(self) -> bool:
        """True when the host is an IPv6 literal (the only hosts that contain ':')."""
        return self.host is not None and ":" in self.host

    def __str__(self) -> str:
        if self.path is not None:
            return self.path
        if self.host is None:
            return str(self.port)
        if self.is_ipv6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_address(text: str, *, default_host: str | None, default_port: int) -> Address:
    """Parse one address; ``default_host`` fills a bare port, ``default_port`` a missing port.

    Raises ValueError with a short message saying what is wrong.
    """
    text = text.strip()
    if not text:
        raise ValueError("empty address")

    # 1. A bare port.
    if _DIGITS.fullmatch(text):
        return Address(host=default_host, port=_parse_port(text), port_only=True)

    # 2. IPv4 a.b.c.d[:port]: anything made only of digits and dots is meant as one.
    host, sep, port_text = text.partition(":")
    if _IPV4_SHAPE.fullmatch(host) and text.count(":") <= 1:
        try:
            ip = ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"invalid IPv4 address '{host}'") from None
        return Address(host=str(ip), port=_port_or_default(sep, port_text, default_port))

    # 3. IPv6 [addr]:port or [addr].
    if text.startswith("["):
        inner, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise ValueError("missing ']' after IPv6 address")
        if rest and not rest.startswith(":"):
            raise ValueError(f"unexpected '{rest}' after ']' (expected ':PORT')")
        return Address(
            host=_parse_ipv6(inner), port=_port_or_default(rest[:1], rest[1:], default_port)
        )

    # 4. A bare IPv6 literal (two or more colons), which cannot carry a port.
    if text.count(":") >= 2:
        return Address(host=_parse_ipv6(text), port=default_port)

    # 5. A unix socket path.
    if "/" in text and ":" not in text:
        if "\0" in text:
            raise ValueError("unix socket path contains a NUL character")
        size = len(text.encode("utf-8", "surrogateescape"))
        if size > _MAX_UNIX_PATH:
            raise ValueError(f"unix socket path too long ({size} bytes, max {_MAX_UNIX_PATH})")
        return Address(path=text)

    if "/" in text:
        raise ValueError("a unix socket path must not contain ':'")

    # 6. A host name, resolved later.
    if len(host) > _MAX_HOSTNAME:
        raise ValueError(f"host name too long (max {_MAX_HOSTNAME} characters)")
    if not _HOSTNAME.fullmatch(host):
        raise ValueError(
            f"invalid host name '{host}' (expected letters, digits, '.', '-' or '_', "
            "starting with a letter)"
        )
    return Address(host=host, port=_port_or_default(sep, port_text, default_port))


def _parse_port(text: str) -> int:
    if not _DIGITS.fullmatch(text):
        raise ValueError(f"invalid port '{text}' (expected a number 1-65535)")
    if len(text) > 5 or not 1 <= int(text) <= 65535:
        raise ValueError(f"port {text} out of range (expected 1-65535)")
    return int(text)


def _port_or_default(sep: str, text: str, default_port: int) -> int:
    return _parse_port(text) if sep else default_port


def _parse_ipv6(text: str) -> str:
    try:
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        raise ValueError(f"invalid IPv6 address '{text}'") from None


def plain_ip(ip: str) -> str:
    """An IPv4 peer of a dual-stack socket, as the IPv4 address it is (::ffff:a.b.c.d)."""
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip
