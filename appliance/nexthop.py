"""Which SMTP server a connection is forwarded to: OutAddress, the loopback feature, or (in
transparent mode) the destination the client dialled before the firewall redirected it."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import Any, Protocol

from . import origdst
from .addresses import Address
from .config import Config, Transparency
from .replies import REPLY_LOOP, REPLY_NEXT_HOP_DOWN


class Connection(Protocol):
    """What the lookup asks of the client's connection: an asyncio transport, or the relay's
    ClientChannel (which answers for its transport)."""

    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


#: (client ip, the client's connection) -> the next hop for this connection
Destination = Callable[[str, Connection], Address]


class DestinationError(Exception):
    """No next hop for this connection (transparent lookup failed, or it would loop to us)."""

    def __init__(self, message: str, reply: str = REPLY_NEXT_HOP_DOWN) -> None:
        super().__init__(message)
        self.reply = reply


def destination_for(config: Config, listen_ports: frozenset[int] = frozenset()) -> Destination:
    """Decide once how to find the next hop; per connection only the address is computed."""
    if config.transparent_proxy is Transparency.FULL:
        accepted = origdst.accepted_addr
        return lambda client_ip, transport: _original(transport, listen_ports, accepted)
    if config.transparent_proxy:
        return lambda client_ip, transport: _original(transport, listen_ports)
    out = config.out_address
    assert out is not None, "config guarantees OutAddress without TransparentProxy"
    if out.port_only:
        # The loopback feature: hand the mail back to the machine it came from. Only a bare
        # port means it: 0.0.0.0:PORT is an ordinary address (the local host, as the docs say);
        # read as loopback it sent mail to port PORT of whoever connected (issue 12).
        return lambda client_ip, transport: Address(host=client_ip, port=out.port)
    return lambda client_ip, transport: out


def _original(
    transport: Connection, listen_ports: frozenset[int],
    lookup: Callable[[socket.socket], tuple[str, int]] | None = None,
) -> Address:
    lookup = lookup or origdst.original_addr
    if lookup is None:
        raise DestinationError("transparent proxying is not supported on this platform")
    sock = transport.get_extra_info("socket")
    if sock is None:
        raise DestinationError("couldn't get source address for transparent proxying")
    try:
        host, port = lookup(sock)
    except origdst.OrigDstError as e:
        raise DestinationError(f"{e} (was the connection redirected?)") from None
    local_host = sock.getsockname()[0]
    if port in listen_ports and _same_host(host, local_host):
        raise DestinationError(
            f"loop detected in transparent proxying: {Address(host=host, port=port)} is this proxy",
            REPLY_LOOP,
        )
    peer = transport.get_extra_info("peername")
    if peer and _same_host(host, peer[0]):
        raise DestinationError(
            f"loop detected in transparent proxying: {host} is the client", REPLY_LOOP
        )
    return Address(host=host, port=port)


def _same_host(a: str, b: str) -> bool:
    try:
        x, y = ipaddress.ip_address(a), ipaddress.ip_address(b)
    except ValueError:
        return a == b
    x = getattr(x, "ipv4_mapped", None) or x
    y = getattr(y, "ipv4_mapped", None) or y
    return x == y

