"""TLS through the proxy (issue #13): OutTLS towards the next hop, ClientTLS towards clients.

Real peers throughout: the recording next hop with aiosmtpd's own STARTTLS, smtplib and swaks
as clients, certificates made at test time by `openssl` (tests/tlskit.py).
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import ssl
import subprocess
import sys
import time

import pytest
import replies as R
from helpers import EICAR, free_port, read_reply, smtp_client, wait_until
from tlskit import CLIENT_TLS, client_context, server_context

CLEAN = b"From: a@example.com\r\nTo: b@example.com\r\nSubject: tls\r\n\r\nHello over TLS.\r\n"


def send(appliance, message: bytes = CLEAN, *, starttls_context=None):
    """One message with smtplib, in clear or (with a context) after STARTTLS."""
    with smtp_client(appliance) as client:
        client.ehlo()
        if starttls_context is not None:
            client.starttls(context=starttls_context)
            client.ehlo()
        client.mail("a@example.com")
        client.rcpt("b@example.com")
        return client.data(message)


def raw_dialogue(sock: socket.socket, buffer: bytearray, *lines: bytes) -> list[str]:
    out = []
    for line in lines:
        sock.sendall(line + b"\r\n")
        out.append(read_reply(sock, buffer))
    return out


# -- OutTLS: towards the next hop --------------------------------------------------------------


@pytest.mark.next_hop_tls
def test_may_encrypts_the_next_hop_leg_when_it_offers_starttls(appliance, next_hop):
    assert send(appliance)[0] == 250
    [received] = next_hop.wait_for(1)
    assert received.tls == "TLSv1.3"
    assert received.header("X-Virus-Scanned") == "ClamAV using ClamSMTP"
    log = appliance.wait_log("status=CLEAN")
    assert "to=b@example.com, tls=none/TLSv1.3, status=CLEAN" in log
    assert "SERVER: TLS: TLSv1.3" in log


@pytest.mark.next_hop_tls
def test_helo_client_also_gets_an_encrypted_next_hop_leg(appliance, next_hop):
    with smtp_client(appliance) as client:
        assert client.helo()[0] == 250
        client.sendmail("a@example.com", ["b@example.com"], CLEAN)
    assert next_hop.wait_for(1)[0].tls == "TLSv1.3"
    assert next_hop.wait_for(1)[0].helo == "client.test"


def test_may_without_starttls_at_the_next_hop_stays_in_clear_and_logs_as_before(
        appliance, next_hop):
    assert send(appliance)[0] == 250
    assert next_hop.wait_for(1)[0].tls is None
    log = appliance.wait_log("status=CLEAN")
    assert "from=a@example.com, to=b@example.com, status=CLEAN" in log  # the original's line
    assert "tls=" not in log


@pytest.mark.next_hop_replies(EHLO="502 5.5.2 Error: command not recognized")
def test_may_sends_a_refused_ehlo_to_the_next_hop_once(appliance, next_hop):
    """OutTLS: may probes for STARTTLS with the client's own EHLO: when the next hop refuses it,
    that refusal is the reply to the client, not a reason to send the same EHLO again."""
    with socket.create_connection(appliance.address, timeout=10) as sock:
        buffer = bytearray()
        assert read_reply(sock, buffer) == R.GREETING
        refused, accepted = raw_dialogue(sock, buffer, b"EHLO client.test", b"HELO client.test")
    assert refused == "502 5.5.2 Error: command not recognized"
    assert accepted.startswith("250 ")
    wait_until(lambda: "HELO client.test" in next_hop.event_names(), what="the HELO")
    assert next_hop.event_names()[:2] == ["EHLO client.test", "HELO client.test"]


@pytest.mark.next_hop_tls
@pytest.mark.appliance_config(OutTLS="none")
def test_none_never_starts_tls(appliance, next_hop):
    assert send(appliance)[0] == 250
    assert next_hop.wait_for(1)[0].tls is None


def _tls12_requiring_client_certificate(certs) -> ssl.SSLContext:
    # A TLS 1.2 handshake that fails on the next hop's side (we present no client certificate)
    context = server_context(certs.hop)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(certs.ca.cert))
    return context


@pytest.mark.next_hop_tls(context=_tls12_requiring_client_certificate)
def test_may_after_a_failed_handshake_connects_again_in_clear(appliance, next_hop):
    assert send(appliance)[0] == 250
    [received] = next_hop.wait_for(1)
    assert received.tls is None
    log = appliance.wait_log("status=CLEAN")
    assert "TLS handshake with server failed" in log and "connecting again, in clear" in log


@pytest.mark.next_hop_tls(context=_tls12_requiring_client_certificate)
@pytest.mark.appliance_config(OutTLS="encrypt")
def test_encrypt_after_a_failed_handshake_defers_and_sends_nothing(appliance, next_hop):
    with smtp_client(appliance) as client:
        code, text = client.ehlo()
    assert (code, text.decode()) == (421, R.NEXT_HOP_INSECURE[4:])
    assert next_hop.messages == [] and "MAIL" not in str(next_hop.event_names())
    assert "cannot encrypt the connection (OutTLS: encrypt)" in appliance.log()


@pytest.mark.appliance_config(OutTLS="encrypt")
def test_encrypt_with_a_next_hop_without_starttls_defers(appliance, next_hop):
    with socket.create_connection(appliance.address, timeout=10) as sock:
        buffer = bytearray()
        assert read_reply(sock, buffer) == R.GREETING
        # nothing but EHLO/HELO, NOOP, RSET, QUIT before the leg is encrypted
        assert raw_dialogue(sock, buffer, b"MAIL FROM:<a@example.com>", b"NOOP",
                            b"EHLO client.test") == [R.SEND_EHLO_FIRST, "250 OK",
                                                     R.NEXT_HOP_INSECURE]
    assert next_hop.messages == []
    assert "no STARTTLS offered" in appliance.log()


@pytest.mark.next_hop_tls
@pytest.mark.appliance_config(OutTLS="verify", OutTLSName="nexthop.test",
                              TLSCAFile=lambda hop: str(hop.certs.ca.cert))
def test_verify_with_the_right_name_and_ca_delivers_over_tls(appliance, next_hop):
    assert send(appliance)[0] == 250
    assert next_hop.wait_for(1)[0].tls == "TLSv1.3"


@pytest.mark.next_hop_tls
@pytest.mark.appliance_config(OutTLS="verify", OutTLSName="other.test",
                              TLSCAFile=lambda hop: str(hop.certs.ca.cert))
def test_verify_with_a_wrong_name_defers(appliance, next_hop):
    with smtp_client(appliance) as client:
        assert client.ehlo()[0] == 421
    log = appliance.wait_log("cannot encrypt")
    assert "certificate verification failed" in log and "other.test" in log
    assert next_hop.messages == []


@pytest.mark.next_hop_tls(context=lambda certs: server_context(certs.stranger))
@pytest.mark.appliance_config(OutTLS="verify", OutTLSName="nexthop.test",
                              TLSCAFile=lambda hop: str(hop.certs.ca.cert))
def test_verify_with_a_certificate_from_another_ca_defers(appliance, next_hop):
    with smtp_client(appliance) as client:
        assert client.ehlo()[0] == 421
    assert "self-signed certificate" in appliance.wait_log("cannot encrypt")
    # the daemon goes on serving
    with smtp_client(appliance) as client:
        assert client.ehlo()[0] == 421


@pytest.mark.next_hop_tls(context=lambda certs: server_context(certs.expired))
@pytest.mark.appliance_config(OutTLS="verify", OutTLSName="nexthop.test",
                              TLSCAFile=lambda hop: str(hop.certs.ca.cert))
def test_verify_with_an_expired_certificate_defers(appliance, next_hop):
    with smtp_client(appliance) as client:
        assert client.ehlo() == (421, R.NEXT_HOP_INSECURE[4:].encode())
    assert "certificate has expired" in appliance.wait_log("cannot encrypt")
    assert next_hop.messages == []


@pytest.mark.next_hop_tls
def test_bytes_behind_the_next_hops_220_are_discarded(appliance, next_hop):
    """CVE-2011-0411 class, next hop side: a reply injected in clear behind the 220 to STARTTLS
    must not be taken as the answer to the client's EHLO inside TLS."""
    next_hop.inject_after_starttls = "250 injected"
    with smtp_client(appliance) as client:
        code, text = client.ehlo()
        assert code == 250 and b"injected" not in text and b"8BITMIME" in text
        client.mail("a@example.com")
        client.rcpt("b@example.com")
        assert client.data(CLEAN)[0] == 250
    assert next_hop.wait_for(1)[0].tls == "TLSv1.3"


# -- ClientTLS: on -----------------------------------------------------------------------------


@pytest.mark.next_hop_tls
@pytest.mark.appliance_config(**CLIENT_TLS)
def test_client_tls_on_both_legs_encrypted_clean_mail_scanned(appliance, next_hop):
    context = client_context(next_hop.certs)
    with smtp_client(appliance) as client:
        code, text = client.ehlo()
        assert b"STARTTLS" in text
        client.starttls(context=context)  # verifies proxy.test's certificate
        assert client.sock.getpeercert()["subject"] == ((("commonName", "proxy.test"),),)
        assert b"STARTTLS" not in client.ehlo()[1]
        client.mail("a@example.com")
        client.rcpt("b@example.com")
        assert client.data(CLEAN)[0] == 250
    [received] = next_hop.wait_for(1)
    assert received.tls == "TLSv1.3"
    assert received.header("X-Virus-Scanned") == "ClamAV using ClamSMTP"
    assert "tls=TLSv1.3/TLSv1.3, status=CLEAN" in appliance.wait_log("status=CLEAN")


@pytest.mark.next_hop_tls
@pytest.mark.appliance_config(**CLIENT_TLS, Action="bounce")
def test_client_tls_eicar_is_refused_as_in_clear(appliance, next_hop):
    code, text = send(appliance, b"Subject: v\r\n\r\n" + EICAR + b"\r\n",
                      starttls_context=client_context(next_hop.certs))
    assert f"{code} {text.decode()}" == R.REJECTED
    assert next_hop.messages == []
    assert "tls=TLSv1.3/TLSv1.3, status=VIRUS:" in appliance.wait_log("status=VIRUS")


@pytest.mark.next_hop_tls(context=None)
@pytest.mark.appliance_config(**CLIENT_TLS)
def test_client_tls_swaks(appliance, next_hop):
    proc = subprocess.run(
        ["swaks", "--server", f"{appliance.host}:{appliance.port}", "--tls",
         "--tls-verify", "--tls-ca-path", str(next_hop.certs.ca.cert),
         "--from", "a@example.com", "--to", "b@example.com", "--helo", "client.test"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "TLS started" in proc.stdout, proc.stdout
    assert "CN=proxy.test" in proc.stdout  # the proxy's own certificate
    assert next_hop.wait_for(1)[0].tls is None  # this next hop offers no STARTTLS
    assert "tls=TLSv1.3/none, status=CLEAN" in appliance.wait_log("status=CLEAN")


@pytest.mark.next_hop_tls
@pytest.mark.appliance_config(**CLIENT_TLS)
def test_client_bytes_behind_starttls_are_discarded(appliance, next_hop):
    """CVE-2011-0411 class, client side: a command sent in clear in the packet of STARTTLS is
    never answered, never relayed, and never taken as having come over TLS."""
    context = client_context(next_hop.certs)
    with socket.create_connection(appliance.address, timeout=10) as raw:
        buffer = bytearray()
        read_reply(raw, buffer)
        raw_dialogue(raw, buffer, b"EHLO client.test")
        raw.sendall(b"STARTTLS\r\nRSET\r\nMAIL FROM:<injected@example.com>\r\n")
        assert read_reply(raw, buffer) == R.TLS_READY
        assert not buffer
        with context.wrap_socket(raw, server_hostname="proxy.test") as sock:
            buffer = bytearray()
            ehlo = raw_dialogue(sock, buffer, b"EHLO client.test")[0]
            assert ehlo.startswith("250-smtp.passthru"), ehlo
            # no transaction was opened by the injected MAIL: RCPT needs a MAIL first
            assert raw_dialogue(sock, buffer, b"RCPT TO:<b@example.com>")[0].startswith("503")
    assert "RSET" not in next_hop.event_names()


@pytest.mark.next_hop_tls(context=None)
@pytest.mark.appliance_config(**CLIENT_TLS, TimeOut=2)
def test_client_that_never_completes_the_handshake_hits_timeout(appliance, next_hop):
    with socket.create_connection(appliance.address, timeout=10) as sock:
        buffer = bytearray()
        read_reply(sock, buffer)
        assert raw_dialogue(sock, buffer, b"EHLO c", b"STARTTLS")[1] == R.TLS_READY
        started = time.monotonic()
        assert sock.recv(100) == b""  # closed by the proxy, after TimeOut
        assert 1.5 < time.monotonic() - started < 8
    appliance.wait_log("TLS handshake with client failed: not completed within TimeOut")
    assert send(appliance)[0] == 250  # and it keeps serving


@pytest.mark.next_hop_tls(context=None)
@pytest.mark.appliance_config(**CLIENT_TLS)
def test_client_handshake_garbage_is_logged_and_closed(appliance, next_hop):
    with socket.create_connection(appliance.address, timeout=10) as sock:
        buffer = bytearray()
        read_reply(sock, buffer)
        assert raw_dialogue(sock, buffer, b"EHLO c", b"STARTTLS")[1] == R.TLS_READY
        sock.sendall(b"this is not a TLS ClientHello\r\n" * 4)
        assert sock.recv(100) == b""
    assert "TLS handshake with client failed" in appliance.wait_log("handshake with client")
    assert send(appliance)[0] == 250


@pytest.mark.next_hop_tls
@pytest.mark.appliance_config(**CLIENT_TLS)
def test_starttls_rules(appliance, next_hop):
    context = client_context(next_hop.certs)
    with socket.create_connection(appliance.address, timeout=10) as raw:
        buffer = bytearray()
        read_reply(raw, buffer)
        assert raw_dialogue(raw, buffer, b"EHLO c", b"STARTTLS now", b"MAIL FROM:<a@b.example>",
                            b"STARTTLS", b"RSET", b"STARTTLS")[1:] == [
            R.TLS_SYNTAX, "250 2.1.0 OK", R.TLS_IN_TRANSACTION, "250 OK",
            R.TLS_READY]
        with context.wrap_socket(raw, server_hostname="proxy.test") as sock:
            assert raw_dialogue(sock, bytearray(), b"STARTTLS") == [R.TLS_ACTIVE]


def test_client_tls_off_hides_and_refuses_starttls(appliance, next_hop):
    with smtp_client(appliance) as client:
        assert b"STARTTLS" not in client.ehlo()[1]
        assert client.docmd("STARTTLS") == (502, b"Command not implemented")


# -- AUTH --------------------------------------------------------------------------------------


@pytest.mark.next_hop_tls(context=None)
@pytest.mark.next_hop_replies(ehlo_extensions=["AUTH PLAIN"])
@pytest.mark.appliance_config(**CLIENT_TLS)
def test_auth_over_tls_is_not_relayed_to_a_clear_next_hop(appliance, next_hop):
    with smtp_client(appliance) as client:
        client.ehlo()
        client.starttls(context=client_context(next_hop.certs))
        client.ehlo()
        token = base64.b64encode(b"\0user\0secret")
        reply = client.docmd("AUTH", "PLAIN " + token.decode())
        assert reply == (538, b"5.7.11 Encryption required")
    assert "AUTH refused: the connection to the next hop is not encrypted" in appliance.log()


# -- metrics, reload, key handling ---------------------------------------------------------------


@pytest.mark.next_hop_tls
@pytest.mark.appliance_config(**CLIENT_TLS)
def test_sighup_reloads_the_certificate(appliance, next_hop, tmp_path):
    from lab.certs import make_certificate

    fresh = make_certificate(tmp_path / "fresh", "renewed.test", next_hop.certs.ca)
    conf = appliance.conf_path.read_text()
    conf = conf.replace(str(next_hop.certs.proxy.cert), str(fresh.cert))
    conf = conf.replace(str(next_hop.certs.proxy.key), str(fresh.key))
    appliance.conf_path.write_text(conf)
    os.kill(appliance.proc.pid, signal.SIGHUP)
    appliance.wait_log("SIGHUP: configuration reloaded")
    with smtp_client(appliance) as client:
        client.ehlo()
        context = client_context(next_hop.certs)
        context.check_hostname = False
        client.starttls(context=context)
        der = client.sock.getpeercert(binary_form=True)
    assert ssl.DER_cert_to_PEM_cert(der).split() == fresh.cert.read_text().split()



# -- ClientTLS: passthrough ----------------------------------------------------------------------


@pytest.mark.next_hop_tls
@pytest.mark.appliance_config(ClientTLS="passthrough")
def test_passthrough_splices_the_clients_tls_with_the_next_hop_unscanned(appliance, next_hop):
    message = b"Subject: v\r\n\r\n" + EICAR + b"\r\n"
    with smtp_client(appliance) as client:
        assert b"STARTTLS" in client.ehlo()[1]  # the next hop's own offer, passed on
        client.starttls(context=client_context(next_hop.certs))
        # the client sees the next hop's certificate: the proxy is out of the session
        assert client.sock.getpeercert()["subject"] == ((("commonName", "nexthop.test"),),)
        code, text = client.ehlo()
        assert b"nexthop.test" in text.split(b"\n")[0]  # not rewritten: we no longer see it
        client.mail("a@example.com")
        client.rcpt("b@example.com")
        assert client.data(message)[0] == 250
    [received] = next_hop.wait_for(1)
    assert received.tls == "TLSv1.3"
    assert received.original_content == message  # not scanned: no header, EICAR went through
    log = appliance.wait_log("status=UNSCANNED:tls", timeout=60)
    assert "the session is spliced, its mail is NOT scanned" in log


@pytest.mark.appliance_config(ClientTLS="passthrough")
def test_passthrough_with_a_next_hop_without_starttls(appliance, next_hop):
    with smtp_client(appliance) as client:
        assert b"STARTTLS" not in client.ehlo()[1]
        assert client.docmd("STARTTLS")[0] == 454  # the next hop's own refusal (aiosmtpd)
        client.mail("a@example.com")
        client.rcpt("b@example.com")
        assert client.data(CLEAN)[0] == 250
    assert next_hop.wait_for(1)[0].header("X-Virus-Scanned") == "ClamAV using ClamSMTP"


@pytest.mark.next_hop_tls
@pytest.mark.appliance_config(ClientTLS="passthrough")
def test_passthrough_drops_clear_text_behind_starttls(appliance, next_hop):
    context = client_context(next_hop.certs)
    with socket.create_connection(appliance.address, timeout=10) as raw:
        buffer = bytearray()
        read_reply(raw, buffer)
        raw_dialogue(raw, buffer, b"EHLO client.test")
        raw.sendall(b"STARTTLS\r\nRSET\r\n")
        assert read_reply(raw, buffer).startswith("220")
        with context.wrap_socket(raw, server_hostname="nexthop.test") as sock:
            assert raw_dialogue(sock, bytearray(), b"EHLO c")[0].startswith("250-nexthop.test")
    assert "RSET" not in next_hop.event_names()


# -- metrics -------------------------------------------------------------------------------------


def _metric(appliance, name: str) -> float:
    from test_metrics import scrape  # (tests/integration is on sys.path under pytest's rootdir)

    port = int(appliance.directives["MetricsListen"].rsplit(":", 1)[1])
    return scrape(port).get(name, 0.0)


def _every_session_counted(appliance) -> bool:
    from test_metrics import scrape

    values = scrape(int(appliance.directives["MetricsListen"].rsplit(":", 1)[1]))
    client = sum(value for name, value in values.items()
                 if name.startswith('clamsmtpd_tls_sessions_total{leg="client"'))
    return client == values.get("clamsmtpd_connections_total", 0.0)


def _metrics_up(appliance) -> bool:
    port = int(appliance.directives["MetricsListen"].rsplit(":", 1)[1])
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.mark.next_hop_tls
@pytest.mark.appliance_config(**CLIENT_TLS, MetricsListen=lambda hop: f"127.0.0.1:{free_port()}")
def test_metrics_count_sessions_per_leg_and_mode(appliance, next_hop):
    names = ['clamsmtpd_tls_sessions_total{leg="client",mode="tls"}',
             'clamsmtpd_tls_sessions_total{leg="client",mode="clear"}',
             'clamsmtpd_tls_sessions_total{leg="next_hop",mode="tls"}']

    def counted():
        return [_metric(appliance, name) for name in names]

    # (the SMTP listener may accept before the metrics socket is bound: wait for it)
    wait_until(lambda: _metrics_up(appliance), what="the metrics endpoint")
    # The fixture's probe connection is a client session in clear too, counted when it ends,
    # which may be after the endpoint is up (seen on uvloop, whose start-up is quicker): the
    # count starts once every accepted session is counted.
    appliance.wait_log("accepted connection from")
    wait_until(lambda: _every_session_counted(appliance), what="the probe session counted")
    before = counted()
    send(appliance, starttls_context=client_context(next_hop.certs))
    send(appliance)  # client in clear, next hop over TLS
    expected = [before[0] + 1, before[1] + 1, before[2] + 2]
    wait_until(lambda: counted() == expected, what=f"{names} == {expected}")


# -- --check-config -------------------------------------------------------------------------------


def _check_config(conf) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance.cli", "--check-config", "-f",
                           str(conf)], capture_output=True, text=True, timeout=30)


def test_check_config_prints_the_tls_settings_and_loads_the_certificate(tmp_path, tls_certs):
    conf = tmp_path / "c.conf"
    key = tmp_path / "key.pem"
    key.write_bytes(tls_certs.proxy.key.read_bytes())
    key.chmod(0o644)
    conf.write_text(f"OutAddress: mail.example.org\nOutTLS: verify\nClientTLS: on\n"
                    f"TLSCertificate: {tls_certs.proxy.cert}\nTLSKey: {key}\n")
    result = _check_config(conf)
    assert result.returncode == 0, result.stderr
    assert "OutTLS: verify\n" in result.stdout and "ClientTLS: on\n" in result.stdout
    assert f"TLSCertificate: {tls_certs.proxy.cert}\n" in result.stdout
    assert "# OutTLSName: not set (next hop's name: mail.example.org)" in result.stdout
    assert f"TLSKey: {key} is readable by every user of this machine" in result.stderr
    conf.write_text(f"OutAddress: 10025\nClientTLS: on\nTLSCertificate: {tmp_path}/none.pem\n")
    result = _check_config(conf)
    assert result.returncode == 2
    assert f"{conf}:0: TLSCertificate: {tmp_path}/none.pem: no such file" in result.stderr
