"""TLS on both legs with a real Postfix as the next hop (issue #13).

    smtplib --STARTTLS--> clamsmtpd (ClientTLS: on, its own certificate)
            --STARTTLS--> Postfix smtpd (a private instance, nexthop.test's certificate,
                          OutTLS: verify against the lab CA) -> relayhost: a RecordingNextHop

The private Postfix instance is run as in test_postfix_roundtrip.py (its own configuration,
queue and log in /var/tmp, `postfix -c DIR start`, stopped and removed at the end); the
certificates are made at test time (tests/tlskit.py).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import smtplib
import tempfile
from pathlib import Path

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
from test_postfix_roundtrip import POSTCONF, POSTFIX, _start_postfix, _stop_postfix
from tlskit import client_context

from lab import RecordingNextHop

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not (Path(POSTFIX).exists() and Path(POSTCONF).exists()),
                       reason=f"{POSTFIX} or {POSTCONF} is missing (Debian package postfix)"),
]

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {base}/queue
data_directory = {base}/data
maillog_file = {base}/maillog
myhostname = nexthop.test
mydestination =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
relayhost = [127.0.0.1]:{hop_port}
smtp_dns_support_level = disabled
smtputf8_enable = no
biff = no
smtpd_tls_security_level = may
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_tls_loglevel = 1
"""

MASTER_CF = """\
127.0.0.1:{smtpd_port} inet n - n - - smtpd
pickup     unix  n       -       n       60      1       pickup
cleanup    unix  n       -       n       -       0       cleanup
qmgr       unix  n       -       n       300     1       qmgr
rewrite    unix  -       -       n       -       -       trivial-rewrite
bounce     unix  -       -       n       -       0       bounce
defer      unix  -       -       n       -       0       bounce
trace      unix  -       -       n       -       0       bounce
verify     unix  -       -       n       -       1       verify
proxymap   unix  -       -       n       -       -       proxymap
smtp       unix  -       -       n       -       -       smtp
relay      unix  -       -       n       -       -       smtp
error      unix  -       -       n       -       -       error
retry      unix  -       -       n       -       -       error
discard    unix  -       -       n       -       -       discard
anvil      unix  -       -       n       -       1       anvil
scache     unix  -       -       n       -       1       scache
tlsmgr     unix  -       -       n       1000?   1       tlsmgr
postlog    unix-dgram n  -       n       -       1       postlogd
"""


@pytest.fixture(scope="module")
def postfix_tls(clamd, tls_certs, tmp_path_factory):
    work = tmp_path_factory.mktemp("postfix-tls")
    smtpd_port, proxy_port, hop_port = (free_port() for _ in range(3))
    base = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="clamsmtp-postfix-tls-"))
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, base, ignore_errors=True)
        base.chmod(0o755)
        config_dir = base / "etc"
        config_dir.mkdir(mode=0o755)
        (config_dir / "main.cf").write_text(MAIN_CF.format(
            base=base, hop_port=hop_port, cert=tls_certs.hop.cert, key=tls_certs.hop.key))
        (config_dir / "master.cf").write_text(MASTER_CF.format(smtpd_port=smtpd_port))
        hop = cleanup.enter_context(RecordingNextHop("127.0.0.1", hop_port))
        master_pid = None
        cleanup.callback(lambda: _stop_postfix(config_dir, master_pid))
        master_pid = _start_postfix(base, config_dir)

        spool = work / "spool"
        spool.mkdir(mode=0o700)
        log = work / "clamsmtpd.log"
        postfix = type("Postfix", (), {"host": "127.0.0.1", "port": smtpd_port})
        directives = proxy_directives(
            proxy_port, postfix, clamd, spool, TimeOut=30, Action="bounce",
            OutTLS="verify", OutTLSName="nexthop.test", TLSCAFile=tls_certs.ca.cert,
            ClientTLS="on", TLSCertificate=tls_certs.proxy.cert, TLSKey=tls_certs.proxy.key)
        proc = start_daemon(work / "clamsmtpd.conf", directives, log)
        cleanup.callback(lambda: (proc.terminate(), proc.wait(10)))
        wait_accepting(proc, ("127.0.0.1", proxy_port), log.read_text)
        yield type("Pipeline", (), {
            "port": proxy_port, "hop": hop, "certs": tls_certs,
            "postfix_log": lambda: (base / "maillog").read_text(errors="replace")
            if (base / "maillog").exists() else "",
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
