"""TLS on both legs with a real Postfix as the next hop (issue #13).

    smtplib --STARTTLS--> clamsmtpd (ClientTLS: on, its own certificate)
            --STARTTLS--> Postfix smtpd (a private instance, nexthop.test's certificate,
                          OutTLS: verify against the lab CA) -> relayhost: a RecordingNextHop

The private Postfix instance is tests/postfixkit.py's (its own configuration, queue and log in
/var/tmp, `postfix -c DIR start`, stopped and removed at the end); the certificates are made at
test time (tests/tlskit.py).
"""

from __future__ import annotations

import contextlib
import re
import smtplib

import pytest
import replies as R
from helpers import (
    EICAR,
    free_port,
    make_message,
    proxy_directives,
    start_daemon,
    wait_accepting,
    wait_until,
)
from postfixkit import PrivatePostfix, needs_postfix
from tlskit import client_context

from lab import RecordingNextHop

pytestmark = [pytest.mark.root, needs_postfix]

MAIN_CF = """\
myhostname = nexthop.test
mydestination =
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
relayhost = [127.0.0.1]:{hop_port}
smtpd_tls_security_level = may
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_tls_loglevel = 1
"""


@pytest.fixture(scope="module")
def postfix_tls(clamd, tls_certs, tmp_path_factory):
    work = tmp_path_factory.mktemp("postfix-tls")
    smtpd_port, proxy_port, hop_port = (free_port() for _ in range(3))
    with contextlib.ExitStack() as cleanup:
        hop = cleanup.enter_context(RecordingNextHop("127.0.0.1", hop_port))
        postfix = cleanup.enter_context(PrivatePostfix(smtpd_port, MAIN_CF.format(
            hop_port=hop_port, cert=tls_certs.hop.cert, key=tls_certs.hop.key),
            comment="a private instance for tests/integration/test_postfix_tls.py"))

        spool = work / "spool"
        spool.mkdir(mode=0o700)
        log = work / "clamsmtpd.log"
        upstream = type("Postfix", (), {"host": "127.0.0.1", "port": smtpd_port})
        directives = proxy_directives(
            proxy_port, upstream, clamd, spool, TimeOut=30, Action="bounce",
            OutTLS="verify", OutTLSName="nexthop.test", TLSCAFile=tls_certs.ca.cert,
            ClientTLS="on", TLSCertificate=tls_certs.proxy.cert, TLSKey=tls_certs.proxy.key)
        proc = start_daemon(work / "clamsmtpd.conf", directives, log)
        cleanup.callback(lambda: (proc.terminate(), proc.wait(10)))
        wait_accepting(proc, ("127.0.0.1", proxy_port), log.read_text)
        yield type("Pipeline", (), {
            "port": proxy_port, "hop": hop, "certs": tls_certs,
            "postfix_log": postfix.log,
            "daemon_log": lambda: log.read_text(errors="replace"),
        })


def send(pipeline, message: bytes, sender: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", pipeline.port, local_hostname="client.test",
                      timeout=30) as client:
        client.ehlo()
        client.starttls(context=client_context(pipeline.certs))
        assert client.sock.getpeercert()["subject"] == ((("commonName", "proxy.test"),),)
        client.ehlo()
        client.mail(sender)
        client.rcpt("bob@example.com")
        return client.data(message)


def test_clean_mail_crosses_both_legs_encrypted_and_scanned(postfix_tls):
    message = make_message("tls both legs", sender="tls-clean@example.com")
    code, text = send(postfix_tls, bytes(message), "tls-clean@example.com")
    assert code == 250 and b"queued as" in text, text  # Postfix's own reply, relayed
    [received] = wait_until(
        lambda: [m for m in postfix_tls.hop.messages
                 if m.header("Message-ID") == message["Message-ID"]],
        timeout=30, what="the message at the relayhost")
    assert received.header("X-Virus-Scanned") == "ClamAV using ClamSMTP"
    # Postfix saw a TLS connection from the proxy, and the proxy checked its certificate
    assert re.search(r"TLS connection established from \S+\[127\.0\.0\.1\]: TLSv1\.3",
                     postfix_tls.postfix_log()), postfix_tls.postfix_log()
    assert "from=tls-clean@example.com, to=bob@example.com, tls=TLSv1.3/TLSv1.3, " \
           "status=CLEAN" in postfix_tls.daemon_log()


def test_eicar_inside_tls_is_refused_before_postfix(postfix_tls):
    message = make_message("tls eicar", attachments=[("eicar.com", EICAR)],
                           sender="tls-virus@example.com")
    code, text = send(postfix_tls, bytes(message), "tls-virus@example.com")
    assert f"{code} {text.decode()}" == R.REJECTED
    assert not any(EICAR in m.original_content for m in postfix_tls.hop.messages)
    assert "tls=TLSv1.3/TLSv1.3, status=VIRUS:" in postfix_tls.daemon_log()
