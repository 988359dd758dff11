"""Address syntax of clamsmtpd.conf (clamsmtp's sock_any_pton forms, plus IPv6)."""

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.addresses import Address, parse_address


def parse(text: str, default_host: str | None = "0.0.0.0", default_port: int = 25) -> Address:
    return parse_address(text, default_host=default_host, default_port=default_port)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # A bare port takes the caller's default host and is marked port-only.
        ("10025", Address(host="0.0.0.0", port=10025, port_only=True)),
        ("1", Address(host="0.0.0.0", port=1, port_only=True)),
        ("65535", Address(host="0.0.0.0", port=65535, port_only=True)),
        # IPv4, with and without a port.
        ("127.0.0.1:10026", Address(host="127.0.0.1", port=10026)),
        ("127.0.0.1", Address(host="127.0.0.1", port=25)),
        ("0.0.0.0:10025", Address(host="0.0.0.0", port=10025)),
        # IPv6, bracketed with a port, bracketed alone, or bare; normalized to compressed form.
        ("[2001:db8::1]:25", Address(host="2001:db8::1", port=25)),
        ("[::1]:3310", Address(host="::1", port=3310)),
        ("[::1]", Address(host="::1", port=25)),
        ("::1", Address(host="::1", port=25)),
        ("2001:DB8:0:0:0:0:0:1", Address(host="2001:db8::1", port=25)),
        ("::ffff:192.0.2.1", Address(host="::ffff:c000:201", port=25)),
        # Unix socket paths.
        ("/var/run/clamav/clamd.ctl", Address(path="/var/run/clamav/clamd.ctl")),
        ("run/clamd", Address(path="run/clamd")),
        # Host names are kept, not resolved.
        ("mail.example.org:25", Address(host="mail.example.org", port=25)),
        ("localhost", Address(host="localhost", port=25)),
        ("smtp-relay_2.example:2525", Address(host="smtp-relay_2.example", port=2525)),
        # Surrounding whitespace is ignored.
        ("  10.0.0.1:26 ", Address(host="10.0.0.1", port=26)),
    ],
)
def test_valid_forms(text: str, expected: Address) -> None:
    assert parse(text) == expected


def test_port_only_without_default_host() -> None:
    # OutAddress: a bare port means "back to the client's IP", so there is no host.
    address = parse("10025", default_host=None)
    assert address == Address(host=None, port=10025, port_only=True)
    assert str(address) == "10025"


def test_default_port_is_the_callers() -> None:
    assert parse("127.0.0.1", default_port=3310).port == 3310
    assert parse("clamd.local", default_port=3310).port == 3310
    assert parse("[::1]", default_port=10025).port == 10025


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty address"),
        ("   ", "empty address"),
        ("0", "out of range"),
        ("65536", "out of range"),
        ("99999999999999999999", "out of range"),
        ("1.2.3.4:99999", "port 99999 out of range (expected 1-65535)"),
        ("1.2.3.4:0", "out of range"),
        ("1.2.3.4:", "invalid port ''"),
        ("1.2.3.4:smtp", "invalid port 'smtp'"),
        ("1.2.3.4:-1", "invalid port '-1'"),
        ("1.2.3", "invalid IPv4 address '1.2.3'"),
        ("256.1.1.1:25", "invalid IPv4 address '256.1.1.1'"),
        ("1.2.3.4.5", "invalid IPv4 address"),
        ("[::1", "missing ']'"),
        ("[::1]x", "unexpected 'x' after ']'"),
        ("[::1]:", "invalid port ''"),
        ("[::1]:70000", "out of range"),
        ("[mail.example.org]:25", "invalid IPv6 address 'mail.example.org'"),
        ("[]", "invalid IPv6 address ''"),
        ("::zz", "invalid IPv6 address '::zz'"),
        ("host:25:26", "invalid IPv6 address"),
        ("host name", "invalid host name 'host name'"),
        ("host name:25", "invalid host name 'host name'"),
        ("garbage!", "invalid host name"),
        ("9host.example", "invalid host name"),
        ("-host", "invalid host name"),
        ("host\\name", "invalid host name"),
        ("mail.example.org:", "invalid port ''"),
        ("mail.example.org:smtp", "invalid port 'smtp'"),
        ("a" * 255, "host name too long"),
        ("/var/run/a:b", "must not contain ':'"),
        ("/" + "a" * 107, "unix socket path too long (108 bytes, max 107)"),
        ("/tmp/\0x", "NUL"),
        ("ｈost", "invalid host name"),
        ("１２３", "invalid host name"),
    ],
)
def test_invalid_forms(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse(text)
    assert message in str(info.value)


def test_longest_accepted_names() -> None:
    assert parse("a" * 254).host == "a" * 254
    assert parse("/" + "a" * 106).path == "/" + "a" * 106


@pytest.mark.parametrize(
    ("address", "text"),
    [
        (Address(host="127.0.0.1", port=10025), "127.0.0.1:10025"),
        (Address(host="2001:db8::1", port=25), "[2001:db8::1]:25"),
        (Address(host="mail.example.org", port=25), "mail.example.org:25"),
        (Address(path="/var/run/clamav/clamd.ctl"), "/var/run/clamav/clamd.ctl"),
        (Address(port=10025, port_only=True), "10025"),
        (Address(host="0.0.0.0", port=10025, port_only=True), "0.0.0.0:10025"),
    ],
)
def test_str(address: Address, text: str) -> None:
    assert str(address) == text


def test_properties() -> None:
    assert parse("/run/clamd").is_unix
    assert not parse("/run/clamd").is_ipv6
    assert parse("[::1]:25").is_ipv6
    assert not parse("[::1]:25").is_unix
    assert not parse("127.0.0.1:25").is_ipv6
    assert not parse("localhost").is_ipv6
    assert not parse("25", default_host=None).is_ipv6


@pytest.mark.parametrize(
    "kwargs",
    [
        {"host": "127.0.0.1"},  # no port
        {"host": "127.0.0.1", "port": 0},
        {"host": "127.0.0.1", "port": 65536},
        {"host": "127.0.0.1", "port": True},
        {"port": 25},  # no host, not port-only
        {"host": "", "port": 25},
        {"path": "/run/x", "port": 25},
        {"path": "/run/x", "host": "h"},
        {"path": ""},
    ],
)
def test_address_rejects_inconsistent_values(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Address(**kwargs)


def test_address_is_frozen_and_hashable() -> None:
    address = parse("127.0.0.1:25")
    with pytest.raises(dataclasses.FrozenInstanceError):
        address.port = 26  # type: ignore[misc]
    assert {address, parse("127.0.0.1:25")} == {address}


# --- properties ---

_ADDRESS_CHARS = st.text(alphabet="0123456789abcdefxyz.:[]/ -_%\\\t\0", max_size=40)


@given(st.one_of(st.text(max_size=80), _ADDRESS_CHARS))
def test_parse_address_only_raises_value_error(text: str) -> None:
    try:
        address = parse(text)
    except ValueError:
        return
    assert isinstance(address, Address)


@given(st.one_of(st.text(max_size=80), _ADDRESS_CHARS))
def test_str_parses_back(text: str) -> None:
    try:
        address = parse(text, default_host=None)
    except ValueError:
        return
    assert parse(str(address), default_host=None) == address


@given(st.integers(min_value=1, max_value=65535))
def test_every_valid_port(port: int) -> None:
    assert parse(f"127.0.0.1:{port}").port == port
    assert parse(str(port)).port == port
    assert parse(f"[::1]:{port}").port == port
