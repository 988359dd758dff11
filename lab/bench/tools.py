"""The programs the benchmark starts besides our proxy: where they are, and (check_tools) whether
they are all there and the benchmark runs as root, before it starts anything."""

from __future__ import annotations

import os
import shutil

from .workload import C, Plan

C_DAEMON = "/usr/sbin/clamsmtpd"
CLAMD_BINARY = shutil.which("clamd") or "/usr/sbin/clamd"  # what PrivateClamd runs


def tool(name: str) -> str:
    """A postfix test tool: /usr/sbin is not on every PATH."""
    return shutil.which(name) or f"/usr/sbin/{name}"


def check_tools(plan: Plan) -> list[str]:
    problems = []
    needed = [tool("smtp-source"), tool("smtp-sink"), CLAMD_BINARY]
    if C in plan.targets:
        needed.append(C_DAEMON)
    for path in needed:
        if not os.access(path, os.X_OK):
            problems.append(f"{path} not found (scripts/setup installs postfix, clamav-daemon "
                            "and clamsmtp)")
    if os.geteuid() != 0:
        problems.append("run as root: smtp-sink needs it for -u, and the C clamsmtpd's clamd "
                        "must read its TempDirectory")
    return problems
