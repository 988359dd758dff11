"""Defects found by an outside security review (issue 12), each as a plain reproduction.

Each test states the behaviour we want and failed on the code before its fix.
docs/security.md describes the rules they hold.
"""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import stat
import subprocess
import sys
from types import SimpleNamespace

import pytest
import replies as R
from faultkit import assert_no_spool_files, assert_still_serving, clean_message
from helpers import (
    EICAR,
    free_port,
    proxy_directives,
    reload_with,
    send_raw,
    start_daemon,
    wait_accepting,
    wait_until,
)

from lab import RecordingNextHop

ENVELOPE = ["EHLO client.test", "MAIL FROM:<alice@example.com>", "RCPT TO:<bob@example.com>"]
XCLIENT_EHLO = ["250-fake.test", "250-XCLIENT ADDR", "250 8BITMIME"]
OWN_EHLO = f"EHLO {socket.gethostname()}".encode()
MESSAGE = (clean_message("xclient") + b".\r\n", 1)


# -- 1. XClient: on, but commands reach the next hop before XCLIENT --------------------------------


@pytest.mark.appliance_config(XClient="on")
@pytest.mark.fake_next_hop(ehlo=XCLIENT_EHLO)
def test_xclient_before_mail_when_the_client_never_greets(appliance, next_hop):
    """No HELO/EHLO (Postfix does not require one): the proxy introduces the client itself
    before MAIL. Before the fix MAIL, RCPT and DATA reached the next hop as from the proxy."""
    next_hop.arm({"*": "220 fake.test ESMTP"})  # (XCLIENT is "*" to the fake)
    replies = send_raw(appliance.host, appliance.port,
                       [*ENVELOPE[1:], "DATA", MESSAGE, "QUIT"])
    assert replies[1:3] == ["250 2.1.0 OK", "250 2.1.5 OK"], replies
    assert replies[4].startswith("250 2.0.0 Ok: queued"), replies
    session = next_hop.wait_ended(next_hop.armed_session().index)
    assert session.commands[:4] == [OWN_EHLO, b"XCLIENT ADDR=127.0.0.1",
                                    b"MAIL FROM:<alice@example.com>", b"RCPT TO:<bob@example.com>"]


@pytest.mark.appliance_config(XClient="on")
@pytest.mark.fake_next_hop(ehlo=XCLIENT_EHLO)
def test_xclient_before_mail_after_a_refused_ehlo(appliance, next_hop):
    """The next hop refuses the client's EHLO name: the client is still introduced before MAIL
    (before the fix it went on as the proxy: a HELO name the next hop rejects was the key)."""
    next_hop.arm({"EHLO client.test": "550 5.7.1 bad HELO name", "*": "220 fake.test ESMTP"},
                 repeat=True)
    replies = send_raw(appliance.host, appliance.port, [*ENVELOPE, "DATA", MESSAGE, "QUIT"])
    assert replies[1] == "550 5.7.1 bad HELO name"
    assert replies[5].startswith("250 2.0.0 Ok: queued"), replies
    session = next_hop.wait_ended(next_hop.armed_session().index)
    mail = session.commands.index(b"MAIL FROM:<alice@example.com>")
    assert session.commands[mail - 2:mail] == [OWN_EHLO, b"XCLIENT ADDR=127.0.0.1"]
    assert set(session.commands[:mail - 2]) == {b"EHLO client.test"}  # (refused: OutTLS may
    # tries it once for STARTTLS, then once more)


@pytest.mark.parametrize("start", [["EHLO client.test"], ["HELO client.test"],
                                   ["MAIL FROM:<alice@example.com>"]],
                         ids=["EHLO", "HELO", "no-greeting"])
@pytest.mark.appliance_config(XClient="on")
@pytest.mark.fake_next_hop(ehlo=XCLIENT_EHLO)
def test_refused_xclient_ends_the_session(start, appliance, next_hop):
    """The next hop refuses XCLIENT (the proxy is not in its smtpd_authorized_xclient_hosts):
    421, an error in the log, and no transaction command reaches it. Before the fix only a
    warning was logged and the session went on as from the proxy."""
    next_hop.arm({"*": "550 5.7.0 Error: insufficient authorization"})
    replies = send_raw(appliance.host, appliance.port, [*start, "MAIL FROM:<a@example.com>"])
    assert replies[1:] == [R.XCLIENT_FAILED], replies  # and closed
    appliance.wait_log("server didn't accept XCLIENT: 550 5.7.0 Error: insufficient")
    session = next_hop.wait_ended(next_hop.armed_session().index)
    assert not [c for c in session.commands if c.startswith((b"MAIL", b"RCPT", b"DATA"))]
    assert next_hop.transactions(complete_only=False) == []


@pytest.mark.parametrize("start", [["EHLO client.test"], ["HELO client.test"],
                                   ["MAIL FROM:<alice@example.com>"]],
                         ids=["EHLO", "HELO", "no-greeting"])
@pytest.mark.appliance_config(XClient="on")
@pytest.mark.fake_next_hop()  # its EHLO offers no XCLIENT
def test_xclient_not_offered_ends_the_session(start, appliance, next_hop):
    """`XClient: on` with a next hop that does not offer XCLIENT: 421 and an error that says
    so. Before the fix the session went on without it, and without a log line."""
    next_hop.arm({"*": "500 5.5.2 Error: command not recognized"})
    replies = send_raw(appliance.host, appliance.port, [*start, "MAIL FROM:<a@example.com>"])
    assert replies[1:] == [R.XCLIENT_FAILED], replies
    appliance.wait_log("XCLIENT not possible, the server does not offer XCLIENT ADDR")
    session = next_hop.wait_ended(next_hop.armed_session().index)
    assert not [c for c in session.commands if c.startswith((b"MAIL", b"XCLIENT"))]


@pytest.mark.appliance_config(XClient="on", ClientTLS="passthrough")
@pytest.mark.fake_next_hop(ehlo=XCLIENT_EHLO)
def test_xclient_before_a_passed_through_starttls(appliance, next_hop):
    """ClientTLS: passthrough splices the client's TLS session with the next hop: the proxy
    sees none of its commands, so XCLIENT must come before the STARTTLS it passes on. Before,
    a client that skipped HELO went on inside TLS as the proxy."""
    next_hop.arm({"*": "220 2.0.0 Ready"}, repeat=True)  # XCLIENT and STARTTLS
    replies = send_raw(appliance.host, appliance.port,
                       ["STARTTLS", "MAIL FROM:<alice@example.com>", "QUIT"])
    assert replies[1:3] == ["220 2.0.0 Ready", "250 2.1.0 OK"], replies  # (spliced: no TLS here)
    session = next_hop.wait_ended(next_hop.armed_session().index)
    assert session.commands[:4] == [OWN_EHLO, b"XCLIENT ADDR=127.0.0.1", b"STARTTLS",
                                    b"MAIL FROM:<alice@example.com>"]


# -- 2. OutAddress: 0.0.0.0:PORT sent the mail back to the client's own address --------------------


def _send_from(appliance, source: str, token: str) -> None:
    with smtplib.SMTP(appliance.host, appliance.port, local_hostname="client.test",
                      source_address=(source, 0), timeout=30) as client:
        client.sendmail("alice@example.com", ["bob@example.com"], clean_message(token))


@pytest.mark.appliance_config(OutAddress=lambda hop: f"0.0.0.0:{hop.port}")
def test_outaddress_0_0_0_0_is_this_host_not_the_client(appliance, next_hop):
    """A client at 127.0.0.2: the mail goes to this host's port (the next hop on 127.0.0.1).
    Before the fix it went to 127.0.0.2:PORT ("couldn't connect to: 127.0.0.2:PORT"), and on a
    Listen other hosts reach, to port PORT of whoever connected."""
    _send_from(appliance, "127.0.0.2", "zero-address")
    [received] = next_hop.wait_for(1)
    assert received.peer[0] == "127.0.0.1"
    assert "couldn't connect" not in appliance.log()


@pytest.mark.appliance_config(OutAddress=lambda hop: str(hop.port))
def test_bare_port_outaddress_is_the_clients_own_address(appliance, next_hop):
    """The loopback feature is a bare port: a client at 127.0.0.2 gets its mail back there."""
    with RecordingNextHop("127.0.0.2", next_hop.port) as own:
        _send_from(appliance, "127.0.0.2", "loopback-feature")
        assert len(own.wait_for(1)) == 1
    assert next_hop.messages == []


def test_check_config_says_what_an_outaddress_means(tmp_path):
    config = tmp_path / "c.conf"
    said = {}
    for value in ("0.0.0.0:10025", "10025"):
        config.write_text(f"OutAddress: {value}\n")
        said[value] = subprocess.run(
            [sys.executable, "-m", "appliance.cli", "-f", str(config), "--check-config"],
            capture_output=True, text=True, check=True).stdout
    assert "# OutAddress: 0.0.0.0 is this host (an ordinary address" in said["0.0.0.0:10025"]
    assert "the loopback feature, each connection's mail goes back to its client's own " \
        "address, port 10025" in said["10025"]


# -- 3. a 2xx answer to the proxy's own DATA was relayed as the end-of-data answer -----------------


@pytest.mark.parametrize("reply", ["250 2.0.0 Ok", "334 VXNlcm5hbWU6"], ids=["2xx", "3xx"])
@pytest.mark.fake_next_hop()
def test_data_answered_with_anything_but_354_is_not_a_delivery(reply, appliance, next_hop):
    """Before the fix the client got the next hop's 250 after its body (nothing was sent)."""
    next_hop.arm({"DATA": reply})
    replies = send_raw(appliance.host, appliance.port,
                       [*ENVELOPE, "DATA", (clean_message("data-250") + b".\r\n", 1), "NOOP"])
    assert replies[4] == R.START_DATA, replies
    assert replies[5] == R.LOCAL_ERROR, replies
    assert replies[6].startswith("250"), replies  # the session goes on, in step
    appliance.wait_log(f"server refused data transfer: {reply}")
    assert next_hop.delivered() == []
    assert_no_spool_files(appliance)
    assert_still_serving(appliance, next_hop)


# -- 4. a NUL byte in a command line ---------------------------------------------------------------

SMTP_SINK = "/usr/sbin/smtp-sink"


@pytest.fixture
def smtp_sink():
    """Postfix's smtp-sink on a free port: a C server that reads a command line as a string."""
    if not os.access(SMTP_SINK, os.X_OK):
        pytest.skip(f"{SMTP_SINK} is missing (Debian package postfix)")
    port = free_port()
    proc = subprocess.Popen([SMTP_SINK, "-u", "nobody", f"127.0.0.1:{port}", "16"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _connects(port), what="smtp-sink to listen")
        yield SimpleNamespace(host="127.0.0.1", port=port)
    finally:
        proc.terminate()
        proc.wait(10)


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_nul_in_a_command_never_reaches_a_c_next_hop(smtp_sink, clamd, tmp_path):
    """`DATA\\0x` is no DATA to the proxy, but smtp-sink reads DATA and takes the client's next
    lines as an unscanned message. Before the fix the client got smtp-sink's 354 here."""
    port = free_port()
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    log = tmp_path / "clamsmtpd.stderr"
    proc = start_daemon(tmp_path / "c.conf",
                        proxy_directives(port, smtp_sink, clamd, spool, TimeOut=5), log)
    try:
        wait_accepting(proc, ("127.0.0.1", port), log.read_text)
        replies = send_raw("127.0.0.1", port, [*ENVELOPE, b"DATA\0x\r\n", "NOOP", "QUIT"])
    finally:
        proc.terminate()
        proc.wait(10)
    assert replies[4] == R.NUL, replies
    assert replies[5].startswith("250"), replies  # smtp-sink is still reading commands
    assert "command with a NUL character refused" in log.read_text()


@pytest.mark.fake_next_hop()
def test_nul_in_a_command_is_refused_and_not_relayed(appliance, next_hop):
    next_hop.arm({"*": "334 "})  # AUTH -> "334 "
    replies = send_raw(appliance.host, appliance.port, [
        "EHLO client.test", b"NOOP\0DATA\r\n", "AUTH PLAIN", b"AGFsaWNl\0DATA\r\n", "QUIT"])
    assert replies[2] == R.NUL, replies
    assert replies[3] == "334 ", replies
    session = next_hop.wait_ended(next_hop.armed_session().index)
    assert all(b"\0" not in command for command in session.commands), session.commands
    assert b"*" in session.commands  # the SASL answer with a NUL cancelled the exchange


# -- 5. SASL data in the debug log -----------------------------------------------------------------

SECRET = "AGFsaWNlAHMzY3JldA=="  # \0alice\0s3cret


@pytest.mark.parametrize("auth", [f"AUTH\tPLAIN {SECRET}", f"auth  plain {SECRET}",
                                  f"AUTH PLAIN {SECRET}", f"AuTh\x0bPLAIN {SECRET}"],
                         ids=["tab", "lower-two-spaces", "space", "vertical-tab"])
@pytest.mark.fake_next_hop()
def test_sasl_data_never_reaches_the_debug_log(auth, appliance, next_hop):
    """The redaction looked for "AUTH " with a space, dispatch splits on any whitespace: with a
    TAB the whole line, password and all, was logged at -d 4. Continuation lines neither."""
    next_hop.arm({"*": "334 "}, repeat=True)  # AUTH and its answers: 334 until "*"
    replies = send_raw(appliance.host, appliance.port,
                       ["EHLO client.test", auth, SECRET, "*", "QUIT"])
    assert replies[2:4] == ["334 ", "334 "], replies
    session = next_hop.wait_ended(next_hop.armed_session().index)
    assert session.commands[1].startswith(auth.encode())  # (relayed as it came)
    log = appliance.wait_log("CLIENT < [authentication data]")
    assert "[...]" in log
    assert SECRET not in log and SECRET[:20] not in log


# -- 6. a long recipient list stopped VirusAction --------------------------------------------------


@pytest.mark.appliance_config(VirusActionAsRoot="on", MaxConnections=4)
def test_virus_action_runs_with_a_thousand_long_recipients(appliance, next_hop, tmp_path):
    """1000 recipients of about 200 bytes: RECIPIENTS alone would be 200 kB, over Linux's 128 KiB
    for one environment string. Before the fix the exec failed ("Argument list too long") and
    the admin's action was lost; now RECIPIENTS is cut and marked, and RECIPIENTS_FILE has all."""
    rcpts = [f"user{i:04d}@" + ".".join(["d" * 45] * 4) + ".example" for i in range(1000)]
    seen = tmp_path / "seen"
    script = tmp_path / "action.sh"
    script.write_text("#!/bin/sh\n"
                      f'printf "%s" "$RECIPIENTS" > {seen}.env\n'
                      f'cat "$RECIPIENTS_FILE" > {seen}.file\n'
                      f'ls -l "$RECIPIENTS_FILE" > {seen}.mode\n'
                      'echo "script ran"\n')
    script.chmod(0o755)
    reload_with(appliance, VirusAction=script)
    with smtplib.SMTP(appliance.host, appliance.port, local_hostname="client.test",
                      timeout=60) as client:
        client.ehlo()
        client.mail("alice@example.com")
        for rcpt in rcpts:
            assert client.rcpt(rcpt)[0] == 250
        code, _ = client.data(b"Subject: infected\r\n\r\n" + EICAR + b"\r\n")
    assert code == 250  # (Action: drop)
    appliance.wait_log("VirusAction exited with status 0: script ran", timeout=30)
    env = (tmp_path / "seen.env").read_text().split("\n")
    assert 100 < len(env) < 1000 and env[:-1] == rcpts[:len(env) - 1]
    assert env[-1] == f"... {1000 - (len(env) - 1)} more: see RECIPIENTS_FILE"
    assert (tmp_path / "seen.file").read_text() == "".join(r + "\n" for r in rcpts)
    assert (tmp_path / "seen.mode").read_text().startswith("-rw-------")
    assert "RECIPIENTS is cut" in appliance.log()
    assert not [n for n in appliance.spool_files() if n.startswith("recipients.")]  # removed


# -- 7. a FIFO (or a symlink) at the PidFile path --------------------------------------------------


def _start_with_pid_file(tmp_path, clamd, pid_path) -> subprocess.Popen:
    conf = tmp_path / "c.conf"
    conf.write_text(f"Listen: 127.0.0.1:{free_port()}\nOutAddress: 127.0.0.1:{free_port()}\n"
                    f"ClamAddress: {clamd.socket_path}\nTempDirectory: {tmp_path}\n")
    return subprocess.Popen([sys.executable, "-m", "appliance.cli", "-d", "3", "-f", str(conf),
                             "-p", str(pid_path)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _ended(proc: subprocess.Popen, timeout: float = 15) -> tuple[int | None, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # (SIGTERM would be held: start-up holds it)
        out, _ = proc.communicate()
        return None, out
    return proc.returncode, out


def test_a_fifo_at_the_pid_file_path_is_refused_not_waited_on(tmp_path, clamd):
    """Before the fix start-up opened the FIFO to read it and hung there, SIGTERM held."""
    fifo = tmp_path / "clamsmtpd.pid"
    os.mkfifo(fifo)
    status, out = _ended(_start_with_pid_file(tmp_path, clamd, fifo))
    assert status == 1, out
    assert f"PidFile: {fifo} is not a regular file (a FIFO): remove it" in out
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # left alone: the admin decides


def test_a_symlink_at_the_pid_file_path_is_not_followed(tmp_path, clamd):
    """Before the fix the link was followed: its target read as root, then the link removed."""
    target = tmp_path / "secret"
    target.write_text("1\n")
    link = tmp_path / "clamsmtpd.pid"
    link.symlink_to(target)
    status, out = _ended(_start_with_pid_file(tmp_path, clamd, link))
    assert status == 1, out
    assert f"PidFile: {link} is a symbolic link; not followed" in out
    assert link.is_symlink() and target.read_text() == "1\n"


def test_a_held_sigterm_still_ends_a_start_up_that_is_stuck():
    """Signals are held while the daemon starts; a SIGTERM then gives start-up a few seconds,
    after which the process ends wherever it waits. Before the fix it waited for ever."""
    stuck = ("import os, signal\n"
             "from appliance.process import HeldSignals\n"
             "held = HeldSignals((signal.SIGTERM, signal.SIGHUP))\n"
             "os.kill(os.getpid(), signal.SIGTERM)\n"
             "os.read(os.pipe()[0], 1)  # stuck, as on a FIFO\n")
    proc = subprocess.Popen([sys.executable, "-c", stuck])
    try:
        assert proc.wait(15) == -signal.SIGALRM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- 5. a 354 to a command that is not the proxy's own DATA (review, session 3) --------------------

START_INPUT = "354 End data with <CR><LF>.<CR><LF>"
PIPELINING_EHLO = ["250-fake.test", "250-PIPELINING", "250 8BITMIME"]


@pytest.mark.fake_next_hop()
def test_a_354_to_a_relayed_verb_starts_no_message(appliance, next_hop):
    """A next hop that takes another verb for DATA (XDATA here) would read the client's next
    lines as a message nobody scanned. Before the fix the client got that 354, and its "." made
    such a next hop queue the message; now the next hop's connection is dropped unfinished and
    the client gets our 421."""
    next_hop.arm({"*": START_INPUT})
    replies = send_raw(appliance.host, appliance.port, [*ENVELOPE, "XDATA", "."])
    assert replies[4:] == [R.NEXT_HOP_LOST], replies
    appliance.wait_log("server started a message the proxy did not ask for")
    session = next_hop.wait_ended(next_hop.armed_at)
    assert session.commands[-1] == b"XDATA", session.commands  # the "." never went on
    assert_still_serving(appliance, next_hop)


@pytest.mark.fake_next_hop(ehlo=PIPELINING_EHLO)
def test_a_354_inside_a_pipelined_group_starts_no_message(appliance, next_hop):
    next_hop.arm({"RCPT": START_INPUT})
    replies = send_raw(appliance.host, appliance.port, [
        "EHLO client.test",
        (b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.com>\r\n", 2), "."])
    assert replies[2:] == ["250 2.1.0 OK", R.NEXT_HOP_LOST], replies
    appliance.wait_log("server started a message the proxy did not ask for")
    session = next_hop.wait_ended(next_hop.armed_at)
    assert b"." not in session.commands, session.commands
    assert_still_serving(appliance, next_hop)


# -- 6. BURL: a message the next hop fetches from IMAP, never through the scan (review, session 3)


@pytest.mark.fake_next_hop(ehlo=["250-fake.test", "250-BURL imap", "250-8BITMIME", "250 BURL"])
def test_burl_is_neither_offered_nor_relayed(appliance, next_hop):
    """A next hop offering BURL (RFC 4468, e.g. a submission server) would take the message
    from an IMAP URL: the proxy would pass on a message it never saw. Like CHUNKING/BDAT, the
    keyword leaves the EHLO list and the verb gets 502, offered or not."""
    next_hop.arm({})
    burl = "BURL imap://bob@imap.example.com/Drafts;UIDVALIDITY=1/;UID=1;urlauth=x LAST"
    replies = send_raw(appliance.host, appliance.port, [*ENVELOPE, burl, "QUIT"])
    assert replies[1].splitlines() == [R.EHLO_FIRST, "250-8BITMIME", R.XFILTERED], replies
    assert replies[4] == R.NOT_IMPLEMENTED, replies
    session = next_hop.wait_ended(next_hop.armed_at)
    assert not [c for c in session.commands if c.upper().startswith(b"BURL")], session.commands
