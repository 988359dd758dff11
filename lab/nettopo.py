"""The namespace lab's topology and what it needs: nslab, the addresses, the requirements.

Shared by `NetLab` (netgateway.py) and the `scripts/netlab` command (netlab.py). The namespaces
themselves are made by nslab.py (also used by the root-only tests of tests/netsetup).
"""

from __future__ import annotations

import os
import pwd
import shutil
from pathlib import Path

from . import nslab

REPO_ROOT = Path(__file__).resolve().parents[1]
PROVISION = REPO_ROOT / "vagrant" / "provision"
PROXY_PORT = 10025
PREFIX = "nl"  # namespaces nlc-PID-HEX (client), nlg-... (gateway), nls-... (mail server)
TIMEOUT = 120.0
#: The daemon's User in the lab when it exists (the Debian clamsmtp package creates it).
DAEMON_USER = "clamsmtp"

CLIENT_V4, CLIENT_V6 = nslab.CLIENT_V4, nslab.CLIENT_V6
GATEWAY_IN_V4, GATEWAY_IN_V6 = nslab.GATEWAY_IN_V4, nslab.GATEWAY_IN_V6
GATEWAY_OUT_V4, GATEWAY_OUT_V6 = nslab.GATEWAY_OUT_V4, nslab.GATEWAY_OUT_V6
SERVER_V4, SERVER_V6 = nslab.SERVER_V4, nslab.SERVER_V6
SERVER = {4: SERVER_V4, 6: SERVER_V6}
CLIENT = {4: CLIENT_V4, 6: CLIENT_V6}
GATEWAY_OUT = {4: GATEWAY_OUT_V4, 6: GATEWAY_OUT_V6}


class LabError(RuntimeError):
    """The lab could not be built or a provisioning script failed."""


def original_destination(family: int, port: int = 25) -> str:
    """The daemon's log text for a connection to the mail server (Address.__str__ format)."""
    host = SERVER[family]
    return f"original destination: {f'[{host}]' if family == 6 else host}:{port}"


def alive(pid: int) -> bool:
    """Process `pid` runs and is not a zombie (an orphan can stay one until it is reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def default_user() -> str:
    """clamsmtp when that account exists, else "" (the daemon then stays root)."""
    try:
        pwd.getpwnam(DAEMON_USER)
    except KeyError:
        return ""
    return DAEMON_USER


def requirements() -> tuple[int, str] | None:
    """(exit status, why) when the lab cannot run here; None when it can."""
    if os.geteuid() != 0:
        return 3, ("needs root: it creates network namespaces and firewall rules "
                   "(run it as root, e.g. sudo scripts/netlab --demo)")
    reason = nslab.unavailable_reason()
    if reason is not None:
        return 4, f"network namespaces: {reason}"
    for command, package in (("swaks", "swaks"), ("clamd", "clamav-daemon"),
                             ("iptables-legacy", "iptables"), ("setsid", "util-linux")):
        if shutil.which(command) is None and not Path("/usr/sbin", command).exists():
            return 4, f"{command} not found: install the Debian package {package} (scripts/setup)"
    return None
