"""Throwaway certificates for the lab and the tests, made with the `openssl` command.

A private CA and leaf certificates it signs (EC P-256: quick to make, quick to use). Nothing
here is meant to leave the directory it is made in.
"""

from __future__ import annotations

import ipaddress
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Certificate:
    cert: Path  # PEM certificate
    key: Path   # PEM private key (mode 0600)
    name: str


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str = "clamsmtp lab CA") -> Certificate:
    """A self-signed CA certificate and its key in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "ca.pem", directory / "ca.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    key.chmod(0o600)
    return Certificate(cert, key, name)


def make_certificate(directory: Path, name: str, ca: Certificate | None = None,
                     *, alt_names: tuple[str, ...] = (), stem: str | None = None,
                     days: int = 2) -> Certificate:
    """A server certificate for `name` (and `alt_names`: host names or IP addresses), signed
    by `ca`, or self-signed without one; valid for `days` (-1: expired yesterday)."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = stem or name.replace("*", "_")
    cert, key = directory / f"{stem}.pem", directory / f"{stem}.key"
    sans = ",".join(_san(n) for n in (name, *alt_names))
    common = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
              "-keyout", str(key), "-subj", f"/CN={name}"]
    if ca is None:
        _openssl("req", "-x509", *common, "-out", str(cert), "-days", str(days),
                 "-addext", f"subjectAltName={sans}")
    else:
        csr = directory / f"{stem}.csr"
        ext = directory / f"{stem}.ext"
        ext.write_text(f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\n"
                       "basicConstraints=CA:FALSE\n")
        _openssl("req", "-new", *common, "-out", str(csr))
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
                 "-CAcreateserial", "-out", str(cert), "-days", str(days), "-extfile", str(ext))
        csr.unlink()
        ext.unlink()
    key.chmod(0o600)
    return Certificate(cert, key, name)


def _san(name: str) -> str:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return f"DNS:{name}"
    return f"IP:{name}"
