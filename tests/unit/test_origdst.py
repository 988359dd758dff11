"""SO_ORIGINAL_DST decoding, faked at the one platform-specific call (the real REDIRECT path is
proven end to end in network namespaces)."""

import errno
import socket
import struct

import pytest

from appliance import origdst


class FakeSocket:
    def __init__(self, local, raw=None, error=None):
        self.local, self.raw, self.error, self.asked = local, raw, error, None

    def getsockname(self):
        return self.local

    def getsockopt(self, level, option, size):
        self.asked = (level, option, size)
        if self.error:
            raise OSError(self.error, "fake")
        return self.raw


def test_ipv4():
    raw = struct.pack("!HH4s8x", socket.AF_INET, 25, socket.inet_aton("198.51.100.25"))
    sock = FakeSocket(("192.0.2.1", 10026), raw)
    assert origdst.original_addr(sock) == ("198.51.100.25", 25)
    assert sock.asked == (socket.SOL_IP, 80, 16)


def test_ipv4_client_on_a_dual_stack_socket_asks_the_ipv4_table():
    raw = struct.pack("!HH4s8x", socket.AF_INET, 25, socket.inet_aton("198.51.100.25"))
    sock = FakeSocket(("::ffff:192.0.2.1", 10026, 0, 0), raw)
    assert origdst.original_addr(sock) == ("198.51.100.25", 25)


def test_ipv6():
    packed = socket.inet_pton(socket.AF_INET6, "2001:db8:2::25")
    raw = struct.pack("!HHI16sI", socket.AF_INET6, 25, 0, packed, 0)
    sock = FakeSocket(("2001:db8:1::1", 10026, 0, 0), raw)
    assert origdst.original_addr(sock) == ("2001:db8:2::25", 25)
    assert sock.asked == (41, 80, 28)


@pytest.mark.parametrize("code", [errno.ENOENT, errno.ENOPROTOOPT])
def test_not_redirected_reads_as_ourselves(code):
    sock = FakeSocket(("192.0.2.1", 10026), error=code)
    assert origdst.original_addr(sock) == ("192.0.2.1", 10026)


def test_other_errors_are_reported():
    with pytest.raises(origdst.OrigDstError, match="couldn't get original destination"):
        origdst.original_addr(FakeSocket(("192.0.2.1", 10026), error=errno.EBADF))


# -- TransparentProxy: full (TPROXY): the accepted socket's own address ----------------------


@pytest.mark.parametrize(("local", "expected"), [
    (("198.51.100.25", 25), ("198.51.100.25", 25)),
    (("::ffff:198.51.100.25", 25, 0, 0), ("198.51.100.25", 25)),
    (("2001:db8:2::25", 25, 0, 0), ("2001:db8:2::25", 25)),
])
def test_tproxy_destination_is_the_local_address(local, expected):
    sock = FakeSocket(local)
    assert origdst.accepted_addr(sock) == expected
    assert sock.asked is None  # no SO_ORIGINAL_DST: TPROXY rewrites nothing


class _Transport:
    def __init__(self, sock, peer):
        self.sock, self.peer = sock, peer

    def get_extra_info(self, name):
        return {"socket": self.sock, "peername": self.peer}[name]


def _full_destination(local, peer, listen_port=10025):
    from appliance.config import Config, Transparency
    from appliance.nexthop import destination_for

    config = Config(path="t.conf", out_address=None, transparent_proxy=Transparency.FULL)
    lookup = destination_for(config, frozenset({listen_port}))
    return lookup(peer[0], _Transport(FakeSocket(local), peer))


def test_full_mode_forwards_to_the_address_the_client_dialled():
    dest = _full_destination(("::ffff:198.51.100.25", 25, 0, 0), ("::ffff:192.0.2.10", 40000))
    assert str(dest) == "198.51.100.25:25"


def test_full_mode_loop_guard_refuses_a_connection_straight_to_the_proxy_port():
    from appliance.nexthop import DestinationError
    from appliance.replies import REPLY_LOOP

    with pytest.raises(DestinationError, match="is this proxy") as info:
        _full_destination(("192.0.2.1", 10025), ("192.0.2.10", 40000))
    assert info.value.reply == REPLY_LOOP
