"""A next hop that resets its connection, on both event loops (review, session 3).

uvloop raises RuntimeError on a write to a transport whose connection is already lost, where
asyncio's own loop drops the write and reports the loss at the next read or drain. With uvloop
the default loop, a next hop that reset an idle connection turned the client's next command into
"unexpected error" (a traceback, 451) instead of the 421 and its log line; in a ClientTLS:
passthrough splice, the client's next bytes did the same.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
import replies as R
from helpers import free_port, read_reply, wait_until

LOOPS = [
    pytest.param("asyncio", marks=pytest.mark.appliance_config(EventLoop="asyncio")),
    pytest.param("uvloop", marks=pytest.mark.appliance_config(EventLoop="uvloop")),
]


class ResettingNextHop:
    """Greets, answers EHLO and STARTTLS (220); `reset_after` seconds after
    its reply to the command named `reset_at`, it resets the connection (TCP RST). Sessions that
    never get there (the fixture's readiness probe) just end."""

    host = "127.0.0.1"

    def __init__(self, reset_at: bytes, reset_after: float = 0.2) -> None:
        self.reset_at, self.reset_after = reset_at, reset_after
        self.port = free_port()
        self.resets = threading.Event()
        self._listener = socket.create_server((self.host, self.port))
        self._stopping = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as lines:
            conn.sendall(b"220 reset.test ESMTP\r\n")
            for line in lines:
                verb = line.split()[0].upper() if line.split() else b""
                if verb == b"EHLO":  # (STARTTLS offered only to the passthrough test)
                    offer = b"250-STARTTLS\r\n" if self.reset_at == b"STARTTLS" else b""
                    conn.sendall(b"250-reset.test\r\n" + offer + b"250 8BITMIME\r\n")
                elif verb == b"STARTTLS":
                    conn.sendall(b"220 2.0.0 Ready to start TLS\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 2.0.0 Bye\r\n")
                    return
                else:
                    conn.sendall(b"250 2.0.0 Ok\r\n")
                if verb == self.reset_at:
                    time.sleep(self.reset_after)
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.resets.set()
                    return

    def close(self) -> None:
        self._stopping = True
        self._listener.close()


@pytest.fixture
def next_hop(request):
    # the command after whose reply each test's next hop resets
    reset_at = b"STARTTLS" if "passthrough" in request.node.originalname else b"EHLO"
    hop = ResettingNextHop(reset_at)
    yield hop
    hop.close()


def assert_no_traceback(appliance) -> None:
    log = appliance.log()
    assert "unexpected error" not in log and "Traceback" not in log, log


@pytest.mark.parametrize("loop", LOOPS)
def test_a_next_hop_that_reset_an_idle_connection_is_a_421(loop, appliance, next_hop):
    with socket.create_connection(appliance.address, timeout=10) as sock:
        buffer = bytearray()
        assert read_reply(sock, buffer) == R.GREETING
        sock.sendall(b"EHLO client.test\r\n")
        assert read_reply(sock, buffer).startswith(R.EHLO_FIRST)
        assert next_hop.resets.wait(5)
        time.sleep(0.2)  # the proxy has seen the reset
        sock.sendall(b"NOOP\r\n")
        assert read_reply(sock, buffer) == R.NEXT_HOP_LOST
    appliance.wait_log("server connection failed")
    assert_no_traceback(appliance)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.appliance_config(ClientTLS="passthrough")
def test_a_next_hop_reset_inside_a_passthrough_splice_ends_it_quietly(loop, appliance, next_hop):
    with socket.create_connection(appliance.address, timeout=10) as sock:
        buffer = bytearray()
        assert read_reply(sock, buffer) == R.GREETING
        sock.sendall(b"EHLO client.test\r\n")
        assert "STARTTLS" in read_reply(sock, buffer)
        sock.sendall(b"STARTTLS\r\n")
        assert read_reply(sock, buffer).startswith("220")
        assert next_hop.resets.wait(5)
        time.sleep(0.2)
        try:
            sock.sendall(b"\x16\x03\x01\x00\x05hello")  # what would be the client's TLS
            while sock.recv(4096):
                pass
        except OSError:
            pass
    wait_until(lambda: "status=UNSCANNED:tls" in appliance.log(), what="the splice's end")
    assert_no_traceback(appliance)
