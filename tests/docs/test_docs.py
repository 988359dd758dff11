"""Every command and snippet in docs/*.md and README.md is run, or mapped to the test that runs it.

What is extracted, from every page (docs/dev/ is not user documentation and is left out):

* code blocks, fenced (```lang) or indented; each is classified by its language tag or, when it
  has none, by its content: a clamsmtpd.conf snippet (`Directive: value` lines), a Postfix
  main.cf (`name = value`) or master.cf (service lines, `-o` lines) snippet, a regexp table,
  a script (`#!`), a shell block (```sh: every line is a command), or output/diagrams, in which
  lines that start with a known program (`clamsmtp-netsetup status ...`, also behind a `# `
  root prompt) are commands;
* inline code spans that start with a known program and an argument (`clamsmtpd -v`).

The snippets are checked here: clamsmtpd.conf with `python -m appliance.cli --check-config`,
Postfix with `postconf -c <copy of /etc/postfix>`, the mime_header_checks example with
`postmap -q`. Each command must match exactly one pattern of the tables below: run here (by the
named test of this module), mapped to the test elsewhere that runs it, a synopsis or a mention
(checked against the program's --help only), or "cannot run here" with the reason. A command
that matches none fails `test_every_documented_command_is_run_or_mapped`, so a page cannot gain
a command that nothing runs. The options, subcommands and systemd unit names of every command
are also checked against the program's own --help (`test_every_option_is_known_to_its_program`).

Nothing here touches the machine's own /etc, /opt or /usr/local: files go to temporary
directories, firewall commands run in throwaway network namespaces, and where a command names a
system path it is run on a temporary copy instead (the substitutions are in each test). The
tests that need root, a user `clamsmtp`, clamd, postfix tools or network namespaces skip with
the reason elsewhere.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import pwd
import queue
import re
import secrets
import shlex
import shutil
import signal
import smtplib
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import EICAR, free_port

import appliance

REPO = Path(__file__).resolve().parents[2]
PAGES = [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md"]
DATA = REPO / "appliance" / "data"
SHIPPED_CONF = DATA / "clamsmtpd.conf"
SHIPPED_DEFAULTS = DATA / "default-clamsmtp-netsetup"
MIME_HEADER_CHECKS = DATA / "mime_header_checks"
UNIT_DIR = DATA / "systemd"
PROVISION = REPO / "vagrant" / "provision"
BIN = Path(sys.executable).parent  # the venv running the tests: clamsmtpd, clamsmtp-netsetup
VENV_BIN = REPO / ".venv" / "bin" if (REPO / ".venv" / "bin").is_dir() else BIN
TIMEOUT = 60
IS_ROOT = os.geteuid() == 0
INDENTED = "(indented)"

needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (run the suite as root)")


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


needs_clamsmtp_user = pytest.mark.skipif(
    not _user_exists("clamsmtp"), reason="no user clamsmtp (Debian package clamsmtp, or "
    "scripts/install, creates it)")


def _tool(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin", name), Path("/sbin", name)) if os.access(p, os.X_OK)),
        None)


# -- extraction ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """A code block of a page: `text` without the fence or the indentation."""

    page: str
    line: int  # first line of the content
    lang: str  # the fence's language tag, "" for none, INDENTED for an indented block
    text: str

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    def lines(self) -> list[str]:
        """The lines that are neither blank nor comments."""
        return [x for x in self.text.splitlines() if x.strip() and not x.lstrip().startswith("#")]


@dataclass(frozen=True)
class Command:
    page: str
    line: int
    text: str  # as written: continuations joined, the trailing comment removed
    source: str  # "block" or "inline"
    block: Block | None = None

    @property
    def words(self) -> list[str]:
        return split_words(self.text)

    @property
    def normal(self) -> str:
        """What the tables' patterns are matched against: the words joined by one space."""
        return " ".join(self.words)

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    def __str__(self) -> str:
        return f"{self.where}: {self.text}"


FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+")
INLINE = re.compile(r"(?<!`)`([^`\n]+(?:\n[^`\n]+)?)`(?!`)")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def parse_page(path: Path, page: str | None = None) -> tuple[list[Block], str]:
    """The code blocks of a page, and its prose with the code blanked out (same line numbers)."""
    page = page or path.relative_to(REPO).as_posix()
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    prose = list(lines)
    base, i, blank_before = 0, 0, True  # base: the indentation of the paragraph we are in
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        if fence:
            marker, cut = fence["fence"], len(fence["indent"])
            end = i + 1
            while end < len(lines) and not lines[end].strip().startswith(marker):
                end += 1
            body = [x[cut:] if not x[:cut].strip() else x.lstrip() for x in lines[i + 1:end]]
            blocks.append(Block(page, i + 2, fence["lang"], "\n".join(body) + "\n"))
            prose[i:end + 1] = [""] * (end + 1 - i)
            i, blank_before = end + 1, False
            continue
        if line.strip() and blank_before and _indent(line) >= base + 4:
            cut, end = _indent(line), i
            while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) >= cut):
                end += 1
            while not lines[end - 1].strip():
                end -= 1
            blocks.append(Block(page, i + 1, INDENTED,
                                "\n".join(x[cut:] for x in lines[i:end]) + "\n"))
            prose[i:end] = [""] * (end - i)
            i, blank_before = end, False
            continue
        if line.strip():
            item = LIST_ITEM.match(line)
            base = len(item[0]) if item else _indent(line)
        blank_before = not line.strip()
        i += 1
    return blocks, "\n".join(prose)


def split_words(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError:
        return text.split()


def strip_comment(text: str) -> str:
    """`text` without a trailing shell comment (a `#` at a word start, outside quotes)."""
    quote, escaped = "", False
    for n, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (n == 0 or text[n - 1].isspace()):
            return text[:n].rstrip()
    return text.rstrip()


#: Programs whose command lines count as commands outside ```sh blocks (in ```sh blocks every
#: line does): in output blocks and inline spans, when followed by an argument.
PROGRAMS = frozenset({
    "clamsmtpd", "clamsmtp-netsetup", "clamsmtp-lab", "swaks", "systemctl", "systemd-analyze",
    "vagrant", "postconf", "postmap", "postfix", "ip", "iptables", "nft", "sysctl", "ss", "curl",
    "find", "install", "runuser", "adduser", "useradd", "groupadd", "journalctl", "apt-get",
    "kill", "git", "grep", "printf", "python", "python3", "smtp-source", "smtp-sink",
})
OPTION_LIKE = re.compile(r"""^[-\[$/.@'"]""")
WORD_LIKE = re.compile(r"^\w[\w.:/@=+|-]*$")
#: Programs whose first argument may be a plain word (a subcommand, a user, a URL...).
WORD_ARGUMENT = frozenset({"clamsmtp-netsetup", "systemctl", "systemd-analyze", "vagrant", "ip",
                           "nft", "postfix", "git", "apt-get", "adduser", "grep", "curl"})
SHELL_LANGS = {"sh", "bash", "shell"}
CONF_LINE = re.compile(r"^\s*[A-Z][A-Za-z]*\s*:\s*\S")
MAIN_CF_LINE = re.compile(r"^[a-z][a-z0-9_]*\s*=")
MASTER_SERVICE = re.compile(
    r"^\S+\s+(?:inet|unix|unix-dgram|fifo|pass)\s+[-yn]\s+[-yn]\s+[-yn]\s+\S+\s+\S+\s+\S+")
MASTER_OPTION = re.compile(r"^\s+-o\s+[a-z][a-z0-9_]*=")
REGEXP_LINE = re.compile(r"^/.+/[a-z]*\s+\S")


def is_program(word: str) -> bool:
    return (word in PROGRAMS or word.startswith(("scripts/", ".venv/bin/"))
            or (re.fullmatch(r"[a-z]+\.sh", word) is not None and (PROVISION / word).is_file()))


def starts_a_command(words: list[str]) -> bool:
    """`words` look like a command line, not prose or output that starts with a program name."""
    if not words or not is_program(words[0]):
        return False
    if len(words) == 1 or OPTION_LIKE.match(words[1]):
        return True
    takes_word = words[0] in WORD_ARGUMENT or not words[0].isidentifier() and (
        words[0].startswith(("scripts/", ".venv/bin/")) or words[0].endswith(".sh"))
    return takes_word and WORD_LIKE.match(words[1]) is not None


def block_kind(block: Block) -> str:
    if block.lang in SHELL_LANGS:
        return "script" if block.text.startswith("#!") else "shell"
    if block.lang == "conf":
        return "clamsmtpd.conf"
    if block.lang == "ini":
        return "systemd"
    if block.lang not in ("", INDENTED):
        return f"unknown language {block.lang!r}"
    if block.text.startswith("#!"):
        return "script"
    lines = block.lines()
    if lines and all(CONF_LINE.match(x) for x in lines):
        return "clamsmtpd.conf"
    if lines and all(MAIN_CF_LINE.match(x) for x in lines):
        return "main.cf"
    if lines and all(MASTER_SERVICE.match(x) or MASTER_OPTION.match(x) for x in lines):
        return "master.cf"
    if lines and all(REGEXP_LINE.match(x) for x in lines):
        return "regexp table"
    return "output"


def shell_lines(block: Block) -> Iterator[tuple[int, str]]:
    """(line number, command) of a shell block: continuations joined, comments dropped."""
    pending, start = "", 0
    for n, raw in enumerate(block.text.splitlines()):
        if not pending:
            start = n
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        code = strip_comment(pending + raw).strip()
        pending = ""
        if code:
            yield block.line + start, " ".join(code.split())


def block_commands(block: Block) -> Iterator[Command]:
    kind = block_kind(block)
    if kind == "shell":
        for line, code in shell_lines(block):
            yield Command(block.page, line, code, "block", block)
    elif kind == "output":
        for n, raw in enumerate(block.text.splitlines()):
            text = raw.strip()
            if text.startswith("# "):  # a root prompt in a transcript
                text = text[2:]
            code = strip_comment(text).strip()
            if starts_a_command(split_words(code)):
                yield Command(block.page, block.line + n, " ".join(code.split()), "block", block)


def inline_commands(page: str, prose: str) -> Iterator[Command]:
    for match in INLINE.finditer(prose):
        text = " ".join(match[1].replace("\\|", "|").split())
        words = split_words(text)
        if len(words) >= 2 and starts_a_command(words):
            yield Command(page, prose.count("\n", 0, match.start()) + 1, text, "inline")


def _extract() -> tuple[list[Block], list[Command]]:
    blocks: list[Block] = []
    commands: list[Command] = []
    for path in PAGES:
        page_blocks, prose = parse_page(path)
        blocks += page_blocks
        for block in page_blocks:
            commands += block_commands(block)
        commands += inline_commands(path.relative_to(REPO).as_posix(), prose)
    commands.sort(key=lambda c: (PAGES.index(REPO / c.page), c.line))
    return blocks, commands


BLOCKS, COMMANDS = _extract()


def blocks_of(kind: str) -> list[Block]:
    return [b for b in BLOCKS if block_kind(b) == kind]


# -- the tables ------------------------------------------------------------------------------
# Each documented command matches exactly one pattern (re.fullmatch on Command.normal: the
# words as the shell splits them, joined by one space).

INSTALL_TESTS = "tests/install/test_install.py"

#: Run for real by a test of this module: pattern -> that test (it runs every command matching
#: its patterns; see `documented`).
RUN_HERE: dict[str, str] = {
    r"clamsmtpd -v": "test_clamsmtpd_v_prints_the_documented_version",
    r"clamsmtpd --check-config( -f (/etc/clamsmtpd\.conf|FILE))?":
        "test_check_config_of_the_shipped_file",
    r"clamsmtpd -d 4 -f /etc/clamsmtpd\.conf": "test_debug_level_4_shows_the_documented_dialogue",
    r"scripts/lab": "test_lab_stays_up_and_the_swaks_commands_it_prints_work",
    r"scripts/(lab|netlab) --help|(\.venv/bin/)?python -m appliance(\.\w+)+( \.\.\.)?":
        "test_scripts_and_modules_print_their_help",
    r"scripts/netlab --cleanup": "test_netlab_cleanup_removes_only_leftover_namespaces",
    r"scripts/bench --scenarios 1k --targets ours --rounds 1 --no-latency"
    r"|\.venv/bin/py-spy record .+": "test_the_small_benchmark_and_its_profile_run",
    r"\.venv/bin/pip show aiosmtpd": "test_pip_show_aiosmtpd_is_in_the_pinned_range",
    r"\.venv/bin/pytest tests/install -q -p no:cacheprovider":
        "test_the_install_tests_command_collects_them",
    r"\.venv/bin/pytest tests/(faults|fuzz|netsetup|integration)\S*( tests/\S+)*( -k \S+| -rxX)*":
        "test_the_reliability_test_commands_collect_them",
    r"postconf -[nM] .+": "test_documented_postconf_commands",
    r"postmap -q .+": "test_mime_header_checks_example",
    r"printf %s \S+ > /tmp/eicar\.com|swaks --server 127\.0\.0\.1:10026 .+":
        "test_swaks_commands_against_clamsmtpd",
    r"grep -E \S+ /var/log/mail\.log \| tail": "test_mail_log_grep_matches_the_sample_lines",
    r"ss -ltnp?( .+)?": "test_ss_commands_parse",
    r"install -d .+": "test_install_d_commands",
    r"find /var/spool/clamsmtp .+": "test_quarantine_expiry_command",
    r"curl http://127\.0\.0\.1:9330/metrics": "test_metrics_curl_command",
    r"runuser -u clamsmtp -- env -i .+": "test_virus_action_example_is_safe_with_hostile_values",
    r"sysctl -w net\.\S+=1"
    r"|clamsmtp-netsetup (enable|disable|status)( -i eth1| --proxy-port 10025| --local"
    r"| --user (clamsmtp|105)| --exempt-source 192\.0\.2\.25/32| \$NETSETUP_ARGS)*":
        "test_netsetup_and_sysctl_commands_in_a_namespace",
    r"iptables -t nat -A PREROUTING .+|nft (-f|delete table( \.\.\.)?|list table inet \S+)":
        "test_iptables_recipe_and_nft_ruleset_in_a_namespace",
}

#: Run by a test elsewhere: pattern -> "path::test" (test_mapped_tests_exist checks them).
MAPPED: dict[str, str] = {
    r"scripts/install|scripts/install (--root /srv/image )?--no-apt"
    r"|(useradd|groupadd) --(system|root DIR)":
        f"{INSTALL_TESTS}::test_install_creates_the_system_user_and_group",
    r"scripts/install --venv /srv/clamsmtp":
        f"{INSTALL_TESTS}::test_custom_venv_directory_and_debian_clamsmtp_spool",
    r"scripts/install --system": f"{INSTALL_TESTS}::test_system_install_and_uninstall",
    r"scripts/uninstall": f"{INSTALL_TESTS}::test_uninstall_removes_venv_links_and_units",
    r"scripts/uninstall --purge(-config)?":
        f"{INSTALL_TESTS}::test_purge_removes_spool_user_and_only_an_unchanged_config",
    r"systemd-analyze verify( /etc/systemd/system/\S+\.service)*":
        f"{INSTALL_TESTS}::test_installed_units_verify_with_the_installed_commands",
    r"systemd-analyze security --offline=true( /etc/systemd/system/clamsmtpd\.service)?":
        f"{INSTALL_TESTS}::test_systemd_analyze_security_rates_the_daemon_unit_ok",
    r"clamsmtpd -f /etc/clamsmtpd\.conf":
        "tests/integration/test_cli.py::test_daemon_mode_detaches_and_writes_a_pid_file",
    r"kill -(HUP|TERM)": f"{INSTALL_TESTS}::test_the_daemon_starts_as_the_unit_starts_it",
    r"scripts/lab --demo":
        "tests/integration/test_labkit.py::test_lab_demo_with_this_projects_daemon",
    r"scripts/netlab --demo":
        "tests/e2e/test_transparent.py::test_netlab_demo_runs_green_and_leaves_nothing_behind",
    r"scripts/netlab": "tests/e2e/test_transparent.py::test_netlab_stays_up_until_ctrl_c",
    r"scripts/bench( --quick| --markdown \S+| --json \S+)?|smtp-source -A .+|smtp-sink .+"
    r"|scripts/bench --scenarios \S+ --targets \S+ --sessions \d+ --rounds \d+":
        "tests/integration/test_bench.py::"
        "test_a_tiny_benchmark_measures_every_target_and_every_message_is_accepted",
    r"clamsmtp-netsetup (enable|disable|status) --backend nft( --dry-run)?|nft list ruleset":
        "tests/netsetup/test_nft_netns.py::"
        "test_nft_enable_twice_status_and_disable_restores_the_exact_ruleset",
    r"clamsmtp-netsetup disable --backend iptables":
        "tests/netsetup/test_nft_netns.py::test_rules_of_both_backends_refused_shown_and_removed",
    r"nft -f - \(replace table inet clamsmtp-10025, one transaction\)":
        "tests/netsetup/test_nft_netns.py::test_nft_failure_half_way_changes_nothing",
    r"(clamd|mailserver|gateway|client)\.sh .+|clamsmtp-netsetup enable -i IF --proxy-port P":
        "tests/e2e/test_transparent.py::test_provisioning_again_changes_nothing",
}

#: Not complete commands (usage lines, a program named in prose): only checked against the
#: program's --help.
SYNOPSES: dict[str, str] = {
    r"clamsmtpd( \[-[dfp] [A-Z]+\])+|clamsmtpd --check-config( \[-[fp] [A-Z]+\])+":
        "clamsmtpd's usage lines",
    r"clamsmtp-netsetup (enable|disable|status) \[options\] .+"
    r"|clamsmtp-netsetup enable\|disable\|status": "clamsmtp-netsetup's usage lines",
    r"ip netns( exec)?": "named in prose: what runs the labs' namespaces (used by this module)",
    r"sysctl -w": "named in prose; the whole sysctl lines run here",
    r"smtp-source -[dl]": "an smtp-source option named in prose (what --keep-connection and "
                          "the load column mean)",
}

NO_SYSTEMD = ("systemd is not PID 1 here, so there is no service manager to talk to; and it "
              "would change this machine's services")

#: Cannot run here at all: pattern -> why. Their syntax is checked as far as it can be (options,
#: subcommands and unit names against the program's --help and appliance/data/systemd/).
CANNOT_RUN_HERE: dict[str, str] = {
    r"systemctl (enable --now|disable --now|restart|reload|start|stop|status|edit"
    r"|daemon-reload)( [\w.-]+)*": NO_SYSTEMD,
    r"systemd-analyze security clamsmtpd": "needs the unit loaded in a running systemd; the "
                                           "same rating offline, on the unit file, is "
                                           "test_install.py::test_systemd_analyze_security_"
                                           "rates_the_daemon_unit_ok",
    r"journalctl -t clamsmtpd": "no systemd journal here (systemd is not PID 1)",
    r"git pull": "fetches from the network and changes this checkout",
    r"scripts/test( -q)?": "runs the whole suite, this module included; CI runs it (.ci/run)",
    r"postfix reload": "reloads this machine's Postfix; no Postfix runs here (scripts/setup "
                       "stops it), the snippets are checked with postconf -c instead",
    r"swaks --server 127\.0\.0\.1:25 .+": "needs the whole Postfix path of postfix.md running "
                                          "on port 25; the swaks commands to clamsmtpd run here",
    r"adduser .+": "creates an account or changes group membership on this machine",
    r"apt-get purge clamsmtp": "removes a package from this machine",
    r"runuser -u clamsmtp -- clamdscan .+": "needs the system's clamd (/etc/clamav/clamd.conf), "
                                            "which scripts/setup stops; the tests use a "
                                            "private clamd",
    r"grep clamsmtpd /var/log/mail\.log": "no syslog daemon writes /var/log/mail.log here; "
                                          "the documented grep -E runs on sample lines",
    r"\.venv/bin/pip install atheris": "installs the optional fuzzer atheris, which is not a "
                                       "dependency of the project, into the venv",
    r"\.venv/bin/python tests/fuzz/atheris_dotstuff\.py .+": "needs atheris (not a dependency) "
                                                            "and is a minute of fuzzing by "
                                                            "hand; the same properties run "
                                                            "in tests/fuzz with Hypothesis",
}

#: Code blocks that are not commands, and where they are checked.
BLOCK_CHECKS: dict[str, str] = {
    "clamsmtpd.conf": "test_clamsmtpd_conf_snippet",
    "main.cf": "test_postfix_snippets_pass_postconf",
    "master.cf": "test_postfix_snippets_pass_postconf",
    "regexp table": "test_mime_header_checks_example",
    "systemd": f"{INSTALL_TESTS}::test_the_documented_low_port_drop_in_verifies",
    "shell": "test_every_documented_command_is_run_or_mapped",
    "output": "test_every_documented_command_is_run_or_mapped",
}

#: Scripts shown in full (`#!` blocks): (interpreter, name on its second line) -> the test.
KNOWN_SCRIPTS: dict[tuple[str, str], str] = {
    ("sh", "clamsmtp-virus-action"): "test_virus_action_example_is_safe_with_hostile_values",
    ("nft", "clamsmtp-netsetup"): "test_iptables_recipe_and_nft_ruleset_in_a_namespace",
}

TABLES: dict[str, dict[str, str]] = {
    "run here": RUN_HERE, "mapped": MAPPED, "synopsis": SYNOPSES,
    "cannot run here": CANNOT_RUN_HERE,
}


def rules_matching(command: Command) -> list[tuple[str, str, str]]:
    return [(table, pattern, target) for table, rules in TABLES.items()
            for pattern, target in rules.items() if re.fullmatch(pattern, command.normal)]


def documented(test_name: str) -> list[Command]:
    """The documented commands that RUN_HERE gives to `test_name`, in page order."""
    patterns = [p for p, name in RUN_HERE.items() if name == test_name]
    assert patterns, f"RUN_HERE names no pattern for {test_name}"
    found = [c for c in COMMANDS if any(re.fullmatch(p, c.normal) for p in patterns)]
    assert found, f"no documented command for {test_name} any more: update RUN_HERE"
    return found


def script_block(interpreter: str, name: str) -> Block:
    for block in blocks_of("script"):
        if _script_key(block) == (interpreter, name):
            return block
    raise AssertionError(f"no {interpreter} script {name} in the docs any more")


def _script_key(block: Block) -> tuple[str, str]:
    first, second = (block.text.splitlines() + ["", ""])[:2]
    interpreter = Path(first[2:].split()[0]).name if first.startswith("#!") else ""
    return interpreter, second.lstrip("# ").split(":")[0].strip()


def run(argv: list[str | Path], **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("timeout", TIMEOUT)
    kwargs.setdefault("cwd", REPO)
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kwargs)


def sh(text: str, **kwargs) -> subprocess.CompletedProcess:
    return run(["bash", "-c", text], **kwargs)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (f"{result.args} exited {result.returncode}\n"
                                    f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


# -- the tables are complete and point at real tests ----------------------------------------


def test_the_docs_have_commands_and_snippets():
    assert len(COMMANDS) > 80 and len(blocks_of("clamsmtpd.conf")) > 20
    assert {"docs/install.md", "docs/postfix.md", "README.md"} <= {c.page for c in COMMANDS}


def test_every_documented_command_is_run_or_mapped():
    unclassified, ambiguous = [], []
    for command in COMMANDS:
        rules = rules_matching(command)
        if not rules:
            unclassified.append(str(command))
        elif len(rules) > 1:
            ambiguous.append(f"{command}\n    " + "\n    ".join(map(str, rules)))
    assert not unclassified, (
        "documented commands that nothing runs: run them in a test of this module (RUN_HERE), "
        "map them to the test that runs them (MAPPED), or say why they cannot run here "
        "(CANNOT_RUN_HERE):\n" + "\n".join(unclassified))
    assert not ambiguous, "commands matching several patterns:\n" + "\n".join(ambiguous)


NEW_PAGE = """# A new page

Run `clamsmtpd --new-flag` first, then:

```sh
scripts/newtool --go     # a new script
systemctl enable --now clamsmtpd
```

    clamsmtp-netsetup enable -i eth9 --proxy-port 10099

```conf
OutAddress: 127.0.0.1:10025
```

```
clamsmtpd: 100000: accepted connection from: 127.0.0.1
```
"""


def test_a_command_added_to_a_page_is_caught(tmp_path):
    """The extraction finds new commands wherever they are written; those that no pattern
    knows fail test_every_documented_command_is_run_or_mapped."""
    page = tmp_path / "new.md"
    page.write_text(NEW_PAGE)
    blocks, prose = parse_page(page, "docs/new.md")
    commands = [*(c for b in blocks for c in block_commands(b)),
                *inline_commands("docs/new.md", prose)]
    assert sorted(c.normal for c in commands) == [
        "clamsmtp-netsetup enable -i eth9 --proxy-port 10099", "clamsmtpd --new-flag",
        "scripts/newtool --go", "systemctl enable --now clamsmtpd"]
    known = [c.normal for c in commands if rules_matching(c)]
    assert known == ["systemctl enable --now clamsmtpd"]
    assert [block_kind(b) for b in blocks] == ["shell", "output", "clamsmtpd.conf", "output"]


def test_every_pattern_still_matches_a_documented_command():
    stale = [f"{table}: {pattern}" for table, rules in TABLES.items() for pattern in rules
             if not any(re.fullmatch(pattern, c.normal) for c in COMMANDS)]
    assert not stale, "patterns that match no documented command any more:\n" + "\n".join(stale)


def test_every_code_block_is_recognised():
    problems = []
    for block in BLOCKS:
        kind = block_kind(block)
        if kind == "script":
            if _script_key(block) not in KNOWN_SCRIPTS:
                problems.append(f"{block.where}: script {_script_key(block)} is not in "
                                "KNOWN_SCRIPTS")
        elif kind not in BLOCK_CHECKS:
            problems.append(f"{block.where}: {kind}")
    assert not problems, "code blocks of an unknown kind:\n" + "\n".join(problems)


def _defined(path: Path, name: str) -> bool:
    tree = ast.parse(path.read_text())
    *classes, function = name.split("::")
    body = tree.body
    for cls in classes:
        body = next((n.body for n in body if isinstance(n, ast.ClassDef) and n.name == cls), [])
    return any(isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == function
               for n in body)


def test_mapped_tests_exist():
    targets = [*MAPPED.values(), *(t for t in BLOCK_CHECKS.values() if "::" in t)]
    for target in targets:
        path, _, name = target.partition("::")
        assert (REPO / path).is_file(), target
        assert _defined(REPO / path, name), f"{target}: no such test"


def test_run_here_tests_exist_in_this_module():
    names = {*RUN_HERE.values(), *KNOWN_SCRIPTS.values(),
             *(t for t in BLOCK_CHECKS.values() if "::" not in t)}
    for name in names:
        assert name.startswith("test_") and callable(globals().get(name)), name


def test_the_scripts_run_setup_then_the_entry_point_that_runs_here():
    """scripts/lab, bench and netlab are `scripts/setup` (apt, pip: not run here) followed by
    one exec; the tests of this module run what they exec, with the same arguments."""
    for script, target in SCRIPT_ENTRY.items():
        text = (REPO / script).read_text()
        assert 'bash "$REPO/scripts/setup"' in text, script
        execs = re.findall(r"^exec (.+)$", text, flags=re.M)
        assert execs == [target], (script, execs)
    assert "exec bash scripts/test -q" in (REPO / ".ci" / "run").read_text()  # README.md


SCRIPT_ENTRY = {
    "scripts/lab": '"$REPO/.venv/bin/clamsmtp-lab" "$@"',
    "scripts/bench": '"$REPO/.venv/bin/python" -m appliance.lab.bench "$@"',
    "scripts/netlab": '"$REPO/.venv/bin/python" -m appliance.lab.netlab "$@"',
}


def entry_argv(words: list[str]) -> list[str]:
    """What a documented command runs here: the venv's programs instead of the PATH's."""
    program, rest = words[0], words[1:]
    if program == "scripts/lab":
        return [str(BIN / "clamsmtp-lab"), *rest]
    if program in ("scripts/bench", "scripts/netlab"):
        return [sys.executable, "-m", f"appliance.lab.{program[8:]}", *rest]
    if program in ("python", "python3", ".venv/bin/python"):
        return [sys.executable, *rest]
    if program.startswith(".venv/bin/"):
        return [str(VENV_BIN / program[10:]), *rest]
    if program in ("clamsmtpd", "clamsmtp-netsetup"):
        return [str(BIN / program), *rest]
    return [program, *rest]


# -- options, subcommands and unit names against the programs' own --help -------------------

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
    for command in fake:
        for segment in _segments(command.words):
            for argv in help_argvs(segment)[0]:
                if tuple(argv) not in helps:
                    helps[tuple(argv)] = (0, run(argv).stdout)
        assert option_problems(command, helps), command


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


# -- clamsmtpd.conf snippets -----------------------------------------------------------------

#: Snippets the page says warn: (page, a line of the snippet) -> the warning.
EXPECTED_WARNINGS: dict[tuple[str, str], str] = {}


@pytest.fixture(scope="module")
def checked_snippets(tmp_path_factory) -> dict[Block, subprocess.CompletedProcess]:
    """`python -m appliance.cli --check-config -f SNIPPET` for every snippet, in parallel."""
    directory = tmp_path_factory.mktemp("conf")

    def check(numbered: tuple[int, Block]) -> subprocess.CompletedProcess:
        conf = directory / f"{numbered[0]}.conf"
        conf.write_text(numbered[1].text)
        return run([sys.executable, "-m", "appliance.cli", "--check-config", "-f", conf])

    snippets = blocks_of("clamsmtpd.conf")
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(snippets, pool.map(check, enumerate(snippets)), strict=True))


@pytest.mark.parametrize("block", blocks_of("clamsmtpd.conf"), ids=lambda b: b.where)
def test_clamsmtpd_conf_snippet(block, checked_snippets):
    result = checked_snippets[block]
    assert result.returncode == 0, f"{block.where}:\n{block.text}\n{result.stderr}"
    expected = [w for (page, line), w in EXPECTED_WARNINGS.items()
                if page == block.page and line in block.text.splitlines()]
    if expected:
        assert all(w in result.stderr for w in expected), result.stderr
    else:
        assert result.stderr == "", f"{block.where} warns:\n{result.stderr}"
    # every directive of the snippet is in the effective configuration it prints
    effective = result.stdout.lower()
    for line in block.lines():
        name = line.split(":")[0].strip().lower()
        assert f"{name}:" in effective or name == "outaddress", (name, result.stdout)


def test_the_debian_defaults_block_is_the_shipped_file():
    """configuration.md: "Debian's /etc/clamsmtpd.conf (the same file as
    appliance/data/clamsmtpd.conf) sets the following"."""
    shipped = [" ".join(x.split()) for x in SHIPPED_CONF.read_text().splitlines()
               if x.strip() and not x.startswith("#")]
    block = next(b for b in blocks_of("clamsmtpd.conf")
                 if b.page == "docs/configuration.md" and b.lines()[0] == "OutAddress: 10025")
    assert [" ".join(x.split()) for x in block.lines()] == shipped


def test_check_config_of_the_shipped_file():
    for command in documented("test_check_config_of_the_shipped_file"):
        words = command.words
        if "-f" in words:  # /etc/clamsmtpd.conf (what scripts/install puts there), or FILE
            words[words.index("-f") + 1] = str(SHIPPED_CONF)
        else:
            words += ["-f", str(SHIPPED_CONF)]
        result = ok(run(entry_argv(words)))
        assert result.stderr == "", command
        assert "Listen: 127.0.0.1:10026" in result.stdout, result.stdout
    # "every effective value on stdout (in clamsmtpd.conf syntax)": it reads back the same
    again = Path(tempfile.mkstemp(prefix="clamsmtp-docs-", suffix=".conf")[1])
    try:
        again.write_text(result.stdout)
        reread = ok(run([BIN / "clamsmtpd", "--check-config", "-f", again])).stdout
        assert reread.splitlines()[1:] == result.stdout.splitlines()[1:]  # [0]: the file name
    finally:
        again.unlink()


def test_clamsmtpd_v_prints_the_documented_version():
    version = f"clamsmtpd (version {appliance.__version__})"
    for command in documented("test_clamsmtpd_v_prints_the_documented_version"):
        result = ok(run(entry_argv(command.words)))
        assert result.stdout.splitlines()[0] == version, result.stdout
    text = (REPO / "docs" / "configuration.md").read_text()
    assert f"`{version}`" in text, "configuration.md shows another version for -v"


# -- Postfix ---------------------------------------------------------------------------------

POSTCONF, POSTMAP = _tool("postconf"), _tool("postmap")
needs_postconf = pytest.mark.skipif(
    POSTCONF is None or not Path("/etc/postfix/main.cf").exists(),
    reason="postconf or /etc/postfix/main.cf is missing (Debian package postfix)")


def postfix_copy(tmp_path: Path, main: str = "", master: str = "") -> Path:
    """A copy of /etc/postfix with `main` and `master` appended (never the real one)."""
    directory = tmp_path / f"postfix-{secrets.token_hex(3)}"
    shutil.copytree("/etc/postfix", directory, symlinks=True)
    for name, extra in (("main.cf", main), ("master.cf", master)):
        if extra:
            with open(directory / name, "a") as file:
                file.write("\n# appended by tests/docs/test_docs.py\n" + extra)
    settled(directory)
    return directory


def settled(directory: Path) -> None:
    """Date main.cf and master.cf back: postconf waits a second or two for a file changed
    within the last second to settle."""
    past = time.time() - 10
    for name in ("main.cf", "master.cf"):
        os.utime(directory / name, (past, past))


def postconf_warnings(directory: Path) -> list[str]:
    lines = []
    for flag in ("-n", "-M"):
        result = run([POSTCONF, "-c", directory, flag])
        assert result.returncode == 0, result.stderr
        lines += [x.replace(str(directory), "DIR") for x in result.stderr.splitlines()]
    return sorted(set(lines))


def master_variants() -> list[tuple[Block, str]]:
    """Each master.cf snippet as Postfix would read it. A block of `-o` lines only changes the
    service of the page's previous full master.cf block whose `-o name=` it repeats."""
    variants, full = [], {}
    for block in blocks_of("master.cf"):
        if any(MASTER_SERVICE.match(x) for x in block.lines()):
            full[block.page] = block.text
            variants.append((block, block.text))
            continue
        assert block.page in full, f"{block.where}: -o lines without a service above them"
        text = full[block.page]
        for line in block.lines():
            name = line.split("=")[0]
            old = [x for x in text.splitlines() if x.startswith(name + "=")]
            assert len(old) == 1, f"{block.where}: {name} is in {len(old)} lines of the service"
            text = text.replace(old[0] + "\n", line + "\n")
        variants.append((block, text))
    return variants


@needs_postconf
def test_postfix_snippets_pass_postconf(tmp_path):
    main_blocks = blocks_of("main.cf")
    assert main_blocks and blocks_of("master.cf")
    typo = master_variants()[0][1].replace("smtp_send_xforward_command=",
                                           "smtp_send_xforward_commando=")
    cases = [(None, "", ""), *((b, b.text, "") for b in main_blocks),
             *((b, "", text) for b, text in master_variants()), ("typo", "", typo)]
    directories = [postfix_copy(tmp_path, main, master) for _, main, master in cases]
    with ThreadPoolExecutor(max_workers=4) as pool:
        warnings = list(pool.map(postconf_warnings, directories))
    baseline = warnings[0]
    for (block, main, master), directory, found in zip(cases, directories, warnings,
                                                      strict=True):
        if block == "typo":  # the check is not blind: a misspelt -o parameter is reported
            assert found != baseline
            continue
        assert found == baseline, (block and block.where, found)
        if main:
            shown = ok(run([POSTCONF, "-c", directory, "-n"])).stdout.splitlines()
            for line in block.lines():
                assert " ".join(line.split()) in shown, (block.where, line)
        if master:
            services = ok(run([POSTCONF, "-c", directory, "-M"])).stdout
            for line in master.splitlines():
                if MASTER_SERVICE.match(line):
                    name, kind = line.split()[:2]
                    assert re.search(rf"^{re.escape(name)}\s+{kind}\s", services,
                                     flags=re.M), line


@needs_postconf
def test_documented_postconf_commands(tmp_path):
    """postfix.md's "Apply and check", after its main.cf and master.cf sections."""
    main = next(b for b in blocks_of("main.cf") if "content_filter" in b.text)
    master = next(text for block, text in master_variants() if block.page == main.page)
    directory = postfix_copy(tmp_path, main=main.text, master=master)
    for command in documented("test_documented_postconf_commands"):
        words = command.words
        result = run([POSTCONF, "-c", directory, *words[1:]])
        assert result.returncode == 0 and result.stderr == "", (str(command), result.stderr)
        names = [w for w in words[2:] if not w.startswith("-")]
        lines = result.stdout.splitlines()
        assert len(lines) == len(names), (str(command), result.stdout)
        for name, line in zip(names, lines, strict=True):
            assert line.startswith(name.replace("/", " ").split()[0] + " "), (name, line)
        if words[1] == "-n":
            assert lines == [" ".join(x.split()) for x in main.lines()]


@pytest.mark.skipif(POSTMAP is None, reason="postmap is missing (Debian package postfix)")
def test_mime_header_checks_example(tmp_path):
    rules = [x for x in MIME_HEADER_CHECKS.read_text().splitlines()
             if x.strip() and not x.startswith("#")]
    tables = blocks_of("regexp table")
    assert tables and all(b.lines() == rules for b in tables), "docs and the example file differ"
    table = f"regexp:{MIME_HEADER_CHECKS}"
    content_filter = next(b for b in blocks_of("main.cf") if "content_filter" in b.text)
    destination = re.search(r"content_filter\s*=\s*(\S+)", content_filter.text)[1]
    action = f"FILTER {destination}"  # the same transport as the content filter
    for header, expected in {
        "Content-Type: application/zip": action,
        "Content-Type: application/octet-stream; name=eicar.com": action,
        "content-type: APPLICATION/PDF": action,  # regexp tables ignore case
        "Content-Type: text/html; charset=utf-8": action,
        "Content-Type: text/plain; charset=us-ascii": None,
        "Content-Type: image/png": None,  # the "paranoid" rule is commented out
    }.items():
        result = run([POSTMAP, "-q", header, table])
        assert result.stderr == "", result.stderr
        if expected is None:
            assert result.returncode == 1 and result.stdout == "", header
        else:
            assert result.returncode == 0 and result.stdout.strip() == expected, header
    commands = documented("test_mime_header_checks_example")
    comment = [x.lstrip("# ") for x in MIME_HEADER_CHECKS.read_text().splitlines()
               if x.startswith("#   ")]
    for command in commands:
        assert command.text in comment, "the example file shows another test command"
        words = [table if w == "regexp:/etc/postfix/mime_header_checks" else w
                 for w in command.words]
        assert ok(run([POSTMAP, *words[1:]])).stdout.strip() == action
    # the file's own install line, on a copy of /etc/postfix
    if POSTCONF and Path("/etc/postfix/main.cf").exists():
        install = next(x for x in comment if x.startswith("postconf -e "))
        directory = postfix_copy(tmp_path)
        ok(run([POSTCONF, "-c", directory, *split_words(install)[1:]]))
        settled(directory)
        shown = ok(run([POSTCONF, "-c", directory, "-n", "mime_header_checks"]))
        assert shown.stdout.strip() == split_words(install)[-1] and shown.stderr == ""


# -- the daemon, swaks and the log -----------------------------------------------------------

SWAKS = _tool("swaks")


@pytest.mark.skipif(SWAKS is None, reason="swaks is missing (scripts/setup installs it)")
@pytest.mark.next_hop_replies(ehlo_extensions=["8BITMIME", "PIPELINING", "STARTTLS", "CHUNKING"],
                              DATA="250 2.0.0 Ok: queued as 3F2A81C0D4")
def test_swaks_commands_against_clamsmtpd(appliance, next_hop, tmp_path):
    """postfix.md "Test with swaks": the clean message is relayed, EICAR is dropped (250)."""
    eicar = tmp_path / "eicar.com"
    for command in documented("test_swaks_commands_against_clamsmtpd"):
        text = command.text.replace("/tmp/eicar.com", str(eicar)).replace(
            "127.0.0.1:10026", f"127.0.0.1:{appliance.port}")
        result = sh(text)
        if command.words[0] == "printf":
            ok(result)
            assert eicar.read_bytes() == EICAR
            continue
        assert result.returncode == 0, result.stdout + result.stderr
        ehlo = [x for x in result.stdout.splitlines() if x.startswith("<-  250")]
        assert not [x for x in ehlo if re.search("PIPELINING|STARTTLS|CHUNKING", x)], ehlo
        for reply in expected_replies(command):
            assert f"<-  {reply}" in result.stdout, (reply, result.stdout)
    assert [m.header("X-Virus-Scanned") for m in next_hop.messages] == [
        "ClamAV using ClamSMTP"]  # the clean one only


def expected_replies(command: Command) -> list[str]:
    """The `# <-  REPLY   notes` lines that follow a command in its block."""
    lines = command.block.text.splitlines()
    start = command.line - command.block.line
    replies = []
    for line in lines[start + 1:]:
        if not line.startswith("#"):
            if replies or not line.startswith(" "):
                break
            continue  # a continuation line of the command
        match = re.match(r"#\s*<-\s+(.+?)(\s{2,}.*)?$", line)
        if match:
            replies.append(match[1])
    return replies


def test_debug_level_4_shows_the_documented_dialogue(appliance, tmp_path):
    """troubleshooting.md: `clamsmtpd -d 4 -f FILE` and the dialogue it shows. The appliance
    fixture runs the daemon exactly so, with a lab configuration as FILE."""
    command = next(c for c in documented("test_debug_level_4_shows_the_documented_dialogue")
                   if c.block is not None)
    assert appliance.proc.args[-4:] == [*command.words[1:4], str(appliance.conf_path)]
    with smtplib.SMTP(appliance.host, appliance.port, local_hostname="mail.example.org",
                      timeout=30) as client:
        client.sendmail("alice@example.org", ["bob@example.com"],
                        b"Subject: debug\r\n\r\nhello\r\n")
    sample = next(b for b in BLOCKS if b.page == command.page and b.line > command.line)
    assert block_kind(sample) == "output", sample.where
    wanted = [dialogue_shape(x) for x in sample.text.splitlines() if x.strip() != "..."]
    shown = [dialogue_shape(x) for x in appliance.wait_log("status=CLEAN").splitlines()]
    position = 0
    for shape in wanted:
        assert shape in shown[position:], (shape, shown)
        position = shown.index(shape, position) + 1


def dialogue_shape(line: str) -> str:
    """A -d 4 log line without what varies: ids, addresses, host names, texts."""
    line = re.sub(r"^clamsmtpd: ", "", line.strip())
    prefix = "ID: " if re.match(r"^[0-9A-F]{6}: ", line) else ""
    line = line[len(prefix) + 4 if prefix else 0:]
    if match := re.match(r"SERVER > \d{3}[- ]|CLIENT < [A-Za-z]+", line):
        return prefix + match[0].upper()
    if status := re.search(r"status=\w+", line):
        return f"{prefix}from=..., {status[0]}"
    return prefix + re.sub(r"(:| on) .*", r"\1", line)


def test_mail_log_grep_matches_the_sample_lines(tmp_path):
    """postfix.md: the grep of the mail log, on the sample log lines shown under it."""
    for command in documented("test_mail_log_grep_matches_the_sample_lines"):
        lines = command.block.text.splitlines()
        start = command.line - command.block.line
        sample = [x[2:] for x in lines[start + 1:] if x.startswith("# ")]
        assert sample, command
        log = tmp_path / "mail.log"
        log.write_text("postfix/qmgr[2200]: unrelated line\n" + "\n".join(sample) + "\n")
        result = ok(sh(command.text.replace("/var/log/mail.log", str(log))))
        assert result.stdout.splitlines() == sample


_metrics = {}


def _metrics_listen(_hop) -> str:
    _metrics["port"] = free_port()
    return f"127.0.0.1:{_metrics['port']}"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is missing")
@pytest.mark.appliance_config(MetricsListen=_metrics_listen)
def test_metrics_curl_command(appliance):
    for command in documented("test_metrics_curl_command"):
        words = [w.replace(":9330/", f":{_metrics['port']}/") for w in command.words]
        result = ok(run(words))
        assert "clamsmtpd_connections_total" in result.stdout


@needs_root
@needs_clamsmtp_user
def test_virus_action_example_is_safe_with_hostile_values():
    """security.md: the example VirusAction script, run as its "Test it by hand" line says,
    with the script in a temporary place and a logger that records instead of syslog."""
    block = script_block("sh", "clamsmtp-virus-action")
    ok(run(["sh", "-n"], input=block.text))
    work = Path(tempfile.mkdtemp(prefix="clamsmtp-docs-"))
    try:
        work.chmod(0o755)
        script, fakebin, logged, drop = (work / "clamsmtp-virus-action", work / "bin",
                                         work / "logged", work / "drop")
        script.write_text(block.text)
        script.chmod(0o755)
        fakebin.mkdir(mode=0o755)
        (fakebin / "logger").write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {logged}\n')
        (fakebin / "logger").chmod(0o755)
        logged.touch(mode=0o666)
        logged.chmod(0o666)
        drop.mkdir()
        drop.chmod(0o777)  # the clamsmtp user could create /tmp/pwned here, if it were unsafe
        for command in documented("test_virus_action_example_is_safe_with_hostile_values"):
            text = (command.text.replace("/usr/local/sbin/clamsmtp-virus-action", str(script))
                    .replace("/tmp/pwned", str(drop / "pwned"))
                    .replace("PATH=/usr/bin:/bin", f"PATH={fakebin}:/usr/bin:/bin"))
            result = sh(text)
            assert result.returncode != 0 and "No such file" in result.stderr, result
            assert not (drop / "pwned").exists()
            record = logged.read_text()
            assert "-p mail.notice -t clamsmtp-virus --" in record, record
            assert "virus=Eicar-Test client=127.0.0.1" in record
            assert "sender=$(touch" in record and "`id`" in record  # kept as text, never run
    finally:
        shutil.rmtree(work)


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


@pytest.mark.skipif(_tool("ss") is None, reason="ss is missing (Debian package iproute2)")
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
    assert (1, 4, 6) <= version < (1, 5, 0), version  # security.md: pinned to >=1.4.6,<1.5
    assert '"aiosmtpd>=1.4.6,<1.5"' in (REPO / "pyproject.toml").read_text()


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


# -- the labs and the benchmark --------------------------------------------------------------


class Lines:
    """A process's output, read by a thread, waited for line by line."""

    def __init__(self, stream) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while not any(text in x for x in self.seen):
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                raise AssertionError(f"{text!r} not in the output:\n" + "\n".join(self.seen))
            self.seen.append(line)
        return "\n".join(self.seen)


@pytest.mark.skipif(_tool("clamd") is None or SWAKS is None,
                    reason="needs clamd and swaks (scripts/setup installs them)")
def test_lab_stays_up_and_the_swaks_commands_it_prints_work(tmp_path):
    """README.md: `scripts/lab` stays up and prints two swaks commands, one clean, one with the
    EICAR file; each message the next hop receives is shown. (On free ports, not 10026/10025.)"""
    (command,) = documented("test_lab_stays_up_and_the_swaks_commands_it_prints_work")
    listen, next_hop = free_port(), free_port()
    proc = subprocess.Popen(
        [*entry_argv(command.words), "--listen-port", str(listen), "--next-hop-port",
         str(next_hop), "--workdir", str(tmp_path / "lab")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        output = Lines(proc.stdout)
        text = output.wait_for("Stop with Ctrl-C")
        tries = [x.strip() for x in text.splitlines() if x.strip().startswith("swaks ")]
        assert len(tries) == 2 and "--attach" in tries[1], text
        sent = [sh(attempt) for attempt in tries]
        for result in sent:
            assert result.returncode == 0, result.stdout + result.stderr
        assert "<-  250 Virus Detected; Discarded Email" in sent[1].stdout  # Action: drop
        text = output.wait_for("X-Virus-Scanned=yes")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        text = output.wait_for("lab: stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    received = [x for x in text.splitlines() if "next hop received:" in x]
    assert len(received) == 1 and "from=<alice@example.com>" in received[0], text


def _netlab_problem() -> str | None:
    if not IS_ROOT:
        return "needs root"
    if shutil.which("unshare") is None:
        return "needs unshare (util-linux)"
    from appliance.lab import netlab

    problem = netlab.requirements()
    return problem[1] if problem else None


@needs_root
def test_netlab_cleanup_removes_only_leftover_namespaces():
    """`scripts/netlab --cleanup`, in a private mount namespace with its own /run/netns: a
    leftover of a netlab whose process is gone is removed, one of a live process kept."""
    problem = _netlab_problem()
    if problem:
        pytest.skip(f"netlab cannot run here: {problem}")
    (command,) = documented("test_netlab_cleanup_removes_only_leftover_namespaces")
    dead = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    gone, live = f"nlc-{dead}-a1b2c3", f"nlg-{os.getpid()}-d4e5f6"
    argv = " ".join(shlex.quote(a) for a in entry_argv(command.words))
    Path("/run/netns").mkdir(parents=True, exist_ok=True)
    result = ok(run(["unshare", "--mount", "--propagation", "private", "bash", "-c",
                     f"set -e; mount -t tmpfs docs-netns /run/netns; ip netns add {gone}; "
                     f"ip netns add {live}; {argv}; echo LEFT; ip netns list"]))
    left = result.stdout.split("LEFT", 1)[1].split()
    assert live in left and gone not in left, result.stdout
    assert f"removed namespace {gone}" in result.stdout + result.stderr


BENCH_TOOLS = ("smtp-source", "smtp-sink", "clamd")


@needs_root
@pytest.mark.skipif(not all(_tool(t) for t in BENCH_TOOLS),
                    reason="needs smtp-source, smtp-sink (postfix) and clamd")
def test_the_small_benchmark_and_its_profile_run(tmp_path):
    """performance.md: the few-seconds run, and the same run under py-spy."""
    commands = documented("test_the_small_benchmark_and_its_profile_run")
    plain = next(c for c in commands if c.words[0] == "scripts/bench")
    profiled = next(c for c in commands if c.words[0].endswith("py-spy"))
    inner = profiled.words[profiled.words.index("--") + 1:]
    assert inner[1:4] == ["-m", "appliance.lab.bench", *plain.words[1:2]]
    assert inner[3:] == plain.words[1:], "the profile is of another load than the example"
    # the example run itself is the one profiled: run under py-spy, or alone if it cannot trace
    svg = tmp_path / "ours.svg"
    words = [str(svg) if w == "ours.svg" else w for w in profiled.words]
    words[words.index("--") + 1] = sys.executable
    result = run(entry_argv(words), timeout=120)
    if result.returncode != 0 and re.search(r"ptrace|[Pp]ermission denied", result.stderr):
        result = run(entry_argv(plain.words), timeout=120)
    else:
        assert svg.read_text().lstrip().startswith("<?xml"), result.stderr
    ok(result)
    assert "every message of every run accepted" in result.stdout, result.stdout


# -- firewall commands, in throwaway network namespaces --------------------------------------


def _netns_problem() -> str | None:
    if not IS_ROOT:
        return "needs root"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "needs ip (iproute2) and unshare (util-linux)"
    probe = f"docs-{os.getpid()}-{secrets.token_hex(3)}"
    result = run(["ip", "netns", "add", probe])
    if result.returncode != 0:
        return f"ip netns add does not work here: {result.stderr.strip()}"
    run(["ip", "netns", "del", probe])
    return None


def ip(*args: str) -> None:
    ok(run(["ip", *args]))


class Namespace:
    """A network namespace with a LAN side (`lan`, no default route) and a WAN side (`wan0`,
    the default routes), both ends of one veth pair."""

    def __init__(self, lan: str) -> None:
        self.name = f"docs-{os.getpid()}-{secrets.token_hex(3)}"
        ip("netns", "add", self.name)
        try:
            ip("-n", self.name, "link", "set", "lo", "up")
            ip("-n", self.name, "link", "add", lan, "type", "veth", "peer", "name", "wan0")
            for dev, v4, v6 in ((lan, "192.0.2.1/24", "2001:db8:1::1/64"),
                                ("wan0", "198.51.100.1/24", "2001:db8:2::1/64")):
                ip("-n", self.name, "addr", "add", v4, "dev", dev)
                ip("-n", self.name, "addr", "add", v6, "dev", dev, "nodad")
                ip("-n", self.name, "link", "set", dev, "up")
            ip("-n", self.name, "-4", "route", "add", "default", "via", "198.51.100.254")
            ip("-n", self.name, "-6", "route", "add", "default", "via", "2001:db8:2::254")
        except BaseException:
            self.delete()
            raise

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "NETSETUP_FAIL_AFTER"}
        return run(["ip", "netns", "exec", self.name, *argv], env=env, **kwargs)

    def delete(self) -> None:
        run(["ip", "netns", "del", self.name])


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    """A throwaway namespace whose LAN side is `lan0`, as in netsetup.md's examples."""
    problem = _netns_problem()
    if problem:
        pytest.skip(f"network namespaces: {problem}")
    space = Namespace("lan0")
    try:
        yield space
    finally:
        space.delete()


def with_shipped_config(argv: list[str]) -> list[str]:
    """Run `argv` with appliance/data/clamsmtpd.conf (what scripts/install puts in /etc) seen
    at /etc/clamsmtpd.conf, in a private mount namespace: the machine's file is left alone."""
    script = 'if [ -e /etc/clamsmtpd.conf ]; then mount --bind "$0" /etc/clamsmtpd.conf; fi; ' \
             'exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
            str(SHIPPED_CONF), *argv]


def netsetup_args() -> list[str]:
    """$NETSETUP_ARGS as clamsmtp-netsetup.service gets it from the shipped
    /etc/default/clamsmtp-netsetup (EnvironmentFile=, split at spaces)."""
    value = ok(sh(f'. {shlex.quote(str(SHIPPED_DEFAULTS))} && printf %s "$NETSETUP_ARGS"'))
    return value.stdout.split()


def expanded(command: Command) -> list[str]:
    words = []
    for word in command.words:
        words += netsetup_args() if word == "$NETSETUP_ARGS" else [word]
    return words


def _netsetup_groups() -> list[list[Command]]:
    """The commands of one block stay together, in order (a status after its enable); each
    inline command stands alone. The same group twice runs once."""
    groups: dict[tuple[str, ...], list[Command]] = {}
    by_block: dict[Block | None, list[Command]] = {}
    for command in documented("test_netsetup_and_sysctl_commands_in_a_namespace"):
        if command.block is None:
            groups.setdefault((" ".join(expanded(command)),), [command])
        else:
            by_block.setdefault(command.block, []).append(command)
    for commands in by_block.values():
        groups.setdefault(tuple(" ".join(expanded(c)) for c in commands), commands)
    return list(groups.values())


def _run_netsetup_group(commands: list[Command]) -> None:
    space = Namespace("eth1")
    try:
        for command in commands:
            words = expanded(command)
            if words[0] == "sysctl":
                ok(space.run(words))
                key, value = words[-1].split("=")
                assert ok(space.run(["sysctl", "-n", key])).stdout.strip() == value
                continue
            result = space.run(with_shipped_config([str(BIN / words[0]), *words[1:]]))
            assert result.returncode == 0, (str(command), result.stdout, result.stderr)
            assert result.stdout.startswith("backend:"), (str(command), result.stdout)
            if words[1] == "enable":
                assert re.search(r"^enabled: TCP 25 on eth1\b", result.stdout, flags=re.M), (
                    result.stdout)
            if words[1] == "status" and len(commands) > 1:  # right after the enable of its block
                assert re.search(r"\): installed$", result.stdout, flags=re.M), result.stdout
    finally:
        space.delete()


@needs_root
def test_netsetup_and_sysctl_commands_in_a_namespace():
    """The clamsmtp-netsetup and sysctl lines of transparent.md, netsetup.md and install.md, for
    real, on a veth `eth1` of throwaway namespaces (one per block, in parallel);
    /etc/clamsmtpd.conf is the shipped one, and $NETSETUP_ARGS comes from the shipped
    /etc/default/clamsmtp-netsetup, as the unit reads it (so `enable $NETSETUP_ARGS` is
    `enable`, and runs once)."""
    problem = _netns_problem()
    if problem:
        pytest.skip(f"network namespaces: {problem}")
    if importlib.util.find_spec("iptc") is None:
        pytest.skip("python-iptables (the netsetup extra) is not installed")
    if not _user_exists("clamsmtp"):
        pytest.skip("no user clamsmtp for `--local --user clamsmtp`")
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        list(pool.map(_run_netsetup_group, _netsetup_groups()))


def test_iptables_recipe_and_nft_ruleset_in_a_namespace(namespace, tmp_path):
    """netsetup.md: upstream's iptables recipe works as quoted; the nft ruleset it shows is what
    `--backend nft --dry-run` prints for that plan, and applies, lists and deletes as its
    comment says."""
    if _tool("nft") is None or _tool("iptables") is None:
        pytest.skip("needs nft (nftables) and iptables")
    ruleset = script_block("nft", "clamsmtp-netsetup")
    printed = namespace.run([str(BIN / "clamsmtp-netsetup"), "enable", "--backend", "nft",
                             "--dry-run", "--local", "--user", "105",
                             "--exempt-source", "192.0.2.25/32",
                             "-i", "lan0", "--proxy-port", "10025"])
    assert printed.returncode == 0, printed.stderr
    script = printed.stdout[printed.stdout.index("#!/usr/sbin/nft"):]
    script = script[:script.index("\n}\n") + 3]  # the dry run's last line follows it
    assert script.split() == ruleset.text.split(), script
    rules = tmp_path / "clamsmtp.nft"
    rules.write_text(ruleset.text)
    comment = next(x for x in ruleset.text.splitlines() if x.startswith("# apply:"))
    apply, remove = re.fullmatch(r"# apply: (.+?)\s{2,}remove: (.+)", comment).groups()
    commands = documented("test_iptables_recipe_and_nft_ruleset_in_a_namespace")
    nft = [c.normal for c in commands if c.words[0] == "nft"]
    assert apply.startswith(tuple(nft)) and remove.startswith(tuple(nft))
    for _ in range(2):  # re-applying converges
        ok(namespace.run(split_words(apply.replace("FILE", str(rules)))))
    for command in commands:
        if command.normal.startswith("nft list table"):
            listed = ok(namespace.run(command.words)).stdout
            assert listed.count("redirect to :10025") == 2, listed
    ok(namespace.run(split_words(remove)))
    assert "clamsmtp" not in ok(namespace.run(["nft", "list", "tables"])).stdout
    for command in commands:
        if command.words[0] == "iptables":
            ok(namespace.run(command.words))
            shown = ok(namespace.run(["iptables", "-t", "nat", "-S", "PREROUTING"])).stdout
            assert "--dport 25 -j REDIRECT --to-ports 10025" in shown, shown
