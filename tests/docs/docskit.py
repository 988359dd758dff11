"""The shared code of tests/docs (not collected: no test_ prefix): the extraction of the
commands and snippets of the docs, the tables, and the helpers its test modules share.

Every command and snippet in docs/*.md and README.md is run, or mapped to the test that runs it.

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
named test of tests/docs), mapped to the test elsewhere that runs it, a synopsis or a mention
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

import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

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


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


needs_clamsmtp_user = pytest.mark.skipif(
    not user_exists("clamsmtp"), reason="no user clamsmtp (Debian package clamsmtp, or "
    "scripts/install, creates it)")


def tool(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin", name), Path("/sbin", name)) if os.access(p, os.X_OK)),
        None)


SWAKS = tool("swaks")


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
    "clamsmtpd", "clamsmtp-netsetup", "swaks", "systemctl", "systemd-analyze",
    "vagrant", "postconf", "postmap", "postfix", "ip", "iptables", "nft", "sysctl", "ss", "curl",
    "find", "install", "runuser", "adduser", "useradd", "groupadd", "journalctl", "apt-get",
    "kill", "git", "grep", "printf", "python", "python3", "smtp-source", "smtp-sink", "man",
})
OPTION_LIKE = re.compile(r"""^[-\[$/.@'"]""")
WORD_LIKE = re.compile(r"^\w[\w.:/@=+|-]*$")
#: Programs whose first argument may be a plain word (a subcommand, a user, a URL...).
WORD_ARGUMENT = frozenset({"clamsmtp-netsetup", "systemctl", "systemd-analyze", "vagrant", "ip",
                           "nft", "postfix", "git", "apt-get", "adduser", "grep", "curl", "man"})
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

#: Run for real by a test of tests/docs: pattern -> that test (it runs every command matching
#: its patterns; see `documented`).
RUN_HERE: dict[str, str] = {
    r"clamsmtpd -v": "test_clamsmtpd_v_prints_the_documented_version",
    r"clamsmtpd --check-config( -f (/etc/clamsmtpd\.conf|FILE))?":
        "test_check_config_of_the_shipped_file",
    r"clamsmtpd -d 4 -f /etc/clamsmtpd\.conf": "test_debug_level_4_shows_the_documented_dialogue",
    r"scripts/lab": "test_lab_stays_up_and_the_swaks_commands_it_prints_work",
    r"scripts/(lab|netlab) --help|(\.venv/bin/)?python -m (appliance|lab)(\.\w+)+( \.\.\.)?":
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
    r"postmap -q .+|install -m 644 appliance/data/mime_header_checks /etc/postfix/\S+":
        "test_mime_header_checks_example",
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
    r"man (clamsmtpd|clamsmtpd\.conf|clamsmtp-netsetup)|man --warnings -l":
        f"{INSTALL_TESTS}::test_install_puts_the_man_pages_where_man_finds_them",
    r"clamsmtpd -f /etc/clamsmtpd\.conf":
        "tests/integration/test_cli.py::test_daemon_mode_detaches_and_writes_a_pid_file",
    r"clamsmtpd -f FILE 2>>\S+":
        "tests/integration/test_cli.py::test_with_no_syslog_it_says_so_once_and_logs_to_stderr",
    r"kill -(HUP|TERM)": f"{INSTALL_TESTS}::test_the_daemon_starts_as_the_unit_starts_it",
    r"scripts/lab --demo":
        "tests/integration/test_labkit.py::test_lab_demo_with_this_projects_daemon",
    r"scripts/netlab --demo":
        "tests/e2e/test_transparent.py::test_netlab_demo_runs_green_and_leaves_nothing_behind",
    r"scripts/netlab --demo --full": "tests/e2e/test_transparent.py::"
        "test_netlab_demo_full_shows_the_clients_own_address_at_the_server",
    r"clamsmtp-netsetup (enable|disable|status)( -i eth1)?( --proxy-port 10025)? --mode tproxy"
    r"( --backend nft)?( --dry-run)?": "tests/netsetup/test_tproxy_faults.py::"
        "test_enable_twice_is_one_enable_and_status_lists_rules_routes_counters",
    r"ip -[46] (rule|route) (add|del) .+":
        "tests/netsetup/test_tproxy_faults.py::"
        "test_a_hand_deleted_object_shows_in_status_and_enable_puts_it_back",
    r"scripts/netlab": "tests/e2e/test_transparent.py::test_netlab_stays_up_until_ctrl_c",
    r"scripts/bench( --quick| --markdown \S+| --json \S+)?|smtp-source -A .+|smtp-sink .+"
    r"|scripts/bench --scenarios \S+ --targets \S+ --sessions \d+ --rounds \d+"
    r"|scripts/bench --scenarios \S+ --targets \S+ --rounds \d+ --no-latency --messages \d+"
    r"|scripts/bench --scenarios \S+ --targets \S+ --rounds [2-9] --no-latency"
    r"|scripts/bench --targets \S+":
        "tests/integration/test_bench.py::"
        "test_a_tiny_benchmark_measures_every_target_and_every_message_is_accepted",
    r"scripts/bench --tls( --quick)?":
        "tests/integration/test_bench.py::test_the_tls_row_measures_both_legs_tls_against_clear",
    r"scripts/bench --wan( --quick)?":
        "tests/integration/test_bench.py::test_the_wan_row_counts_round_trips",
    r"clamsmtp-netsetup (enable|disable|status) --backend nft( --dry-run)?|nft list ruleset":
        "tests/netsetup/test_nft_netns.py::"
        "test_nft_enable_twice_status_and_disable_restores_the_exact_ruleset",
    r"clamsmtp-netsetup disable --backend iptables":
        "tests/netsetup/test_nft_netns.py::test_rules_of_both_backends_refused_shown_and_removed",
    r"nft -f - \(replace table inet clamsmtp-10025, one transaction\)":
        "tests/netsetup/test_nft_netns.py::test_nft_failure_half_way_changes_nothing",
    r"(clamd|mailserver|gateway|client)\.sh .+|clamsmtp-netsetup enable -i IF --proxy-port P":
        "tests/e2e/test_transparent.py::test_provisioning_again_changes_nothing",
    r"scripts/build-deb": "tests/debian/test_deb.py::test_lintian_is_clean",
    r"apt-get install \./dist/clamsmtp_[0-9.]+-[0-9]+_all\.deb":
        "tests/debian/test_deb.py::test_new_install_then_purge_leaves_nothing",
    r"apt-get (remove|purge) clamsmtp": "tests/debian/test_deb.py::"
        "test_upgrade_from_debians_clamsmtp_keeps_the_edited_config_then_remove_and_purge",
}

#: Not complete commands (usage lines, a program named in prose): only checked against the
#: program's --help.
SYNOPSES: dict[str, str] = {
    r"clamsmtpd( \[-[dfp] [A-Z]+\])+|clamsmtpd --check-config( \[-[fp] [A-Z]+\])+":
        "clamsmtpd's usage lines",
    r"clamsmtp-netsetup (enable|disable|status) \[options\] .+"
    r"|clamsmtp-netsetup enable\|disable\|status": "clamsmtp-netsetup's usage lines",
    r"ip netns( exec)?": "named in prose: what runs the labs' namespaces (used by tests/docs)",
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
    r"scripts/test( -q)?": "runs the whole suite, tests/docs included; CI runs it (.ci/run)",
    r"postfix reload": "reloads this machine's Postfix; no Postfix runs here (scripts/setup "
                       "stops it), the snippets are checked with postconf -c instead",
    r"swaks --server 127\.0\.0\.1:25 .+": "needs the whole Postfix path of postfix.md running "
                                          "on port 25; the swaks commands to clamsmtpd run here",
    r"adduser .+": "creates an account or changes group membership on this machine",
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
        if script_key(block) == (interpreter, name):
            return block
    raise AssertionError(f"no {interpreter} script {name} in the docs any more")


def script_key(block: Block) -> tuple[str, str]:
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


# -- running documented commands here --------------------------------------------------------

SCRIPT_ENTRY = {
    "scripts/lab": '"$REPO/.venv/bin/python" -m lab "$@"',
    "scripts/bench": '"$REPO/.venv/bin/python" -m lab.bench "$@"',
    "scripts/netlab": '"$REPO/.venv/bin/python" -m lab.netlab "$@"',
}


def entry_argv(words: list[str]) -> list[str]:
    """What a documented command runs here: the venv's programs instead of the PATH's."""
    program, rest = words[0], words[1:]
    if program == "scripts/lab":
        return [sys.executable, "-m", "lab", *rest]
    if program in ("scripts/bench", "scripts/netlab"):
        return [sys.executable, "-m", f"lab.{program[8:]}", *rest]
    if program in ("python", "python3", ".venv/bin/python"):
        return [sys.executable, *rest]
    if program.startswith(".venv/bin/"):
        return [str(VENV_BIN / program[10:]), *rest]
    if program in ("clamsmtpd", "clamsmtp-netsetup"):
        return [str(BIN / program), *rest]
    return [program, *rest]

