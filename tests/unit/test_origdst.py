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
