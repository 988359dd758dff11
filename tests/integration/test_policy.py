"""What happens around a virus (Quarantine, VirusAction) and around the process (signals, pid
file), tried on the running daemon."""

from __future__ import annotations

import os
import signal
import socket
import stat
import time

import pytest
import replies as R
from helpers import EICAR, ONE_AND_TWO_WORKERS, raw_session_in_data, send_raw, smtp_client
from helpers import reload_with as _set_and_reload

INFECTED = b"Subject: infected\r\n\r\n" + EICAR + b"\r\n"
CLEAN = b"Subject: clean\r\n\r\nhello\r\n"


def send(appliance, message, sender="alice@example.com", rcpts=("bob@example.com",)):
    with smtp_client(appliance) as client:
        client.ehlo()
        client.mail(sender)
        for rcpt in rcpts:
            client.rcpt(rcpt)
        return client.data(message)


@pytest.mark.appliance_config(Quarantine="on")
def test_quarantine_keeps_the_virus_private(appliance, next_hop):
    code, text = send(appliance, INFECTED)
    assert f"{code} {text.decode()}" == R.DISCARDED
    log = appliance.wait_log("quarantined virus file as: ")
    path = log.split("quarantined virus file as: ")[1].split()[0]
    try:
        assert os.path.dirname(path) == str(appliance.spool_dir)
        assert os.path.basename(path).startswith("virus.")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with open(path, "rb") as kept:
            assert kept.read() == INFECTED
        assert [n for n in appliance.spool_files() if not n.startswith("virus.")] == []
    finally:
        os.unlink(path)


def _action_script(tmp_path, body: str) -> str:
    script = tmp_path / "action.sh"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return str(script)


def _virus_action_config(tmp_path):
    dump = tmp_path / "env.txt"
    script = _action_script(
        tmp_path,
        f'for v in SENDER RECIPIENTS CLIENT SERVER VIRUS TMPDIR EMAIL REMOTE REMOTE_HELO; do\n'
        f'  eval "printf \'%s=%s\\\\n\' $v \\"\\${{$v-<unset>}}\\""\n'
        f'done > {dump}\n'
        f'echo "script ran"\n',
    )
    return script, dump


@pytest.mark.appliance_config(VirusActionAsRoot="on", Quarantine="on")
def test_virus_action_gets_the_original_environment(appliance, next_hop, tmp_path):
    script, dump = _virus_action_config(tmp_path)
    _set_and_reload(appliance, VirusAction=script)
    send(appliance, INFECTED, rcpts=("bob@example.com", "carol@example.com"))
    appliance.wait_log("VirusAction exited with status 0: script ran")
    env = dict(line.split("=", 1) for line in dump.read_text().split("\n") if "=" in line)
    assert env["SENDER"] == "alice@example.com"
    assert dump.read_text().count("carol@example.com") == 1
    assert "RECIPIENTS=bob@example.com\ncarol@example.com" in dump.read_text()
    assert env["CLIENT"] == "127.0.0.1" and env["SERVER"] == "127.0.0.1"
    assert env["VIRUS"].startswith("Eicar-Test-Signature")
    assert env["TMPDIR"] == str(appliance.spool_dir)
    assert os.path.basename(env["EMAIL"]).startswith("virus.")
    assert env["REMOTE"] == "<unset>"
    os.unlink(env["EMAIL"])


@pytest.mark.appliance_config(VirusActionAsRoot="on")
def test_virus_action_never_runs_what_the_sender_wrote(appliance, next_hop, tmp_path):
    canary = tmp_path / "pwned"
    script = _action_script(tmp_path, 'echo "sender: $SENDER"\n')
    _set_and_reload(appliance, VirusAction=script + ' "$SENDER" $RECIPIENTS')
    with smtp_client(appliance) as client:
        client.ehlo()
        # backquote, $, { and } are plain characters of an address's local part (RFC 5322 atext)
        assert client.docmd(f"MAIL FROM:<`touch${{IFS}}{canary}`@example.com>")[0] == 250
        assert client.docmd(f'RCPT TO:<"x;touch {canary}"@example.com>')[0] == 250
        assert client.data(INFECTED)[0] == 250
    appliance.wait_log("VirusAction exited with status")
    time.sleep(0.3)
    assert not canary.exists()


@pytest.mark.appliance_config(VirusActionAsRoot="on")
def test_failing_or_hanging_virus_action_never_blocks_mail(appliance, next_hop, tmp_path):
    script = _action_script(tmp_path, "echo going to sleep; sleep 30\n")
    _set_and_reload(appliance, VirusAction=script)
    started = time.monotonic()
    code, _ = send(appliance, INFECTED)
    assert code == 250 and time.monotonic() - started < 5
    assert send(appliance, CLEAN)[0] == 250
    assert len(next_hop.wait_for(1)) == 1


def test_virus_action_as_root_is_refused(tmp_path):
    import subprocess
    import sys

    conf = tmp_path / "c.conf"
    conf.write_text("OutAddress: 10025\nVirusAction: /bin/true\n")
    result = subprocess.run([sys.executable, "-m", "appliance.cli", "-d", "3", "-f", str(conf)],
                            capture_output=True, text=True, timeout=20)
    if os.geteuid() == 0:
        assert result.returncode == 2
        assert f"{conf}:0: VirusAction: would run as root" in result.stderr
    else:
        assert "would run as root" not in result.stderr


# -- SIGHUP, SIGTERM --------------------------------------------------------------------------


@ONE_AND_TWO_WORKERS
def test_sighup_reloads_the_configuration(workers, appliance, next_hop):
    assert f"{send(appliance, INFECTED)[0]}" == "250"
    _set_and_reload(appliance, Action="bounce", Listen="127.0.0.1:1",  # (every worker's line)
                    Workers=3)
    for _ in range(3 * workers):  # whichever worker takes the connection
        code, text = send(appliance, INFECTED)
        assert f"{code} {text.decode()}" == R.REJECTED
    assert "SIGHUP: Listen changed: restart clamsmtpd to apply it" in appliance.log()
    assert "SIGHUP: Workers changed: restart clamsmtpd to apply it" in appliance.log()


def test_sighup_to_a_clamd_that_does_not_answer_is_warned_about(appliance, next_hop, tmp_path):
    missing = tmp_path / "no-clamd.ctl"
    _set_and_reload(appliance, ClamAddress=missing)
    appliance.wait_log(f"clamd is not answering at {missing}: mail will be deferred (451)")
    assert f"{send(appliance, CLEAN)[0]}" == "451"
    assert next_hop.messages == []


@ONE_AND_TWO_WORKERS
def test_sighup_with_a_broken_file_keeps_the_old_configuration(workers, appliance, next_hop):
    text = appliance.conf_path.read_text()
    appliance.conf_path.write_text(text + "Action: sideways\n")
    appliance.proc.send_signal(signal.SIGHUP)
    appliance.wait_log("SIGHUP: configuration not reloaded: ")
    assert "Action: invalid value 'sideways'" in appliance.log()
    for _ in range(3 * workers):
        assert send(appliance, CLEAN)[0] == 250
    log = appliance.log()  # refused once (by the parent, with workers), and nobody changed
    assert log.count("SIGHUP: configuration not reloaded") == 1
    assert "configuration reloaded" not in log


@ONE_AND_TWO_WORKERS
def test_sigterm_lets_the_message_in_flight_finish(workers, appliance, next_hop):
    idle = socket.create_connection(appliance.address, timeout=10)
    busy = socket.create_connection(appliance.address, timeout=10)
    try:
        idle_file, busy_file = idle.makefile("rb"), busy.makefile("rb")
        assert idle_file.readline().startswith(b"220")
        busy_file.readline()
        for command in (b"HELO c\r\n", b"MAIL FROM:<a@b>\r\n", b"RCPT TO:<c@d>\r\n", b"DATA\r\n"):
            busy.sendall(command)
            busy_file.readline()
        busy.sendall(b"Subject: in flight\r\n\r\nfirst half\r\n")
        appliance.proc.send_signal(signal.SIGTERM)
        assert idle_file.readline().startswith(b"421 4.3.2")  # the idle client is told at once
        busy.sendall(b"second half\r\n.\r\n")
        assert busy_file.readline().startswith(b"250 2.0.0")  # the message got through
        busy.sendall(b"MAIL FROM:<a@b>\r\n")
        assert busy_file.readline().startswith(b"421 4.3.2")
        assert appliance.proc.wait(15) == 0
    finally:
        idle.close()
        busy.close()
    [received] = next_hop.messages
    assert received.original_content.endswith(b"first half\r\nsecond half\r\n")


# -- XClient, KeepAlives, RSET after a refusal ------------------------------------------------

XCLIENT_HOP = ["SIZE 10000000", "XCLIENT ADDR NAME HELO PROTO", "8BITMIME"]


@pytest.mark.appliance_config(XClient="on")
@pytest.mark.next_hop_replies(ehlo_extensions=XCLIENT_HOP)
def test_xclient_then_ehlo_again(appliance, next_hop):
    with smtp_client(appliance) as client:
        code, text = client.ehlo("client.test")
        assert code == 250 and b"XCLIENT" not in text  # filtered, as any XCLIENT offer
        client.sendmail("a@example.com", ["b@example.com"], CLEAN)  # needs the repeated EHLO
    events = next_hop.event_names()
    assert events[:3] == [
        "EHLO client.test",
        "XCLIENT ADDR=127.0.0.1 NAME=localhost HELO=client.test PROTO=ESMTP",
        "EHLO client.test",
    ]
    [received] = next_hop.wait_for(1)
    assert received.helo == "client.test" and received.xclient_addr == "127.0.0.1"


@pytest.mark.appliance_config(XClient="on")
@pytest.mark.next_hop_replies(ehlo_extensions=XCLIENT_HOP)
def test_xclient_for_a_client_that_never_greets(appliance, next_hop):
    """No HELO/EHLO: the proxy's own EHLO, then XCLIENT, before MAIL (issue 12). The next
    hop then judges the client as if it had connected itself: aiosmtpd requires HELO."""
    replies = send_raw(appliance.host, appliance.port, ["MAIL FROM:<a@example.com>", "QUIT"])
    assert replies[1] == "503 Error: send HELO first", replies
    assert next_hop.event_names()[:2] == [
        f"EHLO {socket.gethostname()}", "XCLIENT ADDR=127.0.0.1 NAME=localhost"]


@pytest.mark.appliance_config(XClient="on")
@pytest.mark.next_hop_replies(ehlo_extensions=XCLIENT_HOP, XCLIENT="550 5.7.0 not authorized")
def test_xclient_refused_ends_the_session(appliance, next_hop):
    replies = send_raw(appliance.host, appliance.port, ["HELO client.test", "MAIL FROM:<a@b>"])
    assert replies[1:] == [R.XCLIENT_FAILED], replies
    appliance.wait_log("server didn't accept XCLIENT: 550 5.7.0 not authorized")
    assert next_hop.messages == next_hop.rejected == []


@pytest.mark.appliance_config(XClient="on")
def test_xclient_not_offered_ends_the_session(appliance, next_hop):
    replies = send_raw(appliance.host, appliance.port, ["EHLO client.test", "MAIL FROM:<a@b>"])
    assert replies[1:] == [R.XCLIENT_FAILED], replies
    appliance.wait_log("XCLIENT not possible, the server does not offer XCLIENT ADDR")
    assert not any(e.startswith("XCLIENT") for e in next_hop.event_names())


@pytest.mark.next_hop_replies(ehlo_extensions=XCLIENT_HOP)
def test_xclient_off_by_default(appliance, next_hop):
    with smtp_client(appliance) as client:
        client.sendmail("a@example.com", ["b@example.com"], CLEAN)
    assert next_hop.event_names()[:1] == ["EHLO client.test"]
    assert not any(e.startswith("XCLIENT") for e in next_hop.event_names())


@pytest.mark.appliance_config(KeepAlives=1)
def test_keepalives_while_the_client_is_slow(appliance, next_hop):
    with raw_session_in_data(appliance, timeout=20) as (sock, f):
        sock.sendall(b"Subject: slow\r\n\r\n")
        for _ in range(4):
            time.sleep(0.9)
            sock.sendall(b"a line, slowly\r\n")
        sock.sendall(b".\r\n")
        assert f.readline().startswith(b"250 2.0.0")
    assert next_hop.event_names().count("NOOP") >= 2
    assert next_hop.wait_for(1)[0].original_content.count(b"a line, slowly") == 4


def test_no_keepalives_by_default(appliance, next_hop):
    send(appliance, CLEAN)
    assert "NOOP" not in next_hop.event_names()


def test_next_hop_is_reset_after_a_refused_message(appliance, next_hop):
    send(appliance, INFECTED)
    assert next_hop.event_names()[-1] == "RSET"
