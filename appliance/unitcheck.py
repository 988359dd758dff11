"""What the shipped systemd unit (appliance/data/systemd/clamsmtpd.service) changes about a
configuration that is fine on its own, said by `--check-config` before the service meets it.

`PrivateTmp=yes` gives the service its own /tmp and /var/tmp, emptied when it stops: a clamd
socket there is invisible to it, and a spool there loses its quarantined messages at each stop
(without Quarantine a spool file lives only while its message is scanned: the default /tmp is
fine then).
Warnings only: the same configuration is right for `clamsmtpd -d` or a unit without PrivateTmp.
"""

from __future__ import annotations

from .config import Config

#: The directories `PrivateTmp=yes` replaces with the service's own.
PRIVATE_TMP = ("/tmp", "/var/tmp")
UNIT = "clamsmtpd.service"


def _under_private_tmp(path: str) -> bool:
    return any(path == d or path.startswith(d + "/") for d in PRIVATE_TMP)


def private_tmp_warnings(config: Config) -> list[str]:
    """One line per directive that PrivateTmp=yes of the unit would break."""
    warnings = []
    for clam in (a.path for a in config.clam_addresses if a.path):
        if not _under_private_tmp(clam):
            continue
        warnings.append(
            f"ClamAddress: {clam} is under /tmp or /var/tmp: run by {UNIT} (PrivateTmp=yes) the "
            "daemon has a private /tmp and does not see that socket; give clamd a socket "
            "elsewhere (Debian's is /var/run/clamav/clamd.ctl)")
    spool = config.temp_directory
    if config.quarantine and _under_private_tmp(spool):  # else its files live only for a scan
        warnings.append(
            f"TempDirectory: {spool} is under /tmp or /var/tmp: run by {UNIT} (PrivateTmp=yes) "
            "the daemon has a private /tmp, emptied when it stops, so quarantined messages "
            "there are lost; use /var/spool/clamsmtp")
    return warnings
