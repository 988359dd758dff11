"""TLS for the tests: throwaway certificates (made once per session with `openssl`), contexts,
and a next hop that offers STARTTLS.

    @pytest.mark.next_hop_tls                             # STARTTLS, nexthop.test's certificate
    @pytest.mark.next_hop_tls(context=None)               # no STARTTLS, but .certs is set
    @pytest.mark.next_hop_tls(context=lambda certs: ...)  # its own server context
    @pytest.mark.appliance_config(**CLIENT_TLS)           # ClientTLS: on, the proxy's certificate
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from lab.certs import Certificate, make_ca, make_certificate


@dataclass(frozen=True)
class Certs:
    ca: Certificate
    hop: Certificate      # nexthop.test, 127.0.0.1, signed by ca
    proxy: Certificate    # proxy.test, signed by ca
    stranger: Certificate  # nexthop.test, self-signed (not from ca)
    expired: Certificate  # nexthop.test, signed by ca, expired yesterday


def make_certs(directory: Path) -> Certs:
    ca = make_ca(directory)
    return Certs(
        ca=ca,
        hop=make_certificate(directory, "nexthop.test", ca, alt_names=("127.0.0.1", "::1")),
        proxy=make_certificate(directory, "proxy.test", ca, alt_names=("127.0.0.1",)),
        stranger=make_certificate(directory / "stranger", "nexthop.test"),
        expired=make_certificate(directory / "expired", "nexthop.test", ca,
                                 alt_names=("127.0.0.1",), days=-1),
    )


def server_context(cert: Certificate) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert.cert, cert.key)
    return context


def client_context(certs: Certs) -> ssl.SSLContext:
    """What a careful client uses: it trusts our lab CA only, and checks the name."""
    return ssl.create_default_context(cafile=str(certs.ca.cert))


#: ClientTLS: on with the proxy's certificate (values are functions of the next hop, which
#: carries the certificates: see the next_hop fixture of the TLS tests)
CLIENT_TLS = {
    "ClientTLS": "on",
    "TLSCertificate": lambda hop: str(hop.certs.proxy.cert),
    "TLSKey": lambda hop: str(hop.certs.proxy.key),
}
