"""The relay's rewriting rules, as the C original applies them (clamsmtp-behaviour.md 5.2-5.4)."""

from appliance.dialogue import advertises, envelope_address, filter_ehlo, xforward_attributes
from appliance.maillog import MAX_SUMMARY, summary


def test_ehlo_first_line_and_filtered_extensions():
    lines = (b"250-mx.example.org", b"250-PIPELINING", b"250-SIZE 1000", b"250-STARTTLS",
             b"250-8BITMIME", b"250-xclient ADDR NAME", b"250-DSN", b"250 CHUNKING")
    assert filter_ehlo(lines) == (
        b"250-smtp.passthru", b"250-PIPELINING", b"250-SIZE 1000", b"250-8BITMIME", b"250-DSN",
        b"250 XFILTERED",
    )


def test_advertises_reads_the_keyword_in_any_case():
    lines = (b"250-mx", b"250-pipelining", b"250 SIZE 10")
    assert advertises(lines, b"PIPELINING") and advertises(lines, b"SIZE")
    assert not advertises((b"250-PIPELINING", b"250 SIZE 10"), b"PIPELINING")  # a greeting
    assert not advertises((b"250-mx", b"250 XPIPELINING"), b"PIPELINING")


def test_ehlo_keeps_last_line_when_allowed():
    assert filter_ehlo((b"250-mx", b"250-BINARYMIME", b"250 SMTPUTF8")) == (
        b"250-smtp.passthru", b"250 SMTPUTF8",
    )


def test_helo_single_line():
    assert filter_ehlo((b"250 mx.example.org Hello",)) == (b"250 smtp.passthru",)


def test_envelope_address_forms():
    assert envelope_address(b"MAIL FROM:<a@example.com> SIZE=10") == "a@example.com"
    assert envelope_address(b"MAIL FROM:<>") == "<>"
    assert envelope_address(b"mail from: <a@b>") == "a@b"
    assert envelope_address(b"RCPT TO:b@example.com NOTIFY=NEVER") == "b@example.com"
    assert envelope_address(b"RCPT TO:<broken") == "broken"
    assert envelope_address(b"MAIL FROM:") == "<>"


def test_summary_format_and_bound():
    assert summary("a@b", ["c@d", "e@f"], "CLEAN") == "from=a@b, to=c@d, to=e@f, status=CLEAN"
    assert summary("", ["c@d"], "VIRUS:X") == "from=<>, to=c@d, status=VIRUS:X"
    long = summary("a@b", [f"user{i}@example.com" for i in range(200)], "CLAMAV-ERROR")
    assert len(long) <= MAX_SUMMARY and long.endswith(", status=CLAMAV-ERROR")


def test_xforward_attributes():
    line = b"XFORWARD ADDR=192.0.2.7 NAME=[UNAVAILABLE] HELO=[mx.example.net] PROTO=ESMTP"
    assert xforward_attributes(line) == {"ADDR": "192.0.2.7", "HELO": "mx.example.net"}
    assert xforward_attributes(b"XFORWARD addr=[UNAVAILABLE]") == {}


def test_ehlo_offers_our_starttls_before_the_last_line():
    lines = (b"250-mx", b"250-STARTTLS", b"250 8BITMIME")
    assert filter_ehlo(lines, add=(b"STARTTLS",)) == (
        b"250-smtp.passthru", b"250-STARTTLS", b"250 8BITMIME")
    assert filter_ehlo((b"250 mx",), add=(b"STARTTLS",)) == (
        b"250-smtp.passthru", b"250 STARTTLS")


def test_summary_names_each_legs_tls_just_before_the_status():
    assert summary("a@b", ["c@d"], "CLEAN", "TLSv1.3/none") == (
        "from=a@b, to=c@d, tls=TLSv1.3/none, status=CLEAN")
    long = summary("a@b", [f"user{i}@example.com" for i in range(200)], "CLEAN", "none/TLSv1.2")
    assert len(long) <= MAX_SUMMARY and long.endswith(", tls=none/TLSv1.2, status=CLEAN")


def test_auth_is_redacted_by_the_dispatched_verb():
    from appliance.dialogue import command_verb, loggable_command

    for line in (b"AUTH PLAIN c2VjcmV0", b"AUTH\tPLAIN c2VjcmV0", b"auth  plain c2VjcmV0",
                 b"Auth\x0cPLAIN c2VjcmV0"):
        assert command_verb(line) == b"AUTH"
        assert loggable_command(line) == b" ".join(line.split()[:2]) + b" [...]"
    assert loggable_command(b"AUTHX PLAIN abc") == b"AUTHX PLAIN abc"  # not AUTH
    assert command_verb(b"   ") == b"" and command_verb(b"") == b""
