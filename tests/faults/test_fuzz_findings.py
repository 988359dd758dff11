"""Bugs found while fuzzing the session (tests/fuzz/), each as a plain reproduction.

Each test states the behaviour we want; all four bugs are fixed, and the tests keep them fixed.
docs/reliability.md lists them.
"""

from __future__ import annotations

import socket

import pytest
import replies as R
from helpers import EICAR, read_reply, send_raw

from appliance.dialogue import filter_ehlo

ENVELOPE = ["EHLO client.test", "MAIL FROM:<alice@example.com>", "RCPT TO:<bob@example.com>"]


# -- 1. an EHLO line of only whitespace from the next hop -------------------------------------


def test_filter_ehlo_takes_a_blank_extension_line():
    assert filter_ehlo((b"250-fake.test", b"250- ", b"250 8BITMIME")) == (
        b"250-smtp.passthru", b"250- ", b"250 8BITMIME")


@pytest.mark.fake_next_hop(ehlo=["250-fake.test", "250- ", "250 8BITMIME"])
def test_blank_ehlo_line_from_the_next_hop_is_relayed(appliance, next_hop):
    next_hop.arm()
    replies = send_raw(appliance.host, appliance.port, ["EHLO client.test", "NOOP", "QUIT"])
    assert "Traceback" not in appliance.log()
    assert replies[1].startswith(R.EHLO_FIRST), replies  # (it was "451 Local Error", then closed)
    assert replies[2:] == ["250 2.0.0 OK", "221 2.0.0 Bye"], replies


# -- 2. a bare CR inside a command line reaches the next hop ----------------------------------


@pytest.mark.parametrize("next_hop_options", [{"mode": "any"}], ids=["CR-splitting-next-hop"])
@pytest.mark.fake_next_hop()
def test_bare_cr_in_a_command_cannot_smuggle_a_message(next_hop_options, appliance, next_hop):
    """The SMTP-smuggling of test_smuggling.py, in the command channel instead of in DATA: the
    proxy reads up to LF, so for it this is one (unknown) command, answered once."""
    next_hop.arm()
    smuggler = (b"NOOP\rDATA\rFrom: ceo@example.com\rSubject: smuggled\r\r" + EICAR
                + b"\r.\r\r\n")
    replies = send_raw(appliance.host, appliance.port, [*ENVELOPE, smuggler, "NOOP", "QUIT"])
    session = next_hop.wait_ended(next_hop.armed_session().index)
    # (before the fix, the next hop queued the smuggled message)
    assert next_hop.delivered() == [], [(t.mail_from, t.content) for t in next_hop.delivered()]
    assert all(b"\r" not in command for command in session.commands), session.commands
    assert replies[5] == "250 2.0.0 OK", replies  # the NOOP's own reply (it was "354 ...")
    assert replies[6].startswith("221"), replies


# -- 3. a SASL answer longer than the reader's limit ------------------------------------------


@pytest.mark.fake_next_hop()
def test_oversized_sasl_answer_gets_a_reply(appliance, next_hop):
    next_hop.arm({"*": "334 "})  # AUTH (not a verb the fake knows) -> "334 "
    with socket.create_connection(appliance.address, timeout=10) as sock:
        buf = bytearray()
        assert read_reply(sock, buf) == R.GREETING
        sock.sendall(b"EHLO client.test\r\n")
        assert read_reply(sock, buf).startswith("250")
        sock.sendall(b"AUTH PLAIN\r\n")
        assert read_reply(sock, buf) == "334 "
        answer = b"QUFB" * (200_000 // 4) + b"\r\n"  # 200 kB of base64
        try:
            sock.sendall(answer)
            reply = read_reply(sock, buf)
        except (BrokenPipeError, ConnectionResetError):
            reply = None
        assert reply is not None and reply[:1] == "5", reply  # (it was: no reply, reset)
        sock.sendall(b"NOOP\r\n")
        assert read_reply(sock, buf) == "250 2.0.0 OK"
