"""XCLIENT (Postfix): tell the next hop who the real client is, so its policies see that client.

The original sent only `XCLIENT ADDR=<ip>` and then carried on without a new EHLO, though Postfix
answers XCLIENT with a fresh 220 greeting and forgets the HELO. The relay here sends the
attributes the next hop advertises, then repeats the client's own HELO/EHLO.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

from .upstream import Reply

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
            if ipaddress.ip_address(info[4][0].split("%")[0]) == wanted:
                return name
        except ValueError:
            continue
    return "[UNAVAILABLE]"


async def introduce(session, line: bytes, verb: bytes, reply: Reply) -> Reply:
    """After the client's accepted HELO/EHLO: send XCLIENT, then that HELO/EHLO again.

    Returns the reply to relay to the client: the new one, or the first one if the next hop
    does not offer XCLIENT or refuses it (logged).
    """
    attributes = advertised_attributes(reply.lines)
    if attributes is None:
        if verb == b"EHLO":
            return reply  # the next hop does not offer it
        attributes = frozenset({"ADDR"})  # HELO hides capabilities: try ADDR, as the original
    name = await verified_name(session.client_ip) if "NAME" in attributes else ""
    line_out = command(
        attributes, addr=session.client_ip, name=name, helo=session.host_name,
        proto="ESMTP" if verb == b"EHLO" else "SMTP",
    )
    session.log.debug("XCLIENT > %s", line_out.decode("ascii", "replace"))
    answer = await session.upstream.command(line_out)
    if answer.code != 220:
        session.log.warning("server didn't accept XCLIENT: %s", answer.text)
        return reply
    again = await session.upstream.command(line)  # the 220 reset the session at the next hop
    if not again.positive:
        session.log.warning("server refused %s after XCLIENT: %s", verb.decode(), again.text)
    return again
