"""The lab kit itself: the private clamd, the recording next hop, the fixtures and the lab runner.

Everything here is real: clamd with the one-line EICAR database, aiosmtpd on loopback, and for
the fixture and runner checks the C clamsmtpd from Debian's clamsmtp package (the reference the
project's daemon is compared with).
"""

from __future__ import annotations

import importlib.util
import shutil
import smtplib
from pathlib import Path

import pyclamd
import pytest
from helpers import (
    EICAR,
    free_port,
    make_message,
    send_raw,
    smtp_client,
    zip_bytes,
)

import lab.clamd as clamd_module
from lab import PrivateClamd, RecordingNextHop, eicar_bytes
from lab.__main__ import main as lab_main
from lab.__main__ import parse_args, write_config
from lab.clamd import FOUND_NAME, ClamdError

CLEAN_CORPUS = Path("/usr/share/clamav-testfiles")
FOUND = ("FOUND", FOUND_NAME)

needs_reference_daemon = pytest.mark.skipif(
    shutil.which("clamsmtpd") is None,
    reason="needs the C clamsmtpd (apt package clamsmtp; scripts/setup installs it)",
)


# -- PrivateClamd ---------------------------------------------------------------------------


def test_eicar_is_the_68_byte_test_string():
    assert len(EICAR) == 68
    assert eicar_bytes() == EICAR
    assert EICAR.startswith(b"X5O!P%@AP") and EICAR.endswith(b"$H+H*")


def test_clamd_finds_eicar_over_instream_on_the_unix_socket(clamd):
    scanner = pyclamd.ClamdUnixSocket(clamd.socket_path)
    assert scanner.ping()
    assert scanner.scan_stream(EICAR) == {"stream": FOUND}


def test_clamd_finds_eicar_over_tcp(clamd):
    scanner = pyclamd.ClamdNetworkSocket("127.0.0.1", clamd.tcp_port)
    assert scanner.scan_stream(EICAR) == {"stream": FOUND}


def test_clean_data_is_clean(clamd):
    scanner = pyclamd.ClamdUnixSocket(clamd.socket_path)
    assert scanner.scan_stream(b"Hello, world.\r\n" * 1000) is None
    assert scanner.scan_stream(bytes(make_message("clean", "nothing to see\n"))) is None


def test_eicar_is_found_inside_a_zip(clamd):
    scanner = pyclamd.ClamdUnixSocket(clamd.socket_path)
    assert scanner.scan_stream(zip_bytes("eicar.com", EICAR)) == {"stream": FOUND}


def test_eicar_is_found_in_a_base64_mime_attachment(clamd):
    message = bytes(make_message("infected", "see attachment\n", [("eicar.com", EICAR)]))
    assert EICAR not in message  # only its base64 form is in the message text
    scanner = pyclamd.ClamdUnixSocket(clamd.socket_path)
    assert scanner.scan_stream(message) == {"stream": FOUND}


def test_eicar_in_a_zip_in_a_mime_attachment_is_found(clamd):
    message = bytes(make_message("zip", "zip attached\n", [("x.zip", zip_bytes("e.com", EICAR))]))
    scanner = pyclamd.ClamdUnixSocket(clamd.socket_path)
    assert scanner.scan_stream(message) == {"stream": FOUND}


def test_the_lab_kit_source_is_not_a_virus_sample(clamd):
    """EICAR is built from two halves, so no file of the project contains the whole string."""
    scanner = pyclamd.ClamdUnixSocket(clamd.socket_path)
    assert scanner.scan_stream(Path(clamd_module.__file__).read_bytes()) is None


@pytest.mark.skipif(not CLEAN_CORPUS.is_dir(), reason="needs apt package clamav-testfiles")
def test_clamav_testfiles_are_clean_with_the_eicar_only_database(clamd):
    scanner = pyclamd.ClamdUnixSocket(clamd.socket_path)
    samples = sorted(CLEAN_CORPUS.iterdir())[:5]
    assert samples
    for sample in samples:
        assert scanner.scan_stream(sample.read_bytes()) is None, sample


def test_clamd_logs_what_it_found(clamd):
    pyclamd.ClamdUnixSocket(clamd.socket_path).scan_stream(EICAR)
    assert f"{FOUND_NAME} FOUND" in clamd.log_text()


def test_a_killed_clamd_stops_answering_and_can_be_started_again(own_clamd):
    first_pid = own_clamd.pid
    own_clamd.kill()
    assert not own_clamd.is_running()
    with pytest.raises(OSError):
        own_clamd.ping()
    own_clamd.start()
    assert own_clamd.pid != first_pid
    assert own_clamd.ping()


def test_a_clamd_that_cannot_start_is_reported_with_its_output(tmp_path):
    broken = PrivateClamd(tmp_path, clamd_binary="/bin/false", start_timeout=5)
    with pytest.raises(ClamdError, match="exited with status 1 during start-up"):
        broken.start()


def test_a_missing_clamd_binary_says_which_package_to_install(tmp_path):
    missing = PrivateClamd(tmp_path, clamd_binary=str(tmp_path / "no-such-clamd"))
    with pytest.raises(ClamdError, match="clamav-daemon"):
        missing.start()


# -- RecordingNextHop -----------------------------------------------------------------------


def test_next_hop_records_a_transaction(next_hop):
    message = make_message("recorded", "body line\n")
    with smtplib.SMTP(*next_hop.address, local_hostname="client.test", timeout=10) as client:
        refused = client.sendmail("alice@example.com", ["bob@example.com", "carol@example.com"],
                                  bytes(message))
    assert refused == {}
    [received] = next_hop.wait_for(1)
    assert received.mail_from == "alice@example.com"
    assert received.rcpt_tos == ["bob@example.com", "carol@example.com"]
    assert received.original_content == bytes(message)
    assert received.helo == "client.test"
    assert received.peer[0] == "127.0.0.1"
    assert received.header("Subject") == "recorded"
    assert received.reply.startswith("250")


def test_next_hop_greets_and_advertises_as_aiosmtpd_by_default(next_hop):
    greeting, ehlo, quit_reply = send_raw(*next_hop.address, ["EHLO client.test", "QUIT"])
    assert greeting.startswith("220 nexthop.test")
    assert ehlo.splitlines() == ["250-nexthop.test", "250-8BITMIME", "250-SMTPUTF8", "250 HELP"]
    assert quit_reply.startswith("221")


def test_raw_dialogue_sees_data_after_dot_unstuffing(next_hop):
    replies = send_raw(*next_hop.address, [
        "HELO raw.test",
        "MAIL FROM:<a@example.com>",
        "RCPT TO:<b@example.com>",
        "DATA",
        b"Subject: raw\r\n\r\n..a line that starts with a dot\r\n.\r\n",
        "QUIT",
    ])
    assert [reply[:3] for reply in replies] == ["220", "250", "250", "250", "354", "250", "221"]
    [received] = next_hop.wait_for(1)
    assert received.original_content == b"Subject: raw\r\n\r\n.a line that starts with a dot\r\n"


def test_send_raw_can_pipeline_and_send_without_waiting(next_hop):
    replies = send_raw(*next_hop.address, [
        "EHLO raw.test",
        (b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n", 3),
        (b"Subject: in two parts\r\n\r\n", 0),
        b"body\r\n.\r\n",
    ])
    assert [reply[:3] for reply in replies] == ["220", "250", "250", "250", "354", "250"]
    assert next_hop.wait_for(1)[0].original_content == b"Subject: in two parts\r\n\r\nbody\r\n"


@pytest.mark.next_hop_replies(MAIL="451 4.3.0 try later")
def test_scripted_mail_reply(next_hop):
    with smtplib.SMTP(*next_hop.address, local_hostname="client.test", timeout=10) as client:
        client.ehlo()
        assert client.mail("alice@example.com") == (451, b"4.3.0 try later")
    assert next_hop.messages == []


@pytest.mark.next_hop_replies(**{"RCPT:bad@example.com": "550 5.1.1 no such user"})
def test_scripted_reply_for_one_recipient(next_hop):
    with smtplib.SMTP(*next_hop.address, local_hostname="client.test", timeout=10) as client:
        refused = client.sendmail("a@example.com", ["good@example.com", "BAD@example.com"],
                                  b"Subject: x\r\n\r\nx\r\n")
    assert refused == {"BAD@example.com": (550, b"5.1.1 no such user")}
    assert next_hop.wait_for(1)[0].rcpt_tos == ["good@example.com"]


@pytest.mark.next_hop_replies(DATA="554 5.7.1 no")
def test_scripted_data_reply_refuses_the_message(next_hop):
    client = smtplib.SMTP(*next_hop.address, local_hostname="client.test", timeout=10)
    with client, pytest.raises(smtplib.SMTPDataError) as refused:
        client.sendmail("a@example.com", ["b@example.com"], b"Subject: x\r\n\r\nx\r\n")
    assert refused.value.smtp_code == 554
    assert next_hop.messages == []
    assert [r.reply for r in next_hop.rejected] == ["554 5.7.1 no"]


def test_replies_can_be_changed_while_running(next_hop):
    next_hop.set_reply("rcpt", "452 4.5.3 too many recipients")
    replies = send_raw(*next_hop.address, ["HELO x", "MAIL FROM:<a@x.test>", "RCPT TO:<b@x.test>"])
    assert replies[-1] == "452 4.5.3 too many recipients"
    next_hop.set_reply("RCPT", None)
    replies = send_raw(*next_hop.address, ["HELO x", "MAIL FROM:<a@x.test>", "RCPT TO:<b@x.test>"])
    assert replies[-1].startswith("250")


@pytest.mark.next_hop_replies(ehlo_extensions=["PIPELINING", "STARTTLS", "CHUNKING", "8BITMIME"])
def test_scripted_ehlo_extensions(next_hop):
    _, ehlo = send_raw(*next_hop.address, ["EHLO client.test"])
    assert ehlo.splitlines() == [
        "250-nexthop.test", "250-PIPELINING", "250-STARTTLS", "250-CHUNKING", "250 8BITMIME",
    ]


@pytest.mark.next_hop_replies(greeting="554 5.3.2 go away")
def test_scripted_refusing_greeting(next_hop):
    replies = send_raw(*next_hop.address, ["EHLO client.test", "QUIT"])
    assert replies == ["554 5.3.2 go away", "503 5.5.1 Bad sequence of commands", "221 Bye"]


@pytest.mark.next_hop_replies(greeting="421 4.3.2 shutting down")
def test_scripted_421_greeting_closes_the_connection(next_hop):
    assert send_raw(*next_hop.address, ["EHLO client.test"]) == ["421 4.3.2 shutting down"]


@pytest.mark.next_hop_replies(greeting="220 mx.example.net ESMTP ready")
def test_scripted_220_greeting_only_changes_the_text(next_hop):
    greeting, ehlo = send_raw(*next_hop.address, ["EHLO client.test"])
    assert greeting == "220 mx.example.net ESMTP ready"
    assert ehlo.startswith("250-nexthop.test")


def test_wait_for_says_how_many_arrived(next_hop):
    with pytest.raises(TimeoutError, match="accepted 0 message"):
        next_hop.wait_for(1, timeout=0.2)


def test_next_hop_calls_on_message():
    seen = []
    with RecordingNextHop(on_message=seen.append) as hop:
        with smtplib.SMTP(*hop.address, local_hostname="client.test", timeout=10) as client:
            client.sendmail("a@example.com", ["b@example.com"], b"Subject: cb\r\n\r\nx\r\n")
        hop.wait_for(1)
    assert [m.header("subject") for m in seen] == ["cb"]


# -- the appliance fixture, run here with the reference daemon ------------------------------


@needs_reference_daemon
class TestApplianceFixtureWithTheReferenceDaemon:
    """The fixture machinery (config, markers, logs, spool check), independent of our daemon."""

    @pytest.fixture
    def daemon_kind(self):
        return "reference"

    def test_clean_mail_goes_through_with_the_scanned_header(self, appliance, next_hop):
        with smtp_client(appliance) as client:
            client.send_message(make_message("through the proxy"))
        [received] = next_hop.wait_for(1)
        assert received.header("Subject") == "through the proxy"
        assert received.header("X-Virus-Scanned") is not None
        appliance.wait_log("status=CLEAN")

    @pytest.mark.appliance_config(Action="bounce")
    def test_marker_overrides_the_config(self, appliance, next_hop):
        assert "Action: bounce" in appliance.conf_path.read_text()
        with smtp_client(appliance) as client, pytest.raises(smtplib.SMTPDataError) as refused:
            client.send_message(make_message("infected", "x\n", [("eicar.com", EICAR)]))
        assert refused.value.smtp_code == 550
        assert next_hop.messages == []
        assert "VIRUS:" in appliance.wait_log("status=VIRUS")

    def test_spool_is_private_and_config_points_at_the_lab(self, appliance, clamd, next_hop):
        assert appliance.spool_dir.stat().st_mode & 0o777 == 0o700
        conf = appliance.conf_path.read_text()
        assert f"Listen: 127.0.0.1:{appliance.port}" in conf
        assert f"OutAddress: 127.0.0.1:{next_hop.port}" in conf
        assert f"ClamAddress: {clamd.socket_path}" in conf
        assert appliance.proc.poll() is None

    def test_wait_log_shows_the_log_on_timeout(self, appliance):
        with pytest.raises(AssertionError, match="not in the daemon's log"):
            appliance.wait_log("no such line", timeout=0.2)


# -- the lab runner (scripts/lab, python -m lab) -------------------------------------------


def test_lab_options_are_checked():
    with pytest.raises(SystemExit):
        parse_args(["--listen-port", "10025", "--next-hop-port", "10025"])
    with pytest.raises(SystemExit):
        parse_args(["--listen-port", "0"])
    assert parse_args([]).action == "drop"


def test_lab_config(tmp_path):
    conf = write_config(tmp_path, listen_port=10026, next_hop_port=10025,
                        clamd_socket="/x/clamd.sock", action="bounce")
    lines = [line for line in conf.read_text().splitlines() if not line.startswith("#")]
    assert lines == [
        "Listen: 127.0.0.1:10026",
        "OutAddress: 127.0.0.1:10025",
        "ClamAddress: /x/clamd.sock",
        f"TempDirectory: {tmp_path / 'spool'}",
        "Action: bounce",
        "TimeOut: 60",
    ]
    assert (tmp_path / "spool").stat().st_mode & 0o777 == 0o700


def _demo_args(tmp_path) -> list[str]:
    return ["--demo", "--workdir", str(tmp_path / "lab"),
            "--listen-port", str(free_port()), "--next-hop-port", str(free_port())]


@needs_reference_daemon
def test_lab_demo_with_the_reference_daemon(tmp_path, capsys):
    assert lab_main([*_demo_args(tmp_path), "--reference"]) == 0
    out = capsys.readouterr().out
    assert "demo: clean message delivered: yes" in out
    assert "demo: EICAR delivered: no" in out
    assert "next hop received: from=<alice@example.com>" in out
    assert "X-Virus-Scanned=yes" in out
    assert list((tmp_path / "lab" / "spool").iterdir()) == []


@pytest.mark.skipif(importlib.util.find_spec("appliance.cli") is None,
                    reason="appliance/cli.py (the daemon) is not written yet")
def test_lab_demo_with_this_projects_daemon(tmp_path, capsys):
    """What README's `scripts/lab --demo` promises."""
    assert lab_main(_demo_args(tmp_path)) == 0
    assert "demo: PASSED" in capsys.readouterr().out


def test_delay_line_holds_each_chunk_in_each_direction():
    """The lab's WAN delay line: an SMTP round trip through it costs at least 2 x delay, the
    bytes pass unchanged and in order, and a pipelined group crosses as one chunk."""
    import socket
    import time

    from lab.delayline import DelayLine

    with RecordingNextHop("127.0.0.1", 0) as hop, \
            DelayLine("127.0.0.1", hop.port, delay=0.05) as line:
        line.trace = []
        with socket.create_connection(line.address, timeout=10) as sock:
            reader = sock.makefile("rb")
            assert reader.readline().startswith(b"220")
            started = time.monotonic()
            sock.sendall(b"HELO client.test\r\n")
            assert reader.readline().startswith(b"250")
            assert time.monotonic() - started >= 0.1
            sock.sendall(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n"
                         b"DATA\r\n")
            assert [reader.readline()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
            sock.sendall(b"Subject: x\r\n\r\nthrough the line\r\n.\r\nQUIT\r\n")
            assert reader.readline().startswith(b"250")
        assert hop.wait_for(1)[0].original_content.endswith(b"through the line\r\n")
        ups = [chunk for _, direction, chunk in line.trace if direction == "up"]
        assert b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n" in ups
