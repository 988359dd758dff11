"""Linux capabilities: keep exactly the ones `TransparentProxy: full` needs after the
privilege drop, and nothing else (prctl and capset through libc, as Debian ships no binding).

`TransparentProxy: full` sets IP_TRANSPARENT on every connection to a next hop, which needs
CAP_NET_ADMIN for as long as the daemon runs. The capability stays in the effective and
permitted sets only: not inheritable, not ambient, so a VirusAction script (exec'ed by a
non-root daemon) starts with none.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

CAP_NET_ADMIN = 12
NAMES = {CAP_NET_ADMIN: "CAP_NET_ADMIN"}

# linux/prctl.h and linux/capability.h
_PR_SET_KEEPCAPS = 8
_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAPABILITY_VERSION_3 = 0x20080522


class CapabilityError(Exception):
    """The capabilities could not be set as asked; the message says which and why."""


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _libc() -> ctypes.CDLL:
    if not sys.platform.startswith("linux"):
        raise CapabilityError("capabilities are Linux only")
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _prctl(libc: ctypes.CDLL, *args: int) -> None:
    if libc.prctl(*(ctypes.c_ulong(a) for a in args)) != 0:
        error = ctypes.get_errno()
        raise CapabilityError(f"prctl{args}: {os.strerror(error)}")


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40


def _names(caps: frozenset[int]) -> str:
    return ", ".join(NAMES.get(c, str(c)) for c in sorted(caps)) or "none"


def prepare_keep(caps: frozenset[int]) -> None:
    """Before setuid (as root): keep the permitted set across it, and take every other
    capability out of the bounding set, so that not even an exec can get one back."""
    libc = _libc()
    for cap in range(_last_cap() + 1):
        if cap not in caps:
            _prctl(libc, _PR_CAPBSET_DROP, cap)
    _prctl(libc, _PR_SET_KEEPCAPS, 1)


def restrict_to(caps: frozenset[int]) -> None:
    """After setuid (or when started unprivileged with ambient capabilities): exactly `caps`
    effective and permitted, none inheritable, no ambient ones to pass on to children."""
    libc = _libc()
    mask = [0, 0]
    for cap in caps:
        mask[cap // 32] |= 1 << (cap % 32)
    header = _Header(_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)(*(_Data(m, m, 0) for m in mask))
    if libc.capset(ctypes.byref(header), data) != 0:
        error = ctypes.get_errno()
        raise CapabilityError(
            f"cannot keep {_names(caps)}: {os.strerror(error)} (the daemon must start as root, "
            f"or with {_names(caps)} in systemd's AmbientCapabilities=)"
        )
    _prctl(libc, _PR_SET_KEEPCAPS, 0)
    _prctl(libc, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
