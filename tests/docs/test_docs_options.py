"""Options, subcommands and unit names of documented commands against the programs' --help."""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from docskit import (
    BIN,
    COMMANDS,
    PROVISION,
    REPO,
    SCRIPT_ENTRY,
    UNIT_DIR,
    VENV_BIN,
    Command,
    entry_argv,
    run,
)

OWN_UNITS = {p.stem for p in UNIT_DIR.glob("*.service")}
FOREIGN_UNITS = {"clamsmtp": "Debian package clamsmtp", "clamav-daemon": "clamav-daemon"}
VERB_PROGRAMS = {"systemctl", "systemd-analyze", "apt-get", "vagrant"}
SHELL_OPERATORS = {"|", ";", "&&", "||", ">", "<", ">>"}


def help_argvs(words: list[str]) -> tuple[list[list[str]], bool] | None:
    """The commands printing the help of `words`' program, and whether it is this project's
    (then short options are checked too); None when there is nothing to ask."""
    program = words[0]
    if program in ("clamsmtpd", "scripts/install", "scripts/uninstall"):
        return [[str(BIN / "clamsmtpd") if program == "clamsmtpd" else str(REPO / program),
                 "--help"]], True
    if program == "clamsmtp-netsetup":
        subs = words[1].strip("[]").split("|") if len(words) > 1 else []
        return [[str(BIN / program), sub, "--help"] for sub in subs] or [[program]], True
    if program in SCRIPT_ENTRY:
        return [[*entry_argv([program]), "--help"]], True
    if program in ("python", "python3", ".venv/bin/python") and words[1:2] == ["-m"]:
        return [[sys.executable, "-m", words[2], "--help"]], words[2].startswith("appliance")
    if program in ("scripts/test", ".venv/bin/pytest"):
        return [[str(VENV_BIN / "pytest"), "--help"]], False
    if program in (".venv/bin/py-spy", ".venv/bin/pip"):
        return [[str(VENV_BIN / program[10:]), words[1], "--help"]], False
    if program.endswith(".sh"):
        return [["bash", str(PROVISION / program), "--help"]], True
    if program == "ip" and words[1:2] == ["netns"]:
        return [["ip", "netns", "help"]], False
    if program == "curl":
        return [["curl", "--help", "all"]], False
    if program in ("swaks", "systemctl", "systemd-analyze", "journalctl", "adduser", "apt-get",
                   "vagrant", "sysctl", "ss", "find", "install", "runuser", "nft", "grep",
                   "clamdscan", "useradd", "groupadd"):
        return [[program, "--help"]], False
    return None


def _segments(words: list[str]) -> Iterator[list[str]]:
    """The command, and the one it runs after a `--` (py-spy ... -- python ..., runuser)."""
    for n, word in enumerate(words):
        if word in SHELL_OPERATORS or word.endswith(";"):
            words = words[:n]
            break
    if "--" in words:
        cut = words.index("--")
        yield words[:cut]
        yield words[cut + 1:]
    else:
        yield words


@pytest.fixture(scope="module")
def help_texts() -> dict[tuple[str, ...], tuple[int, str]]:
    wanted: set[tuple[str, ...]] = set()
    for command in COMMANDS:
        for segment in _segments(command.words):
            found = help_argvs(segment) if segment else None
            if found:
                wanted.update(tuple(argv) for argv in found[0] if len(argv) > 1)

    def ask(argv: tuple[str, ...]) -> tuple[int, str]:
        if not (shutil.which(argv[0]) or Path(argv[0]).exists()):
            return -1, ""
        result = run(list(argv), env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
        return result.returncode, result.stdout + result.stderr

    keys = sorted(wanted)
    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(keys, pool.map(ask, keys), strict=True))


def _documents(text: str, option: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def option_problems(command: Command, helps: dict) -> list[str]:
    problems = []
    for segment in _segments(command.words):
        found = help_argvs(segment) if segment else None
        if not found:
            continue
        argvs, own = found
        texts = []
        for argv in argvs:
            code, text = helps.get(tuple(argv), (-1, ""))
            if code == -1:
                continue  # the program is not installed here
            if own and code != 0:
                problems.append(f"`{' '.join(argv)}` exited {code}: {text.strip()[-200:]}")
            texts.append(text)
        if not texts:
            continue
        text = "\n".join(texts)
        program = segment[0]
        skip = 3 if program in ("python", "python3", ".venv/bin/python") else 1  # -m MODULE
        for word in segment[skip:]:
            option = word.strip("[]").split("=")[0]
            long = option.startswith("--") and len(option) > 2
            short = own and re.fullmatch(r"-[A-Za-z]", option) is not None
            if (long or short) and not _documents(text, option):
                problems.append(f"{option} is not in `{' '.join(argvs[0])}`")
        verbs = []
        if program in VERB_PROGRAMS or program.endswith(".sh"):
            verbs = segment[1].strip("[]").split("|") if len(segment) > 1 else []
        elif program == "ip":
            verbs = segment[2:3]
        for verb in verbs:
            usage = rf"^\s*ip .*netns {verb}\b" if program == "ip" else (
                rf"^\s*({re.escape(program)} )?\[?{re.escape(verb)}\b")
            if not re.search(usage, text, flags=re.M):
                problems.append(f"{program} has no subcommand {verb}")
        if program in ("systemctl", "systemd-analyze"):
            for unit in (w for w in segment[2:] if not w.startswith("-")):
                name = Path(unit).name.removesuffix(".service")
                if name not in OWN_UNITS and name not in FOREIGN_UNITS:
                    problems.append(f"unit {unit}: not in {UNIT_DIR.relative_to(REPO)} and not "
                                    "a known unit of a Debian package")
    return [f"{command}: {p}" for p in problems]


def test_every_option_is_known_to_its_program(help_texts):
    problems = [p for command in COMMANDS for p in option_problems(command, help_texts)]
    assert not problems, "\n".join(problems)


def test_the_option_check_is_not_blind(help_texts):
    fake = [Command("x.md", 1, text, "block") for text in (
        "clamsmtpd --check-confg -f FILE", "clamsmtp-netsetup enable --proxy-prot 25",
        "systemctl enable --now clamsmtpdd", "scripts/bench --scenario 1k")]
    helps = dict(help_texts)
    missing = []
    for command in fake:
        program = command.words[0]
        if program == "systemctl" and not shutil.which(program):
            missing.append(program)  # a minimal container: no systemd package at all
            continue
        for segment in _segments(command.words):
            for argv in help_argvs(segment)[0]:
                if tuple(argv) not in helps:
                    helps[tuple(argv)] = (0, run(argv).stdout)
        assert option_problems(command, helps), command
    if missing:
        pytest.skip(f"the others were caught; {', '.join(missing)} is not installed here (Debian "
                    "package systemd), so its options cannot be checked")


def test_cannot_run_here_units_exist():
    """The systemctl lines name our units (appliance/data/systemd) or Debian's own."""
    units = set()
    for command in COMMANDS:
        if command.words[0] == "systemctl":
            units.update(w for w in command.words[2:] if not w.startswith("-"))
    assert {"clamsmtpd", "clamsmtp-netsetup"} <= units
    assert units <= OWN_UNITS | set(FOREIGN_UNITS), units - OWN_UNITS - set(FOREIGN_UNITS)
    for name in units - OWN_UNITS:  # Debian's units, where the package is installed
        package = FOREIGN_UNITS[name]
        installed = run(["dpkg-query", "-W", "-f", "${Status}", package.split()[-1]]) \
            if shutil.which("dpkg-query") else None
        if installed and installed.stdout == "install ok installed":
            assert any(Path(d, f"{name}.service").exists()
                       for d in ("/lib/systemd/system", "/usr/lib/systemd/system")), name
