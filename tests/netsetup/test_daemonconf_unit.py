"""Unit tests of the Listen line read from clamsmtpd.conf (netsetup.daemonconf)."""

from __future__ import annotations

import textwrap

import pytest

from netsetup.daemonconf import Listen, parse_listen, read_listen
from netsetup.errors import UsageError


@pytest.mark.parametrize(
    ("value", "host", "port"),
    [
        ("10026", None, 10026),
        ("127.0.0.1:10026", "127.0.0.1", 10026),
        ("0.0.0.0", "0.0.0.0", 10025),
        ("[::]:10027", "::", 10027),
        ("[2001:db8::1]", "2001:db8::1", 10025),
        ("2001:db8::1", "2001:db8::1", 10025),
        ("localhost:10030", "localhost", 10030),
        ("  10031  ", None, 10031),
    ],
)
def test_listen_value_forms(value, host, port):
    listen = parse_listen(f"Listen: {value}\n", "clamsmtpd.conf")
    assert (listen.host, listen.port) == (host, port)
    assert listen.origin == "clamsmtpd.conf:1"


def test_listen_debian_file_last_line_wins_and_other_lines_ignored():
    text = textwrap.dedent(
        """\
        # Listen: 1
        OutAddress: 10025
        Listen: 127.0.0.1:10026
        Header: X-Virus-Scanned: ClamAV: using ClamSMTP
        this line has no colon and is not ours to judge
           listen : 0.0.0.0:10040
        """
    )
    listen = parse_listen(text, "/etc/clamsmtpd.conf")
    assert (listen.host, listen.port, listen.origin) == ("0.0.0.0", 10040, "/etc/clamsmtpd.conf:6")


def test_listen_default_when_absent():
    assert parse_listen("OutAddress: 10025\n", "c.conf").port == 10025


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("/var/run/clamsmtpd.sock", "unix socket"),
        ("127.0.0.1:0", "invalid port"),
        ("127.0.0.1:65536", "invalid port"),
        ("1.2.3", "invalid IPv4"),
        ("[::1", "missing ']'"),
        ("[127.0.0.1]:25", "invalid IPv6"),
        ("", "empty value"),
        ("\u00b3", "invalid address"),  # a superscript three: isdigit() but not int()
        ("\uff13", "invalid address"),  # a fullwidth three: clamsmtpd refuses it, so must netsetup
        ("127.0.0.1:\uff12\uff15", "invalid port"),
    ],
)
def test_listen_errors_name_file_and_line(value, message):
    with pytest.raises(UsageError, match=message) as caught:
        parse_listen(f"\n\nListen: {value}\n", "x.conf")
    assert str(caught.value).startswith("x.conf:3: ")


def test_read_listen_missing_file(tmp_path):
    missing = str(tmp_path / "nope.conf")
    assert read_listen(missing, explicit=False).port == 10025
    with pytest.raises(UsageError, match="no such config file"):
        read_listen(missing, explicit=True)


def test_listen_str():
    assert str(Listen("2001:db8::1", 25, "x")) == "[2001:db8::1]:25"
    assert str(Listen(None, 25, "x")) == "25"
