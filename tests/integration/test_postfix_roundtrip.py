"""docs/postfix.md's after-queue content filter, run for real: a private Postfix instance, a
private clamd and our daemon, with the main.cf and master.cf lines read from the doc.

    smtplib -> Postfix smtpd (free port) -> queue -> "scan" transport (Postfix smtp client)
      -> clamsmtpd (free port, the doc's 10026) -> Postfix re-injection smtpd (free port, the
      doc's 10025, content_filter=) -> queue -> relayhost: a RecordingNextHop (free port)

The Postfix instance is private (tests/postfixkit.py): its own configuration, queue and log
in /var/tmp, on 127.0.0.1 only, stopped and removed at the end.

A second private instance has clamsmtpd with `XClient: on` in front of its smtpd, trusting
clamsmtpd's 127.0.0.1 (mynetworks, smtpd_authorized_xclient_hosts): a client at 127.0.0.2 must
not be able to relay through it, with or without HELO (issue 12).
"""

from __future__ import annotations

import contextlib
import re
import smtplib
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import replies as R
from helpers import (
    EICAR,
    free_port,
    make_message,
    proxy_directives,
    read_reply,
    start_daemon,
    wait_accepting,
    wait_until,
)
from postfixkit import PrivatePostfix, needs_postfix

from lab import RecordingNextHop

DOC = Path(__file__).resolve().parents[2] / "docs" / "postfix.md"
DOC_FILTER_PORT, DOC_REINJECT_PORT = 10026, 10025  # Debian's ports, as the doc writes them
DELIVERY_TIMEOUT = 30.0

pytestmark = [
    pytest.mark.root,  # Postfix's master must start as root (tests/conftest.py skips otherwise)
    needs_postfix,
]

# -- the doc's snippets ------------------------------------------------------------------------


def doc_block(heading: str) -> str:
    """The first fenced code block of docs/postfix.md's section `heading` (a `## ` line)."""
    lines = DOC.read_text().splitlines()
    assert heading in lines, f"docs/postfix.md has no heading {heading!r} any more"
    start = lines.index(heading) + 1
    for n in range(start, len(lines)):
        assert not lines[n].startswith("## "), f"no code block under {heading!r}"
        if lines[n].startswith("```"):
            end = lines.index("```", n + 1)
            return "\n".join(lines[n + 1:end]) + "\n"
    raise AssertionError(f"no code block under {heading!r}")


def with_port(text: str, doc_port: int, port: int) -> str:
    """`text` with the port `doc_port` (written `:PORT` in the doc) replaced by `port`."""
    pattern = rf"(?<=:){doc_port}\b"
    assert re.search(pattern, text), f"the doc's snippet no longer names port {doc_port}"
    return re.sub(pattern, str(port), text)


def documented_main_cf(filter_port: int) -> str:
    return with_port(doc_block("## 2. main.cf"), DOC_FILTER_PORT, filter_port)


def documented_master_cf(reinject_port: int) -> str:
    return with_port(doc_block("## 3. master.cf"), DOC_REINJECT_PORT, reinject_port)


# -- the private Postfix instance ----------------------------------------------------------------

MAIN_CF = """\
myhostname = postfix.test
myorigin = $myhostname
mydestination =
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
relayhost = [127.0.0.1]:{hop_port}

# docs/postfix.md, "2. main.cf" (ports substituted):
{documented}"""

MASTER_CF = """
# docs/postfix.md, "3. master.cf" (ports substituted):
{documented}"""


@dataclass
class Pipeline:
    postfix: PrivatePostfix
    smtpd_port: int  # Postfix's public smtpd (the doc's :25)
    filter_port: int  # clamsmtpd (the doc's 10026)
    reinject_port: int  # Postfix's re-injection smtpd (the doc's 10025)
    hop: RecordingNextHop
    daemon_log: Path

    @property
    def config_dir(self) -> Path:
        return self.postfix.config_dir

    def postfix_log(self) -> str:
        return self.postfix.log()

    def clamsmtpd_log(self) -> str:
        return self.daemon_log.read_text(errors="replace")

    def logs(self) -> str:
        return (f"--- Postfix maillog:\n{self.postfix_log()}\n"
                f"--- clamsmtpd log (last lines):\n"
                + "\n".join(self.clamsmtpd_log().splitlines()[-40:]))

    def wait_postfix_log(self, pattern: str, what: str) -> re.Match:
        """Wait until a line of Postfix's log matches `pattern`; fail with both logs."""
        try:
            return wait_until(lambda: re.search(pattern, self.postfix_log(), flags=re.M),
                              timeout=DELIVERY_TIMEOUT, interval=0.1, what=what)
        except AssertionError as error:
            raise AssertionError(f"{error}\n{self.logs()}") from None

    def postconf(self, *args: str) -> subprocess.CompletedProcess:
        return self.postfix.postconf(*args)


@pytest.fixture(scope="module")
def pipeline(clamd, tmp_path_factory):
    work = tmp_path_factory.mktemp("postfix-roundtrip")
    smtpd_port, filter_port, reinject_port, hop_port = (free_port() for _ in range(4))
    with contextlib.ExitStack() as cleanup:
        hop = cleanup.enter_context(RecordingNextHop("127.0.0.1", hop_port))

        # clamsmtpd as in the doc's clamsmtpd.conf: Listen on the filter port, OutAddress the
        # re-injection server; Action drop and the default header
        spool = work / "spool"
        spool.mkdir(mode=0o700)
        daemon_log = work / "clamsmtpd.log"
        reinjection = SimpleNamespace(host="127.0.0.1", port=reinject_port)
        directives = proxy_directives(filter_port, reinjection, clamd, spool, TimeOut=30)
        proc = start_daemon(work / "clamsmtpd.conf", directives, daemon_log)

        def stop_daemon() -> None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

        cleanup.callback(stop_daemon)
        wait_accepting(proc, ("127.0.0.1", filter_port), daemon_log.read_text)

        postfix = cleanup.enter_context(PrivatePostfix(
            smtpd_port,
            MAIN_CF.format(hop_port=hop_port, documented=documented_main_cf(filter_port)),
            MASTER_CF.format(documented=documented_master_cf(reinject_port)),
            comment="a private instance for tests/integration/test_postfix_roundtrip.py"))
        yield Pipeline(postfix, smtpd_port, filter_port, reinject_port, hop, daemon_log)


# -- sending -------------------------------------------------------------------------------------


def send(pipeline: Pipeline, message) -> str:
    """Send `message` to Postfix's public smtpd; the queue id it was accepted as."""
    with smtplib.SMTP("127.0.0.1", pipeline.smtpd_port, local_hostname="client.test",
                      timeout=30) as client:
        client.ehlo()
        assert client.mail(message["From"])[0] == 250
        assert client.rcpt(message["To"])[0] == 250
        code, reply = client.data(bytes(message))
    assert code == 250, reply
    return re.search(r"queued as (\w+)", reply.decode())[1]


def at_hop(pipeline: Pipeline, message) -> list:
    return [m for m in list(pipeline.hop.messages)
            if m.header("Message-ID") == message["Message-ID"]]


def delivery(pipeline: Pipeline, queue_id: str, port: int, what: str) -> str:
    """Wait for Postfix's log line of `queue_id`'s delivery attempt to 127.0.0.1:`port`; its
    status, e.g. `sent (250 2.0.0 Ok: queued as 5B7C92E1A0)`."""
    pattern = (rf"postfix/\w+\[\d+\]: {queue_id}: to=<[^>]+>, "
               rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{port}, .*, status=(.+)$")
    return pipeline.wait_postfix_log(pattern, f"{queue_id}'s delivery to {what}")[1]


def unique(what: str) -> str:
    return f"{what}-{time.time_ns()}"


# -- the checks ----------------------------------------------------------------------------------


def test_a_clean_message_passes_the_filter_once(pipeline):
    tag = unique("clean")
    body = f"A clean message through Postfix and clamsmtpd ({tag}).\nSecond line.\n"
    message = make_message(tag, body, sender=f"{tag}@example.com", to="bob@example.com")
    first = send(pipeline, message)

    # Postfix hands it to clamsmtpd (the scan transport), which relays the re-injection
    # server's reply: the message is queued again, under a new id ...
    status = delivery(pipeline, first, pipeline.filter_port, "clamsmtpd")
    queued = re.fullmatch(r"sent \(250 2\.0\.0 Ok: queued as (\w+)\)", status)
    assert queued, f"{first}: status={status}\n{pipeline.logs()}"
    second = queued[1]
    # ... and that one goes to the relayhost, the recording hop
    status = delivery(pipeline, second, pipeline.hop.port, "the next hop")
    assert status.startswith("sent (250 "), f"{second}: status={status}\n{pipeline.logs()}"
    pipeline.wait_postfix_log(rf": {second}: removed$", f"{second} to leave the queue")

    received = at_hop(pipeline, message)
    assert len(received) == 1, f"{len(received)} copies at the hop\n{pipeline.logs()}"
    got = received[0].original_content
    head, got_body = got.split(b"\r\n\r\n", 1)
    name = R.DEFAULT_HEADER.split(b":", 1)[0].lower()  # X-Virus-Scanned
    scanned = [x for x in head.split(b"\r\n") if x.lower().startswith(name + b":")]
    assert scanned == [R.DEFAULT_HEADER], head.decode()  # once: it was filtered once
    assert got_body == bytes(message).split(b"\r\n\r\n", 1)[1]
    assert received[0].header("Subject") == tag


def test_eicar_is_discarded_and_postfix_counts_it_as_delivered(pipeline):
    tag = unique("eicar")
    sender = f"{tag}@example.com"
    message = make_message(tag, attachments=[("eicar.com", EICAR)], sender=sender,
                           to="bob@example.com")
    queue_id = send(pipeline, message)

    # sent, not deferred or bounced: Postfix counts it as delivered and forgets it
    status = delivery(pipeline, queue_id, pipeline.filter_port, "clamsmtpd")
    assert status == "sent (250 Virus Detected; Discarded Email)", (
        f"{queue_id}: status={status}\n{pipeline.logs()}")
    pipeline.wait_postfix_log(rf": {queue_id}: removed$", f"{queue_id} to leave the queue")
    log = pipeline.postfix_log()
    assert not re.search(rf": {queue_id}: .*status=(deferred|bounced)", log), log
    verdicts = [x for x in pipeline.clamsmtpd_log().splitlines() if f"from={sender}," in x]
    assert any("status=VIRUS:" in x for x in verdicts), pipeline.logs()

    # Postfix has removed it: it cannot reach the hop any more
    assert at_hop(pipeline, message) == []
    assert not any(EICAR in m.original_content for m in pipeline.hop.messages)


def test_the_running_instance_has_the_documented_lines(pipeline):
    """The settings Postfix runs with are the doc's, only the ports differ."""
    main_cf = (pipeline.config_dir / "main.cf").read_text()
    master_cf = (pipeline.config_dir / "master.cf").read_text()
    main_doc = documented_main_cf(pipeline.filter_port)
    master_doc = documented_master_cf(pipeline.reinject_port)
    assert main_doc in main_cf and master_doc in master_cf

    shown = pipeline.postconf("-n", "content_filter", "receive_override_options")
    assert shown.returncode == 0 and shown.stderr == "", shown.stderr
    expected = [" ".join(x.split()) for x in main_doc.splitlines()
                if x.strip() and not x.startswith("#")]
    assert shown.stdout.splitlines() == expected
    assert f"scan:[127.0.0.1]:{pipeline.filter_port}" in shown.stdout

    services = pipeline.postconf("-M", "scan/unix", f"127.0.0.1:{pipeline.reinject_port}/inet")
    assert services.returncode == 0 and services.stderr == "", services.stderr
    assert len(services.stdout.splitlines()) == 2, services.stdout
    reinjection = pipeline.postconf("-P", f"127.0.0.1:{pipeline.reinject_port}/inet/content_filter")
    assert reinjection.stdout.strip() == (
        f"127.0.0.1:{pipeline.reinject_port}/inet/content_filter ="), reinjection.stdout


# -- XClient: on in front of a Postfix that trusts clamsmtpd (issue 12) -------------------------

XCLIENT_MAIN_CF = """\
myhostname = postfix.test
mydestination = postfix.test
mynetworks = 127.0.0.1/32
smtpd_authorized_xclient_hosts = 127.0.0.1
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
"""


@pytest.fixture(scope="module")
def xclient_postfix(clamd, tmp_path_factory):
    """Postfix's smtpd on a free port trusting 127.0.0.1 (clamsmtpd) for relaying and XCLIENT,
    and clamsmtpd with XClient: on in front of it; yields clamsmtpd's port."""
    work = tmp_path_factory.mktemp("postfix-xclient")
    smtpd_port, proxy_port = free_port(), free_port()
    with contextlib.ExitStack() as cleanup:
        postfix = cleanup.enter_context(PrivatePostfix(
            smtpd_port, XCLIENT_MAIN_CF,
            comment="a private instance: clamsmtpd (127.0.0.1) in front of it, with XClient: on"))

        spool = work / "spool"
        spool.mkdir(mode=0o700)
        daemon_log = work / "clamsmtpd.log"
        upstream = SimpleNamespace(host="127.0.0.1", port=smtpd_port)
        proc = start_daemon(work / "clamsmtpd.conf",
                            proxy_directives(proxy_port, upstream, clamd, spool, TimeOut=30,
                                             XClient="on"), daemon_log)
        cleanup.callback(lambda: (proc.terminate(), proc.wait(10)))
        wait_accepting(proc, ("127.0.0.1", proxy_port), daemon_log.read_text)
        yield SimpleNamespace(port=proxy_port, maillog=postfix.maillog, daemon_log=daemon_log)


def _relay_attempt(port: int, source: str, greeting: list[str]) -> list[str]:
    replies = []
    with socket.create_connection(("127.0.0.1", port), timeout=30,
                                  source_address=(source, 0)) as sock:
        buf = bytearray()
        replies.append(read_reply(sock, buf))
        for line in [*greeting, "MAIL FROM:<spam@example.net>", "RCPT TO:<victim@elsewhere.test>",
                     "QUIT"]:
            sock.sendall(line.encode() + b"\r\n")
            replies.append(read_reply(sock, buf))
    return replies


@pytest.mark.parametrize("greeting", [[], ["EHLO client.test"], ["HELO client.test"]],
                         ids=["no-greeting", "EHLO", "HELO"])
def test_xclient_keeps_postfix_from_relaying_for_an_untrusted_client(greeting, xclient_postfix):
    """A client at 127.0.0.2 (not in mynetworks) asks to relay through clamsmtpd (127.0.0.1, in
    mynetworks). Postfix must judge the client: before the fix one that sent no HELO reached
    it as clamsmtpd, and the RCPT was taken: an open relay."""
    replies = _relay_attempt(xclient_postfix.port, "127.0.0.2", greeting)
    rcpt = replies[len(greeting) + 2]
    assert rcpt.startswith("554 5.7.1") and "Relay access denied" in rcpt, replies
    maillog = xclient_postfix.maillog  # (postlogd writes it a moment later)
    wait_until(lambda: re.search(r"NOQUEUE: reject: RCPT from \S*\[127\.0\.0\.2\]",
                                 maillog.read_text(errors="replace")),
               what="Postfix's log of the refusal, for 127.0.0.2")


def test_xclient_lets_postfix_relay_for_a_trusted_client(xclient_postfix):
    """The same from 127.0.0.1, which mynetworks holds: relayed (the denial above is Postfix
    judging the client, not a blanket refusal)."""
    replies = _relay_attempt(xclient_postfix.port, "127.0.0.1", [])
    assert replies[2].startswith("250"), replies
