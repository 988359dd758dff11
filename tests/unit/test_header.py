"""The scan header template: %i %l %d %% and the line sent with clean mail."""

from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.header import expand_header, template_problems

IST = timezone(timedelta(hours=5, minutes=30))
WHEN = datetime(2024, 1, 2, 3, 4, 5, tzinfo=IST)


def expand(template: str, now: datetime | None = WHEN) -> bytes:
    return expand_header(template, client_ip="192.0.2.7", local_ip="127.0.0.1", now=now)


def test_empty_template_adds_nothing() -> None:
    assert expand("") == b""


def test_default_header() -> None:
    assert (
        expand("X-Virus-Scanned: ClamAV using ClamSMTP")
        == b"X-Virus-Scanned: ClamAV using ClamSMTP\r\n"
    )


@pytest.mark.parametrize(
    ("template", "line"),
    [
        ("X-Scanned: from %i", "X-Scanned: from 192.0.2.7"),
        ("X-Scanned: on %l", "X-Scanned: on 127.0.0.1"),
        ("X-Scanned: %i via %l", "X-Scanned: 192.0.2.7 via 127.0.0.1"),
        ("X-Scanned: 100%%", "X-Scanned: 100%"),
        ("X-Scanned: %%i", "X-Scanned: %i"),
        ("X-Scanned: %x %y", "X-Scanned: %x %y"),  # unknown symbols stay as written
        ("X-Scanned: 5%", "X-Scanned: 5%"),  # a trailing % stays
        ("X-Scanned: %d", "X-Scanned: Tue, 02 Jan 2024 03:04:05 +0530"),
    ],
)
def test_symbols(template: str, line: str) -> None:
    assert expand(template) == line.encode() + b"\r\n"


def test_date_is_rfc5322_with_correct_minutes() -> None:
    # The original printed asctime and "+051800" for +05:30; we print RFC 5322.
    line = expand("X-Date: %d").decode()
    value = line.removeprefix("X-Date: ").removesuffix("\r\n")
    assert parsedate_to_datetime(value) == WHEN
    assert value.endswith("+0530")


def test_date_defaults_to_now_in_local_time() -> None:
    before = datetime.now().astimezone().replace(microsecond=0)
    value = expand("X-Date: %d", now=None).decode()[len("X-Date: ") : -2]
    after = datetime.now().astimezone()
    stamp = parsedate_to_datetime(value)
    assert stamp.tzinfo is not None
    assert before <= stamp <= after


def test_naive_datetime_is_taken_as_local_time() -> None:
    naive = datetime(2024, 6, 1, 12, 0, 0)
    value = expand("X-Date: %d", now=naive).decode()[len("X-Date: ") : -2]
    assert parsedate_to_datetime(value) == naive.astimezone()


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("X-A: 1\r\n\tfolded", b"X-A: 1\r\n\tfolded\r\n"),
        ("X-A: 1\r\nX-B: 2", b"X-A: 1\r\nX-B: 2\r\n"),
        ("X-A: 1\nX-B: 2", b"X-A: 1\r\nX-B: 2\r\n"),  # bare LF sent as CRLF
        ("X-A: 1\rX-B: 2", b"X-A: 1\r\nX-B: 2\r\n"),
        ("X-A: 1\r\n", b"X-A: 1\r\n"),  # no doubled CRLF (that would end the headers)
        ("X-A: 1\r\n\r\nX-B: 2", b"X-A: 1\r\nX-B: 2\r\n"),  # no blank line
        ("X-A: 1\r\n \t \r\nX-B: 2", b"X-A: 1\r\nX-B: 2\r\n"),
        ("\r\n", b""),
    ],
)
def test_line_breaks_are_crlf_and_never_blank(template: str, expected: bytes) -> None:
    assert expand(template) == expected


def test_encoded_as_utf8() -> None:
    assert expand("X-Geprüft: ja") == "X-Geprüft: ja\r\n".encode()


@pytest.mark.parametrize(
    ("template", "problems"),
    [
        ("", []),
        ("X-Virus-Scanned: ClamAV using ClamSMTP", []),
        ("X-Scanned: %i %l %d 100%%", []),
        ("X-Scanned: %x", ["invalid header symbol: %x"]),
        ("X-Scanned: %x %x %y", ["invalid header symbol: %x", "invalid header symbol: %y"]),
        ("X-Scanned: %%x", []),
        ("X-Scanned: 5%", ["invalid header symbol: %"]),
        ("X-A: 1\r\n\tfolded\r\nX-B: 2\r\n", []),
        ("no colon here", ["header line 1 is not of the form 'Name: value'"]),
        ("X-A: 1\r\nnot a header", ["header line 2 is not of the form 'Name: value'"]),
        (": empty name", ["header line 1 is not of the form 'Name: value'"]),
        ("X-A: 1\r\n\r\nX-B: 2", ["empty header line 2 is dropped"]),
    ],
)
def test_template_problems(template: str, problems: list[str]) -> None:
    assert template_problems(template) == problems


@given(st.text(max_size=200), st.text(max_size=40))
def test_expansion_never_breaks_the_header_block(template: str, ip: str) -> None:
    ip = "".join(c for c in ip if c not in "\r\n")
    data = expand_header(template, client_ip=ip, local_ip="::1", now=WHEN)
    template_problems(template)
    if not data:
        return
    assert data.endswith(b"\r\n")
    lines = data[:-2].split(b"\r\n")
    assert all(line.strip() for line in lines)
    assert all(b"\r" not in line and b"\n" not in line for line in lines)
