"""TLS contexts built from the configuration: one towards clients, one towards next hops.

Built once per configuration (at start-up, before the privilege drop, and on SIGHUP), never per
connection: loading a certificate, a key or the system CA store costs milliseconds, a session
must not pay it. The relay and the upstream connection only use the contexts.
"""

from __future__ import annotations

import os
import ssl
import stat
from dataclasses import dataclass

from .config import ClientTLS, Config, ConfigError, OutTLS


class TLSError(ConfigError):
    """A certificate, key or CA file that cannot be used; located like a configuration error."""


@dataclass(frozen=True)
class TLSContexts:
    """What the sessions of one configuration use; None where that leg has no TLS."""

    #: towards clients (ClientTLS: on): our certificate and key
    server: ssl.SSLContext | None
    #: towards next hops (OutTLS: may, encrypt, verify)
    client: ssl.SSLContext | None
    #: the name sent as SNI and, with verify, checked against the next hop's certificate
    server_hostname: str | None
    warnings: tuple[str, ...] = ()


def load(config: Config) -> TLSContexts:
    """Read the certificate, the key and the CA file the configuration names; TLSError if one
    cannot be used (the message names the directive and the file)."""
    warnings: list[str] = []
    server = None
    if config.client_tls is ClientTLS.ON:
        server = _server_context(config, warnings)
    client = None if config.out_tls is OutTLS.NONE else _client_context(config)
    return TLSContexts(server, client, config.out_tls_hostname, tuple(warnings))


def _server_context(config: Config, warnings: list[str]) -> ssl.SSLContext:
    certificate = config.tls_certificate
    assert certificate, "config guarantees TLSCertificate with ClientTLS: on"
    key = config.tls_key or certificate
    directive = "TLSKey" if config.tls_key else "TLSCertificate"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certificate, key)
    except FileNotFoundError as e:
        raise _error(config, "TLSCertificate" if e.filename == certificate else directive,
                     f"{e.filename or certificate}: no such file") from None
    except OSError as e:  # (ssl.SSLError is an OSError too)
        reason = _reason(e)
        if isinstance(e, ssl.SSLError) and "KEY_VALUES_MISMATCH" in str(e):
            reason = "the key does not belong to the certificate"
        where = f"{certificate} / {key}" if key != certificate else certificate
        raise _error(config, directive, f"cannot load {where}: {reason}") from None
    try:
        mode = os.stat(key).st_mode
    except OSError:
        mode = 0
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        warnings.append(f"{config.path}:0: {directive}: {key} is readable by every user of "
                        f"this machine: chmod o-rwx {key}")
    return context


def _client_context(config: Config) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if config.out_tls is not OutTLS.VERIFY:
        # may / encrypt: encryption without authentication, as Postfix's levels of those names
        # (a next hop's self-signed certificate is the common case on an internal relay)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    try:
        if config.tls_ca_file:
            context.load_verify_locations(cafile=config.tls_ca_file)
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    except OSError as e:
        raise _error(config, "TLSCAFile", f"cannot load {config.tls_ca_file}: {_reason(e)}"
                     ) from None
    return context


def _error(config: Config, directive: str, reason: str) -> TLSError:
    return TLSError(config.path, 0, directive, reason)


def _reason(error: OSError) -> str:
    if isinstance(error, ssl.SSLError):
        return error.reason or str(error)
    return error.strerror or str(error)


def describe_session(ssl_object: ssl.SSLObject | None) -> str:
    """`TLSv1.3` for a TLS leg, `none` for a clear one (the log's `tls=client/next-hop`)."""
    if ssl_object is None:
        return "none"
    return ssl_object.version() or "TLS"
