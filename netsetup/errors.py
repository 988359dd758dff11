"""Exit codes and the exceptions that carry them to the CLI.

Every failure netsetup knows about is one of these exceptions; ``cli.main`` turns the exception
into its message on stderr and its ``exit_code``.  Nothing else decides an exit code.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1  # a kernel change failed (after a rollback of our own objects)
    USAGE = 2  # bad option, bad config file, unknown user, unsafe interface name
    NOT_ROOT = 3
    NO_KERNEL_SUPPORT = 4  # nat table, REDIRECT/addrtype/owner or the xtables extensions missing
    NO_INTERFACE = 5  # --interface names a link that does not exist, or none to intercept on


class NetsetupError(Exception):
    exit_code = ExitCode.FAILED


class UsageError(NetsetupError):
    exit_code = ExitCode.USAGE


class NotRoot(NetsetupError):
    exit_code = ExitCode.NOT_ROOT


class KernelSupportError(NetsetupError):
    """``family`` is set when only that address family is unsupported."""

    exit_code = ExitCode.NO_KERNEL_SUPPORT

    def __init__(self, message: str, family: int | None = None):
        super().__init__(message)
        self.family = family


class InterfaceNotFound(NetsetupError):
    exit_code = ExitCode.NO_INTERFACE


class OperationFailed(NetsetupError):
    """One kernel change failed.  ``op`` is the operation, printed as the command it stands for."""

    exit_code = ExitCode.FAILED

    def __init__(self, op: object, reason: str):
        super().__init__(f"{op}: {reason}")
        self.op = op
        self.reason = reason


#: The modules of the `netsetup` extra (pyproject.toml): a plain `pip install clamsmtp` lacks them.
EXTRA_MODULES = {"pyroute2": "pyroute2", "iptc": "python-iptables"}


def missing_module_message(module: str) -> str:
    """What to install when an extra's module is missing: said instead of a traceback."""
    return (
        f"the Python module {module} (package {EXTRA_MODULES[module]}) is missing: "
        "clamsmtp-netsetup needs the netsetup extra. Install it with "
        "pip install 'clamsmtp[netsetup]' (python-iptables builds a small C extension: it "
        "needs gcc, python3-dev and iptables), or on Debian: apt-get install python3-pyroute2 "
        "python3-iptables"
    )
