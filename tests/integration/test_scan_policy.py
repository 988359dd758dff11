"""The scanning policy directives of issue #16, end to end: the real daemon between a real
clamd (EICAR-only signatures) and a recording next hop. Each directive is also tried through
SIGHUP, as an admin changes it on a running daemon."""

from __future__ import annotations

import contextlib
import shutil
import smtplib
import subprocess
import urllib.request
from pathlib import Path

import pytest
import replies as R
from helpers import (
    EICAR,
    ONE_AND_TWO_WORKERS,
    free_port,
    raw_session_in_data,
    reload_with,
    send_raw,
    smtp_client,
    wait_until,
)

from appliance.dotstuff import stuff

INFECTED = b"Subject: infected\r\n\r\n" + EICAR + b"\r\n"
CLEAN = b"Subject: clean\r\n\r\nhello\r\n"
NOT_SCANNED = "X-Virus-Not-Scanned"


def send(appliance, message, sender="alice@example.com", rcpts=("bob@example.com",)):
    with smtp_client(appliance) as client:
        client.ehlo()
        client.mail(sender)
        for rcpt in rcpts:
            client.rcpt(rcpt)
        code, text = client.data(message)
        return f"{code} {text.decode()}"


def no_clamd(tmp_path):
    return {"ClamAddress": str(tmp_path / "no-clamd.ctl")}


# -- ScanErrorAction ---------------------------------------------------------------------------


def test_scan_error_defers_by_default(appliance, next_hop, tmp_path):
    reload_with(appliance, **no_clamd(tmp_path))
    assert send(appliance, CLEAN) == R.LOCAL_ERROR
    assert next_hop.messages == []
    assert "status=CLAMAV-ERROR" in appliance.log()


def test_scan_error_pass_delivers_with_the_not_scanned_header(appliance, next_hop, tmp_path):
    reload_with(appliance, ScanErrorAction="pass", **no_clamd(tmp_path))
    assert send(appliance, CLEAN).startswith("250 ")
    [received] = next_hop.wait_for(1)
    assert received.header(NOT_SCANNED) == "error"
    assert received.header("X-Virus-Scanned") is None  # never the header that says "scanned"
    log = appliance.wait_log("status=UNSCANNED:error")
    assert "from=alice@example.com, to=bob@example.com, status=UNSCANNED:error" in log
    assert "clamav error: could not reach clamd" in log
    reload_with(appliance, ScanErrorAction="defer")
    assert send(appliance, CLEAN) == R.LOCAL_ERROR
    assert len(next_hop.messages) == 1


@pytest.mark.appliance_config(ScanErrorAction="pass")
def test_scan_error_pass_still_stops_a_virus_clamd_found(appliance, next_hop):
    assert send(appliance, INFECTED) == R.DISCARDED
    assert send(appliance, CLEAN).startswith("250 ")
    [received] = next_hop.wait_for(1)
    assert received.header(NOT_SCANNED) is None
    assert received.header("X-Virus-Scanned") == R.DEFAULT_HEADER.decode().split(": ", 1)[1]


# -- RejectMessage -----------------------------------------------------------------------------


@pytest.mark.appliance_config(Action="bounce", RejectMessage="550 5.7.1 Virus found: %v")
def test_reject_message_names_the_virus(appliance, next_hop):
    reply = send(appliance, INFECTED)
    assert reply.startswith("550 5.7.1 Virus found: Eicar-Test-Signature"), reply
    assert next_hop.messages == []
    reload_with(appliance, RejectMessage="554 5.7.0 Refused, contact postmaster")
    assert send(appliance, INFECTED) == "554 5.7.0 Refused, contact postmaster"


@pytest.mark.appliance_config(Action="bounce")
def test_reject_message_default_is_the_originals(appliance, next_hop):
    assert send(appliance, INFECTED) == R.REJECTED


@pytest.mark.appliance_config(RejectMessage="550 5.7.1 Virus found: %v")
def test_reject_message_is_not_used_with_drop(appliance, next_hop):
    assert send(appliance, INFECTED) == R.DISCARDED


# -- MaxScanSize, OversizeAction -----------------------------------------------------------------


def big_message(size: int, *, subject: str = "big", tail: bytes = b"") -> bytes:
    """A message of about `size` bytes of 78-byte lines, some starting with a dot (dot-stuffing
    must survive the streaming), then `tail`."""
    lines = [(b"." if i % 7 == 0 else b"x") + b"%075d\r\n" % i for i in range(size // 78)]
    return b"Subject: " + subject.encode() + b"\r\n\r\n" + b"".join(lines) + tail


@pytest.mark.appliance_config(MaxScanSize="100K")
def test_over_max_scan_size_is_passed_on_unscanned(appliance, next_hop):
    message = big_message(1_000_000, tail=EICAR + b"\r\n")  # past the limit: never scanned
    assert send(appliance, message).startswith("250 ")
    [received] = next_hop.wait_for(1)
    assert received.header(NOT_SCANNED) == "size"
    assert received.header("X-Virus-Scanned") is None
    assert received.original_content.replace(b"X-Virus-Not-Scanned: size\r\n", b"") == message
    log = appliance.wait_log("status=UNSCANNED:size")
    assert "message over MaxScanSize (102400 bytes): not scanned" in log
    assert "clamav error" not in log


@pytest.mark.appliance_config(MaxScanSize="100K")
def test_under_max_scan_size_is_scanned_as_before(appliance, next_hop):
    assert send(appliance, big_message(90_000, tail=EICAR + b"\r\n")) == R.DISCARDED
    assert send(appliance, big_message(90_000)).startswith("250 ")
    [received] = next_hop.wait_for(1)
    assert received.header(NOT_SCANNED) is None and received.header("X-Virus-Scanned")


@pytest.mark.appliance_config(MaxScanSize="1M")
def test_over_max_scan_size_streams_without_holding_the_body(appliance, next_hop):
    """The first MaxScanSize bytes are held (on disk, past 256 KiB of memory); once over, the
    spool is gone while the client is still sending, and the rest goes through as it comes."""
    head = big_message(1_200_000)
    with raw_session_in_data(appliance, timeout=30) as (sock, reader):
        sock.sendall(b"".join(stuff([head])))  # (a raw client stuffs its dots itself)
        appliance.wait_log("message over MaxScanSize (1048576 bytes): not scanned")
        wait_until(lambda: appliance.spool_files() == [], what="the spool to be let go")
        more = (b"y" * 76 + b"\r\n") * 1282
        for _ in range(40):  # 4 MB more, none of it kept
            sock.sendall(more)
            assert appliance.spool_files() == []
        assert next_hop.messages == []  # the end is not there yet
        sock.sendall(b".\r\n")
        assert reader.readline().startswith(b"250 ")
    [received] = next_hop.wait_for(1)
    assert received.size == len(head) + 40 * len(more) + len(b"X-Virus-Not-Scanned: size\r\n")


@pytest.mark.appliance_config(MaxScanSize="100K")
@pytest.mark.next_hop_replies(DATA="554 5.7.1 not wanted here")
def test_streamed_message_gets_the_next_hops_refusal(appliance, next_hop):
    assert send(appliance, big_message(500_000)) == "554 5.7.1 not wanted here"
    assert next_hop.messages == [] and len(next_hop.rejected) == 1


@pytest.mark.appliance_config(MaxScanSize="100K")
def test_client_gone_mid_stream_delivers_nothing(appliance, next_hop):
    with raw_session_in_data(appliance, timeout=30) as (sock, _):
        sock.sendall(big_message(500_000))
        appliance.wait_log("not scanned")
    appliance.wait_log("unexpected end of data from client")
    assert send(appliance, CLEAN).startswith("250 ")  # the daemon goes on
    [received] = next_hop.wait_for(1)
    assert b"hello" in received.original_content and next_hop.rejected == []


@pytest.mark.appliance_config(MaxScanSize="100K", OversizeAction="reject")
def test_oversize_reject(appliance, next_hop):
    assert send(appliance, big_message(500_000)) == R.OVERSIZE_REJECTED
    assert send(appliance, CLEAN).startswith("250 ")  # the session and the next hop go on
    assert len(next_hop.wait_for(1)) == 1
    assert "status=OVERSIZE" in appliance.log()


@pytest.mark.appliance_config(MaxScanSize="100K", OversizeAction="defer")
def test_oversize_defer(appliance, next_hop):
    reply = send(appliance, big_message(500_000))
    assert reply == R.OVERSIZE_DEFERRED
    assert next_hop.messages == []
    reload_with(appliance, OversizeAction="pass")
    assert send(appliance, big_message(500_000)).startswith("250 ")
    reload_with(appliance, MaxScanSize="")
    assert send(appliance, big_message(500_000, tail=EICAR + b"\r\n")) == R.DISCARDED
    assert len(next_hop.messages) == 1


@pytest.mark.appliance_config(OversizeAction="pass")
def test_too_big_for_clamd_is_passed_with_oversize_pass(
    small_clamd, appliance, next_hop
):
    assert send(appliance, big_message(300_000)).startswith("250 ")
    [received] = next_hop.wait_for(1)
    assert received.header(NOT_SCANNED) == "size"
    log = appliance.wait_log("status=UNSCANNED:size")
    assert "INSTREAM size limit exceeded" in log


@pytest.mark.appliance_config(OversizeAction="reject")
def test_too_big_for_clamd_is_rejected_with_oversize_reject(
    small_clamd, appliance, next_hop
):
    assert send(appliance, big_message(300_000)) == R.OVERSIZE_REJECTED
    assert next_hop.messages == []


def test_too_big_for_clamd_without_the_directives_is_a_scan_error_as_before(
    small_clamd, appliance, next_hop
):
    assert send(appliance, big_message(300_000)) == R.LOCAL_ERROR
    assert "status=CLAMAV-ERROR" in appliance.wait_log("status=")
    reload_with(appliance, ScanErrorAction="pass")
    assert send(appliance, big_message(300_000)).startswith("250 ")
    assert next_hop.wait_for(1)[0].header(NOT_SCANNED) == "error"


# -- SkipNetworks, SkipAuthenticated -----------------------------------------------------------


@pytest.mark.appliance_config(SkipNetworks="192.0.2.0/24, 127.0.0.0/8")
def test_skip_networks_relays_unscanned(appliance, next_hop):
    assert send(appliance, INFECTED).startswith("250 ")  # not scanned: EICAR goes through
    [received] = next_hop.wait_for(1)
    assert received.original_content == b"X-Virus-Not-Scanned: network\r\n" + INFECTED
    assert received.header("X-Virus-Scanned") is None
    log = appliance.wait_log("status=UNSCANNED:network")
    assert "clamav" not in log
    reload_with(appliance, SkipNetworks="192.0.2.0/24 2001:db8::/32")  # not this client
    assert send(appliance, INFECTED) == R.DISCARDED
    assert len(next_hop.messages) == 1


@pytest.mark.appliance_config(SkipNetworks="127.0.0.1")
def test_skip_networks_streams_a_big_message_through(appliance, next_hop):
    message = big_message(3_000_000)
    assert send(appliance, message).startswith("250 ")
    [received] = next_hop.wait_for(1)
    assert received.original_content == b"X-Virus-Not-Scanned: network\r\n" + message


def authenticated_send(appliance, message, password="secret"):
    with smtp_client(appliance) as client:
        client.ehlo()
        with contextlib.suppress(smtplib.SMTPAuthenticationError):
            client.login("alice", password)
        client.mail("alice@example.com")
        client.rcpt("bob@example.com")
        code, text = client.data(message)
        return f"{code} {text.decode()}"


@pytest.mark.appliance_config(SkipAuthenticated="on")
@pytest.mark.next_hop_replies(auth_users={"alice": "secret"})
def test_skip_authenticated_after_the_next_hop_accepted_auth(appliance, next_hop):
    assert authenticated_send(appliance, INFECTED).startswith("250 ")
    [received] = next_hop.wait_for(1)
    assert received.header(NOT_SCANNED) == "authenticated"
    assert "status=UNSCANNED:authenticated" in appliance.wait_log("status=")
    assert "AUTH PLAIN ok" in next_hop.event_names()


@pytest.mark.appliance_config(SkipAuthenticated="on")
@pytest.mark.next_hop_replies(auth_users={"alice": "secret"})
def test_skip_authenticated_not_after_a_failed_auth(appliance, next_hop):
    assert authenticated_send(appliance, INFECTED, password="wrong") == R.DISCARDED
    assert send(appliance, INFECTED) == R.DISCARDED  # and not without AUTH
    assert next_hop.messages == []


@pytest.mark.next_hop_replies(auth_users={"alice": "secret"})
def test_authenticated_mail_is_scanned_by_default(appliance, next_hop):
    assert authenticated_send(appliance, INFECTED) == R.DISCARDED
    reload_with(appliance, SkipAuthenticated="on")
    assert authenticated_send(appliance, INFECTED).startswith("250 ")


# -- VirusAllow --------------------------------------------------------------------------------


@pytest.mark.appliance_config(VirusAllow="PUA.* Eicar-Test-*", Quarantine="on")
def test_virus_allow_delivers_with_the_virus_named(appliance, next_hop):
    assert send(appliance, INFECTED).startswith("250 ")
    [received] = next_hop.wait_for(1)
    assert received.header("X-Virus-Found").startswith("Eicar-Test-Signature")
    assert received.header("X-Virus-Scanned")  # it was scanned
    assert received.header("X-Virus-Infected") is None and received.header(NOT_SCANNED) is None
    log = appliance.wait_log("status=ALLOWED:Eicar-Test-Signature")
    assert "quarantined" not in log  # not a virus to act on: no Action, no Quarantine
    reload_with(appliance, VirusAllow="PUA.*")
    assert send(appliance, INFECTED) == R.DISCARDED
    appliance.wait_log("quarantined virus file as: ")
    for name in appliance.spool_files():
        (appliance.spool_dir / name).unlink()


@pytest.mark.appliance_config(VirusAllow="eicar-test-*", Action="bounce")
def test_virus_allow_is_case_sensitive(appliance, next_hop):
    assert send(appliance, INFECTED) == R.REJECTED


# -- InfectedHostLimit, InfectedHostBlock --------------------------------------------------------


def metric(appliance, name: str) -> float:
    port = int(appliance.directives["MetricsListen"].rsplit(":", 1)[1])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    [line] = [ln for ln in text.splitlines() if ln.startswith(name + " ")]
    return float(line.split()[1])


@pytest.mark.appliance_config(
    InfectedHostLimit="2 60", InfectedHostBlock=3, VirusActionAsRoot="on",
    MetricsListen=lambda hop: f"127.0.0.1:{free_port()}",
)
@ONE_AND_TWO_WORKERS
def test_infected_host_is_blocked_then_let_back(workers, appliance, next_hop, tmp_path):
    """(With two workers the two messages and the refused connection may each go to either:
    the count, the block and the metrics are the daemon's.)"""
    script = tmp_path / "action.sh"
    script.write_text(f'#!/bin/sh\necho "BLOCKED=${{BLOCKED-unset}}" >> {tmp_path}/env.txt\n')
    script.chmod(0o755)
    reload_with(appliance, VirusAction=script)
    assert send(appliance, INFECTED) == R.DISCARDED
    assert send(appliance, INFECTED) == R.DISCARDED  # the second within 60 s: blocked now
    log = appliance.wait_log("host 127.0.0.1 blocked for 3 s: 2 infected messages within 60 s")
    wait_until(lambda: (tmp_path / "env.txt").exists()
               and (tmp_path / "env.txt").read_text().count("\n") == 2, what="both actions")
    assert sorted((tmp_path / "env.txt").read_text().split()) == ["BLOCKED=3", "BLOCKED=unset"]
    ehlos = next_hop.event_names().count("EHLO client.test")
    replies = send_raw(appliance.host, appliance.port, ["EHLO x"])
    assert replies == [R.BLOCKED]  # at connect, before the next hop is contacted
    assert next_hop.event_names().count("EHLO client.test") == ehlos
    assert metric(appliance, "clamsmtpd_infected_hosts_blocked") == 1
    assert metric(appliance, "clamsmtpd_infected_host_blocks_total") == 1
    assert metric(appliance, "clamsmtpd_connections_refused_infected_total") == 1
    log = appliance.wait_log("host 127.0.0.1 no longer blocked", timeout=10)
    assert "refused: 127.0.0.1 is blocked for " in log
    assert send(appliance, CLEAN).startswith("250 ")
    assert metric(appliance, "clamsmtpd_infected_hosts_blocked") == 0


@pytest.mark.appliance_config(InfectedHostLimit="1 60")
def test_the_session_that_got_blocked_ends_after_its_reply(appliance, next_hop):
    with smtp_client(appliance) as client:
        client.ehlo()
        client.mail("a@example.com")
        client.rcpt("b@example.com")
        assert client.data(INFECTED)[0] == 250
        code, text = client.docmd("MAIL", "FROM:<a@example.com>")
        assert f"{code} {text.decode()}" == R.BLOCKED
    assert next_hop.messages == []


def test_no_containment_by_default(appliance, next_hop):
    for _ in range(5):
        assert send(appliance, INFECTED) == R.DISCARDED
    assert send(appliance, CLEAN).startswith("250 ")
    assert "blocked" not in appliance.log()


# -- the logcheck rule of docs/configuration.md ------------------------------------------------


def documented_logcheck_rule() -> str:
    text = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    [rule] = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("^\\w{3} ")]
    return rule


@pytest.mark.skipif(shutil.which("grep") is None, reason="grep is missing")
def test_the_documented_logcheck_rule_matches_clean_and_unscanned_only(appliance, next_hop):
    """The rule, with grep -E as logcheck runs it, on the daemon's own summary lines as syslog
    writes them: CLEAN and UNSCANNED:<reason> match, VIRUS and CLAMAV-ERROR do not."""
    send(appliance, CLEAN)
    send(appliance, INFECTED)
    reload_with(appliance, SkipNetworks="127.0.0.1")
    send(appliance, CLEAN)
    reload_with(appliance, SkipNetworks="", ClamAddress="/nonexistent/clamd.ctl",
                ScanErrorAction="pass")
    send(appliance, CLEAN)
    summaries = [ln.removeprefix("clamsmtpd: ") for ln in appliance.log().splitlines()
                 if ", status=" in ln]
    syslog = [f"Dec  6 04:29:13 gw clamsmtpd[4242]: {ln}" for ln in summaries]
    assert len(syslog) == 4
    result = subprocess.run(["grep", "-E", documented_logcheck_rule()], input="\n".join(syslog),
                            capture_output=True, text=True, timeout=10)
    matched = result.stdout.splitlines()
    assert [ln.rsplit("status=", 1)[1] for ln in matched] == [
        "CLEAN", "UNSCANNED:network", "UNSCANNED:error"]
