"""Documented file and directory commands, and the venv's tools (pip, pytest, --help)."""

from __future__ import annotations

import os
import pwd
import re
import stat
import time

import pytest
from docskit import REPO, documented, entry_argv, needs_clamsmtp_user, needs_root, ok, run, tool

# -- files and directories -------------------------------------------------------------------


@needs_root
@needs_clamsmtp_user
def test_install_d_commands(tmp_path):
    """`install -d -o clamsmtp ...` of the spool and the pid directory, under a temporary root."""
    account = pwd.getpwnam("clamsmtp")
    for command in documented("test_install_d_commands"):
        words = command.words
        target = tmp_path / words[-1].lstrip("/")
        ok(run([*words[:-1], target]))
        mode = int(words[words.index("-m") + 1], 8) if "-m" in words else 0o755
        info = target.stat()
        assert stat.S_IMODE(info.st_mode) == mode, command
        assert (info.st_uid, info.st_gid) == (account.pw_uid, account.pw_gid), command


def test_quarantine_expiry_command(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    old = time.time() - 40 * 86400
    for name in ("virus.a1b2c3", "virus.d4e5f6", "clamsmtpd.AbCd1234"):
        (spool / name).write_bytes(b"x")
    for name in ("virus.a1b2c3", "clamsmtpd.AbCd1234"):
        os.utime(spool / name, (old, old))
    for command in documented("test_quarantine_expiry_command"):
        words = [str(spool) if w == "/var/spool/clamsmtp" else w for w in command.words]
        ok(run(words))
    assert sorted(p.name for p in spool.iterdir()) == ["clamsmtpd.AbCd1234", "virus.d4e5f6"]


@pytest.mark.skipif(tool("ss") is None, reason="ss is missing (Debian package iproute2)")
def test_ss_commands_parse():
    """The ss filters of postfix.md and troubleshooting.md are valid (what they find varies)."""
    for command in documented("test_ss_commands_parse"):
        result = ok(run(command.words))
        assert result.stdout.startswith("State"), result.stdout


# -- the venv's tools ------------------------------------------------------------------------


def test_pip_show_aiosmtpd_is_in_the_pinned_range():
    (command,) = documented("test_pip_show_aiosmtpd_is_in_the_pinned_range")
    result = ok(run(entry_argv(command.words),
                    env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}))
    version = tuple(int(x) for x in re.search(r"^Version: (\d+)\.(\d+)\.(\d+)", result.stdout,
                                              flags=re.M).groups())
    # security.md: the dev venv has the newest 1.4.x, 1.4.6 with both CVE fixes; pyproject's
    # test extra admits 1.4.3 for Debian 12's python3-aiosmtpd, which has them backported
    assert (1, 4, 6) <= version < (1, 5, 0), version
    assert '"aiosmtpd>=1.4.3,<1.5"' in (REPO / "pyproject.toml").read_text()


def test_the_install_tests_command_collects_them():
    """install.md's pytest line, with --collect-only (the run itself is that module's)."""
    (command,) = documented("test_the_install_tests_command_collects_them")
    result = ok(run([*entry_argv(command.words), "--collect-only"], timeout=120))
    assert re.search(r"\b\d+ tests? collected\b", result.stdout), result.stdout


def test_the_reliability_test_commands_collect_them():
    """reliability.md's pytest lines, with --collect-only: each selects at least one test (the
    runs themselves are those modules')."""
    commands = documented("test_the_reliability_test_commands_collect_them")
    assert len(commands) >= 5
    for command in commands:
        result = ok(run([*entry_argv(command.words), "--collect-only", "-q",
                         "-p", "no:cacheprovider"], timeout=120))
        counts = re.findall(r"^(\d+)(?:/\d+)? tests? collected", result.stdout, flags=re.M)
        assert counts and int(counts[-1]) > 0, (str(command), result.stdout[-2000:])


def test_scripts_and_modules_print_their_help():
    for command in documented("test_scripts_and_modules_print_their_help"):
        words = [w for w in command.words if w not in ("--help", "...")]
        result = ok(run([*entry_argv(words), "--help"]))
        assert result.stdout.startswith("usage:"), (str(command), result.stdout)
