"""The fault matrix's driver, shared by its four modules (test_fault_matrix_clamd.py,
_next_hop.py, _spool.py, _client.py): the client's side of a row (a whole transaction, a raw
session) and CLIENT_LEG, which runs a row in clear and inside ClientTLS.

The promise under test: a 250 from the proxy after DATA means the next hop has the message;
anything else is a 4xx (or, for a virus, what Action says); an infected message never gets
through; no spool file is left behind; and the daemon keeps serving afterwards. So each row
checks what the client was told, what the next hop got (nothing, or exactly one copy), that the
spool is empty while the daemon still runs, and that one more clean message goes through.
"""

from __future__ import annotations

import base64
import os
import socket
import time

import pytest
import replies as R
from faultkit import delivered_contents
from helpers import read_reply, send_raw, starttls

ENVELOPE = ["EHLO client.test", "MAIL FROM:<alice@example.com>", "RCPT TO:<bob@example.com>"]


def big_message(size: int = 1 << 20, token: str = "big") -> bytes:
    """A clean message of about `size` bytes (76-column base64 lines)."""
    raw = base64.encodebytes(os.urandom(size * 3 // 4)).replace(b"\n", b"\r\n")
    return (f"From: alice@example.com\r\nTo: bob@example.com\r\nSubject: {token}\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n").encode() + raw


def transaction(appliance, message: bytes, *, timeout: float = 30.0,
                tls: bool = False) -> list[str]:
    """EHLO, MAIL, RCPT, DATA, the message and its end, QUIT: every reply, greeting first.
    `tls`: all of it inside STARTTLS (a test marked client_tls)."""
    return send_raw(appliance.host, appliance.port,
                    [*ENVELOPE, "DATA", (message + b".\r\n", 1), "QUIT"], timeout=timeout,
                    tls=tls)


#: Rows run twice: in clear (as ever, ClientTLS off), and inside a TLS session the proxy
#: terminates (ClientTLS: on, the whole dialogue after STARTTLS). Every row whose client speaks
#: SMTP to the proxy has it. Rows without it, and why:
#:   test_next_hop_refusing_connections_then_back, test_next_hop_resetting_right_after_accepting,
#:   test_next_hop_that_never_greets, test_next_hop_closing_before_greeting_gets_421, and the
#:   "greeting"/"EHLO" stages of test_next_hop_hanging_up_right_after_a_positive_reply: the
#:   fault comes before (or as the answer to) the client's first EHLO, so there is no STARTTLS
#:   to run it inside;
#:   test_next_hop_dropping_the_connection_mid_handshake: the TLS under test is the next hop's;
#:   test_unusable_temp_directory_is_reported_at_start_up, ..._on_reload: no client at all;
#:   test_flood_of_twice_max_connections: the fault is at accept (half the burst gets 421 as
#:   its greeting); the served half is a clear transaction like the other rows.
CLIENT_LEG = pytest.mark.parametrize(
    "client_leg", ["clear", pytest.param("tls", marks=pytest.mark.client_tls)])


def final_reply(replies: list[str]) -> str:
    """The reply to the end of data in `transaction`'s list (or "" if the proxy never said)."""
    assert replies[:1] == [R.GREETING], replies
    assert replies[4] == R.START_DATA, replies
    return replies[5] if len(replies) > 5 else ""


def timed_transaction(appliance, message: bytes, *,
                      tls: bool = False) -> tuple[list[str], float]:
    started = time.monotonic()
    replies = transaction(appliance, message, tls=tls)
    return replies, time.monotonic() - started


def assert_nothing_delivered(hop) -> None:
    time.sleep(0.2)  # anything in flight would have landed by now
    assert delivered_contents(hop) == []


def connect(appliance, timeout: float = 10.0, *,
            tls: bool = False) -> tuple[socket.socket, bytearray]:
    """A raw client socket past the greeting; `tls`: and past STARTTLS (ClientTLS: on)."""
    sock = socket.create_connection(appliance.address, timeout=timeout)
    buf = bytearray()
    assert read_reply(sock, buf) == R.GREETING
    return (starttls(sock, buf) if tls else sock), buf


def open_session(appliance, timeout: float = 10.0, *,
                 tls: bool = False) -> tuple[socket.socket, bytearray]:
    """A raw client socket past EHLO, MAIL and RCPT (`tls`: all inside STARTTLS)."""
    sock, buf = connect(appliance, timeout, tls=tls)
    for command in ENVELOPE:
        sock.sendall(command.encode() + b"\r\n")
        assert read_reply(sock, buf)[:1] == "2", command
    return sock, buf
