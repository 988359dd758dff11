"""Where a REDIRECTed connection was really going (Linux netfilter), as mitmproxy does it,
and where a TPROXY'd one was (its own local address).

`original_addr` is None off Linux: callers test that once and nothing else knows the platform.
"""

from __future__ import annotations

import errno
import socket
import struct
import sys
from collections.abc import Callable

# Python's socket module lacks these (linux/netfilter_ipv4.h, netfilter_ipv6/ip6_tables.h).
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
SOL_IPV6 = 41


class OrigDstError(Exception):
    """The kernel has no original destination for this socket (it was not redirected)."""


def _linux_original_addr(sock: socket.socket) -> tuple[str, int]:
    # Decide v4/v6 by the local address, not by sock.family: an IPv4 client on a dual-stack
    # listener arrives on an AF_INET6 socket as ::ffff:a.b.c.d, and NAT'ed it as IPv4.
    local = sock.getsockname()[0]
    try:
        if "." in local:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port, packed = struct.unpack_from("!2xH4s", raw)
            return socket.inet_ntop(socket.AF_INET, packed), port
        raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        port, _flow, packed = struct.unpack_from("!2xHI16s", raw)
        return socket.inet_ntop(socket.AF_INET6, packed), port
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOPROTOOPT):
            # No NAT entry: the client dialled us directly, so we are the destination (the
            # caller's loop guard refuses that), as sshuttle reads it.
            host, port = sock.getsockname()[:2]
            return host, port
        raise OrigDstError(f"couldn't get original destination: {e.strerror or e}") from None


def accepted_addr(sock: socket.socket) -> tuple[str, int]:
    """With TPROXY (TransparentProxy: full) nothing is rewritten: the accepted socket's own
    address is the one the client dialled (an IPv4 one unwrapped from ::ffff:a.b.c.d)."""
    host, port = sock.getsockname()[:2]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, port


original_addr: Callable[[socket.socket], tuple[str, int]] | None = (
    _linux_original_addr if sys.platform.startswith("linux") else None
)
