"""XCLIENT (Postfix): tell the next hop who the real client is, so its policies see that client.

The original sent only `XCLIENT ADDR=<ip>` and then carried on without a new EHLO, though Postfix
answers XCLIENT with a fresh 220 greeting and forgets the HELO. The relay here sends the
attributes the next hop advertises, then repeats the client's own HELO/EHLO.

The original also sent it only after an accepted HELO/EHLO and went on without it when it was
refused or not offered: a client that skipped HELO reached the next hop as the proxy itself
(an open relay behind a Postfix whose mynetworks holds the proxy). The rule here: with
`XClient: on`, no command outside BEFORE_XCLIENT reaches the next hop before it accepted XCLIENT
for this client, and if it does not, the session ends (the relay answers 421).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket

from .upstream import Reply, Upstream

#: How long the reverse lookup for NAME= may take before NAME=[TEMPUNAVAIL] is sent.
NAME_LOOKUP_TIMEOUT = 5.0


def advertised_attributes(lines: tuple[bytes, ...]) -> frozenset[str] | None:
    """The attribute names of the next hop's `250-XCLIENT ADDR NAME ...` line, None if absent."""
    for line in lines[1:]:
        words = line[4:].decode("ascii", "replace").upper().split()
        if words and words[0] == "XCLIENT":
            return frozenset(words[1:])
    return None


def xtext(value: str) -> str:
    """RFC 3461 xtext, as XCLIENT wants for its values."""
    return "".join(
        c if 33 <= ord(c) <= 126 and c not in "+=" else "".join(f"+{b:02X}" for b in c.encode())
        for c in value
    )


def command(attributes: frozenset[str], *, addr: str, name: str, helo: str | None,
            proto: str) -> bytes:
    """The XCLIENT line with those of ADDR, NAME, HELO, PROTO the next hop accepts."""
    ip = ipaddress.ip_address(addr)
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    values = {
        "ADDR": f"IPV6:{ip.compressed}" if ip.version == 6 else str(ip),
        "NAME": name,
        "HELO": helo,
        "PROTO": proto,
    }
    parts = [f"{key}={xtext(value)}" for key, value in values.items()
             if value and key in attributes]
    return ("XCLIENT " + " ".join(parts)).encode()


async def verified_name(addr: str) -> str:
    """The client's host name if its reverse and forward DNS agree (what Postfix would see).

    `[UNAVAILABLE]` when there is no such name, `[TEMPUNAVAIL]` when DNS did not answer in time.
    """
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(NAME_LOOKUP_TIMEOUT):
            name, _ = await loop.getnameinfo((addr, 0), socket.NI_NAMEREQD)
            infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except TimeoutError:
        return "[TEMPUNAVAIL]"
    except (OSError, UnicodeError):
        return "[UNAVAILABLE]"
    wanted = ipaddress.ip_address(addr)
    for info in infos:
        try:
            if ipaddress.ip_address(str(info[4][0]).split("%")[0]) == wanted:
                return name
        except ValueError:
            continue
    return "[UNAVAILABLE]"


class XclientError(Exception):
    """XCLIENT is on but the next hop did not take it: the session must not go on, or the next
    hop's access rules would judge the proxy (often in its mynetworks) instead of the client."""


#: Commands that may reach the next hop before XCLIENT: they carry nothing its access rules judge.
BEFORE_XCLIENT = frozenset({b"HELO", b"EHLO", b"NOOP", b"RSET", b"HELP", b"QUIT"})


def own_name() -> str:
    """The name in the proxy's own EHLO, sent only to learn what XCLIENT attributes the next hop
    takes (XCLIENT then replaces the whole client identity, HELO included)."""
    return socket.gethostname() or "localhost"


async def introduce(upstream: Upstream, ehlo: Reply | None, *, client_ip: str,
                    helo: str | None, proto: str,
                    log: logging.LoggerAdapter[logging.Logger]) -> None:
    """Send XCLIENT for this client; raise XclientError unless the next hop answered 220.

    `ehlo` is the next hop's reply to an EHLO in this session, if there was one; without it
    (the client said HELO, or nothing, or its greeting was refused) the proxy sends its own EHLO
    to learn the attributes. Afterwards the next hop is back at its greeting stage: the caller
    repeats the client's HELO/EHLO, if the client had one.
    """
    if ehlo is None:
        ehlo = await upstream.command(f"EHLO {own_name()}".encode())
        if ehlo.code != 250:
            raise XclientError(f"XCLIENT not possible, server refused our EHLO: {ehlo.text}")
    attributes = advertised_attributes(ehlo.lines)
    if not attributes or "ADDR" not in attributes:
        raise XclientError("XCLIENT not possible, the server does not offer XCLIENT ADDR")
    name = await verified_name(client_ip) if "NAME" in attributes else ""
    line_out = command(attributes, addr=client_ip, name=name, helo=helo, proto=proto)
    log.debug("XCLIENT > %s", line_out.decode("ascii", "replace"))
    answer = await upstream.command(line_out)
    if answer.code != 220:
        raise XclientError(f"server didn't accept XCLIENT: {answer.text}")
