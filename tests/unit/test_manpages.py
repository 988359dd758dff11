"""The manual pages of appliance/data/man: they render without a warning, ship in the package,
and document what the code has: every directive of appliance/config.py with its default, every
option of `clamsmtpd --help` and `clamsmtp-netsetup [COMMAND] --help`, every exit status and
signal. The lists come from the code, never from here, so a new directive or option that the
pages lack fails a test.

The pages are read as roff source: `plain()` turns a piece of it into the text a reader sees
(fonts, escapes and layout requests removed), well enough for these checks. Whether groff
renders them is checked with groff itself.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import appliance
from appliance import cli, config
from appliance.actions import VirusEvent
from netsetup import cli as netsetup_cli
from netsetup.daemonconf import DEFAULT_LISTEN_PORT
from netsetup.errors import ExitCode
from netsetup.plan import DEFAULT_PORTS, DEFAULT_USER

REPO = Path(__file__).resolve().parents[2]
MAN_DIR = REPO / "appliance" / "data" / "man"
PAGES = ("clamsmtpd.8", "clamsmtpd.conf.5", "clamsmtp-netsetup.8")
SHIPPED_CONF = REPO / "appliance" / "data" / "clamsmtpd.conf"
GROFF = shutil.which("groff")
needs_groff = pytest.mark.skipif(
    GROFF is None, reason="groff is missing (Debian package groff-base; scripts/setup installs it)"
)


# -- reading roff ---------------------------------------------------------------------------

FONT = re.compile(r"\\f(?:\[\w*\]|\(\w\w|\w)")
#: Escapes these pages use, and what they print; `\e` last, so it makes no new escape.
ESCAPES = {r"\-": "-", r"\(aq": "'", r"\(bu": "*", r"\(lq": '"', r"\(rq": '"', r"\&": "",
           r"\%": "", r"\ ": " ", r"\e": "\\"}
ALTERNATING = {"BR", "RB", "BI", "IB", "IR", "RI"}  # arguments printed without spaces
SPACED = {"B", "I", "SM", "SB"}  # arguments printed with spaces


def roff_args(text: str) -> list[str]:
    return [quoted.replace('""', '"') if quoted or bare == "" else bare
            for quoted, bare in re.findall(r'"((?:[^"]|"")*)"|(\S+)', text)]


def plain(source: str) -> str:
    """The text of a piece of roff, on one line: font macros kept as their text, other
    requests and macros (.TP .PP .RS .nf ...) and comments dropped."""
    words = []
    for line in source.splitlines():
        if line.startswith(".\\\""):
            continue
        if line.startswith("."):
            macro, _, rest = line[1:].partition(" ")
            if macro in ALTERNATING:
                words.append("".join(roff_args(rest)))
            elif macro in SPACED:
                words.append(" ".join(roff_args(rest)))
            continue
        words.append(line)
    text = FONT.sub("", " ".join(words))
    for escape, printed in ESCAPES.items():
        text = text.replace(escape, printed)
    return " ".join(text.split())


def page(name: str) -> str:
    return (MAN_DIR / name).read_text()


def sections(source: str) -> dict[str, str]:
    """`.SH NAME` -> the source up to the next `.SH`."""
    parts = re.split(r"^\.SH (.+)$", source, flags=re.M)
    return {plain(f".B {title}"): body for title, body in zip(parts[1::2], parts[2::2],
                                                              strict=True)}


def tags(source: str) -> list[str]:
    """The plain text of every `.TP` tag (the line after `.TP`) in `source`."""
    return [plain(tag) for tag in re.findall(r"^\.TP(?: \S+)?\n(.+)$", source, flags=re.M)]


def options_in(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", text))


def help_text(*argv: str) -> str:
    result = subprocess.run([sys.executable, "-m", *argv, "--help"], capture_output=True,
                            text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return result.stdout


def help_options(text: str) -> set[str]:
    """The options argparse lists in `text`: lines indented by two, up to the description."""
    found: set[str] = set()
    for line in text.splitlines():
        if re.match(r"^  -", line):
            found |= options_in(line.strip().split("  ")[0])
    return found


def th(name: str) -> list[str]:
    line = next(x for x in page(name).splitlines() if x.startswith(".TH "))
    return roff_args(line[4:])


# -- the pages as files ------------------------------------------------------------------------


def test_the_three_pages_and_nothing_else():
    assert sorted(p.name for p in MAN_DIR.iterdir()) == sorted(PAGES)


def test_the_pages_ship_in_the_package():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = data["tool"]["setuptools"]["package-data"]["appliance"]
    for name in PAGES:
        assert any(fnmatch.fnmatch(f"data/man/{name}", p) for p in patterns), (name, patterns)


@pytest.mark.parametrize("name", PAGES)
def test_title_line_names_the_page_and_no_stale_version(name):
    title, section, *rest = th(name)
    stem, _, suffix = name.rpartition(".")
    assert (plain(title).lower(), section) == (stem, suffix)
    versions = re.findall(r"\d+\.\d+(?:\.\d+)?", " ".join(rest))
    assert all(v == appliance.__version__ for v in versions), (
        f".TH of {name} says {versions}, the package is {appliance.__version__}: leave the "
        "version out of .TH (clamsmtpd -v prints it)")


def test_install_and_uninstall_know_the_pages_and_ours_carry_the_mark():
    """scripts/install and scripts/uninstall list these pages; uninstall removes only a page
    that carries MAN_MARK (in the .TH line), so another package's page is never removed."""
    wanted = [f"man{p.rpartition('.')[2]}/{p}" for p in PAGES]
    for script in ("install", "uninstall"):
        text = (REPO / "scripts" / script).read_text()
        listed = re.search(r"^MAN_PAGES=\((.*)\)$", text, flags=re.M)
        assert listed and listed[1].split() == wanted, script
    mark = re.search(r'^MAN_MARK="(.+)"', (REPO / "scripts" / "uninstall").read_text(), re.M)
    assert mark
    for name in PAGES:
        assert th(name)[3] == mark[1], name


@pytest.mark.parametrize("name", PAGES)
def test_name_line_is_what_mandb_indexes(name):
    """`name \\- what it is`: whatis and apropos read this line."""
    first = sections(page(name))["NAME"].strip().splitlines()[0]
    assert " \\- " in first, first
    assert re.fullmatch(rf"{re.escape(name.rpartition('.')[0])} - \S.+", plain(first)), first


@needs_groff
@pytest.mark.parametrize("name", PAGES)
def test_page_renders_without_warnings(name):
    result = subprocess.run([GROFF, "-man", "-Tutf8", "-ww", "-z", MAN_DIR / name],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr


@needs_groff
def test_the_render_check_sees_a_warning(tmp_path):
    broken = tmp_path / "clamsmtpd.8"
    broken.write_text(page("clamsmtpd.8").replace(".SH OPTIONS", ".SH OPTIONS\n.XX typo"))
    result = subprocess.run([GROFF, "-man", "-Tutf8", "-ww", "-z", broken],
                            capture_output=True, text=True, timeout=60)
    assert "warning" in result.stderr and "XX" in result.stderr, result.stderr


def test_plain_reads_roff_as_it_prints():
    source = '.BR clamsmtpd.conf (5),\n.B "X\\-Virus: a b"\n\\fB/tmp\\fR and \\en\n.TP 4\n'
    assert plain(source) == "clamsmtpd.conf(5), X-Virus: a b /tmp and \\n"


# -- clamsmtpd.conf(5): every directive, with its default ---------------------------------------

DIRECTIVES = [directive.name for directive in config.DIRECTIVES]
DEPRECATED = {directive.name for directive in config.DIRECTIVES if directive.deprecated}
CONF_PAGE = page("clamsmtpd.conf.5")


def defaults() -> dict[str, str]:
    """Directive -> its default, as the page writes it: from the effective configuration of a
    file that sets only OutAddress. An empty or unset value is "none"."""
    effective = config.describe(config.parse_config("OutAddress: 25\n", "defaults.conf"))
    found = {}
    for line in effective.splitlines()[1:]:  # [0]: "# effective configuration of ..."
        commented = line.startswith("#")
        name, _, value = line.lstrip("# ").partition(":")
        value = value.strip()
        if commented:  # "not set (no metrics endpoint)", "off (has no effect)"
            value = "none" if value.startswith("not set") else value.split()[0]
        found[name] = value or "none"
    del found["OutAddress"]  # required: no default
    return found


def entry(name: str) -> str:
    """The plain text of the directive's entry: from `.TP` `.B name` to the next directive's
    entry or section."""
    start = re.search(rf"^\.TP\n\.B {name}\n", CONF_PAGE, flags=re.M)
    assert start, f"clamsmtpd.conf.5 has no entry (.TP, .B {name}) for the directive {name}"
    names = "|".join(map(re.escape, DIRECTIVES))
    end = re.compile(rf"^\.TP\n\.B (?:{names})\n|^\.S[HS] ", flags=re.M).search(
        CONF_PAGE, start.end())
    return plain(CONF_PAGE[start.end():end.start() if end else None])


def test_the_directives_come_from_config_py():
    assert len(DIRECTIVES) >= 20 and "OutAddress" in DIRECTIVES and "DebugFiles" in DIRECTIVES
    assert set(defaults()) <= set(DIRECTIVES)
    assert set(DIRECTIVES) >= DEPRECATED == {"Bounce", "ScanHeader", "DebugFiles"}


@pytest.mark.parametrize("name", DIRECTIVES)
def test_every_directive_has_an_entry_with_its_default(name):
    text = entry(name)
    assert len(text) > 20, text
    default = defaults().get(name)
    if name == "OutAddress":
        assert "[Required, unless TransparentProxy: on]" in text, text
    elif default is not None:
        assert re.search(rf"\[Default: {re.escape(default)}(?=[\s\]])", text), (
            f"the entry of {name} does not say [Default: {default}]: {text}")


def test_deprecated_directives_are_listed_as_such():
    deprecated = CONF_PAGE.split(".SS Deprecated directives", 1)[1].split("\n.SH ", 1)[0]
    assert set(tags(deprecated)) == DEPRECATED


def test_entries_give_the_limits_and_default_ports_of_config_py():
    expected = {
        "MaxConnections": [f"from 1 to {config.MAX_CONNECTIONS}"],
        "TimeOut": [f"from 1 to {config.MAX_SECONDS}"],
        "KeepAlives": [f"to {config.MAX_SECONDS} seconds"],
        "Header": [f"{config.MAX_HEADER_BYTES} bytes"],
        "OutAddress": [f"port {config.OUT_PORT}"],
        "Listen": [f"port {config.LISTEN_PORT}"],
        "ClamAddress": [f"port {config.CLAM_PORT}", f"bare port means {config.CLAM_HOST}"],
        "MetricsListen": [f"port {config.METRICS_PORT}"],
    }
    for name, phrases in expected.items():
        for phrase in phrases:
            assert phrase in entry(name), (name, phrase)
    action = CONF_PAGE.split(".B Action\n", 1)[1].split(".B Quarantine\n", 1)[0]
    assert set(config.Action) <= set(tags(action))


def test_the_file_format_lists_every_boolean_spelling():
    description = plain(sections(CONF_PAGE)["DESCRIPTION"])
    for word in config._TRUE | config._FALSE:
        assert f" {word}," in description or f" {word} " in description, word


def test_the_examples_are_valid_and_the_first_is_the_shipped_file():
    examples = re.findall(r"^\.nf\n(.*?)^\.fi$", sections(CONF_PAGE)["EXAMPLES"],
                          flags=re.M | re.S)
    assert len(examples) >= 2
    for example in examples:
        parsed = config.parse_config(example, "example.conf")
        assert parsed.warnings == (), parsed.warnings
    shipped = [" ".join(x.split()) for x in SHIPPED_CONF.read_text().splitlines()
               if x.strip() and not x.startswith("#")]
    assert examples[0].splitlines() == shipped


# -- clamsmtpd(8) -------------------------------------------------------------------------------

DAEMON_PAGE = page("clamsmtpd.8")


def test_every_option_of_clamsmtpd_help_is_in_options():
    documented = options_in(" ".join(tags(sections(DAEMON_PAGE)["OPTIONS"])))
    assert documented == help_options(help_text("appliance.cli"))


def test_the_refused_legacy_flags_are_named():
    options = plain(sections(DAEMON_PAGE)["OPTIONS"].split(".TP", 1)[0])
    assert set(cli._LEGACY) <= options_in(options), options


def test_every_exit_status_of_clamsmtpd_is_listed():
    codes = re.findall(r"(\d) [a-z]", cli.__doc__.split("Exit codes:", 1)[1])
    assert codes and tags(sections(DAEMON_PAGE)["EXIT STATUS"]) == codes


def test_every_handled_signal_is_listed():
    listed = " ".join(tags(sections(DAEMON_PAGE)["SIGNALS"]))
    for signum in cli._HANDLED_SIGNALS:
        assert re.search(rf"\b{signal.Signals(signum).name}\b", listed), signum


def test_virus_action_lists_every_variable():
    """VirusEvent.environment() with every optional value set: each variable is a tag."""
    event = VirusEvent(sender="s", recipients=("r",), client="c", server="v", virus="x",
                       tmpdir="/t", email="e", remote="r", remote_helo="h", blocked=60)
    every = event.environment(recipients_file="/t/recipients.x")
    assert set(tags(sections(DAEMON_PAGE)["VIRUS ACTIONS"])) == set(every)


def test_the_files_of_the_shipped_configuration_are_listed():
    shipped = config.load_config(str(SHIPPED_CONF))
    wanted = {config.DEFAULT_CONFIG_PATH, shipped.pid_file, shipped.temp_directory}
    assert shipped.pid_file == "/var/run/clamsmtp/clamsmtpd.pid"
    for name in ("clamsmtpd.8", "clamsmtpd.conf.5"):
        assert wanted <= set(tags(sections(page(name))["FILES"])), name


# -- clamsmtp-netsetup(8) ---------------------------------------------------------------------

NETSETUP_PAGE = page("clamsmtp-netsetup.8")


def netsetup_commands() -> list[str]:
    text = help_text("netsetup.cli")
    listed = text.split("COMMAND\n", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"^    (\w+)\s", listed, flags=re.M)


def test_every_netsetup_command_is_in_commands():
    commands = netsetup_commands()
    assert commands == ["enable", "disable", "status"]
    assert tags(sections(NETSETUP_PAGE)["COMMANDS"]) == commands


def test_every_option_of_every_netsetup_command_is_in_options():
    documented = options_in(" ".join(tags(sections(NETSETUP_PAGE)["OPTIONS"])))
    wanted = help_options(help_text("netsetup.cli"))
    for command in netsetup_commands():
        text = help_text("netsetup.cli", command)
        wanted |= help_options(text)
        # --backend {auto,iptables,nft}, --mode {redirect,tproxy}
        for option, choices in re.findall(r"(--[\w-]+) \{([\w,]+)\}", text):
            tag = next(t for t in tags(sections(NETSETUP_PAGE)["OPTIONS"]) if option in t)
            assert set(choices.split(",")) <= set(re.split(r"[\s|]", tag)), tag
    assert documented == wanted


def test_every_netsetup_exit_status_is_listed():
    listed = tags(sections(NETSETUP_PAGE)["EXIT STATUS"])
    assert listed == [str(int(code)) for code in ExitCode] + ["130"]  # 130: cli.main, Ctrl-C


def test_netsetup_files_and_defaults():
    files = tags(sections(NETSETUP_PAGE)["FILES"])
    assert netsetup_cli.DEFAULT_CONFIG_PATH in files
    assert "/etc/default/clamsmtp-netsetup" in files
    options = plain(sections(NETSETUP_PAGE)["OPTIONS"])
    for default in (f"Default: {DEFAULT_PORTS[0]}.", f"Default: {DEFAULT_USER}.",
                    f"or {DEFAULT_LISTEN_PORT} (clamsmtpd's default)",
                    f"Default: {netsetup_cli.DEFAULT_CONFIG_PATH}."):
        assert default in options, default


# -- SEE ALSO ---------------------------------------------------------------------------------

SEE_ALSO = {"clamd(8)", "clamd.conf(5)", "iptables(8)", "nft(8)"}
DAEMON_SEE_ALSO = SEE_ALSO | {"postconf(5)"}


@pytest.mark.parametrize("name", PAGES)
def test_see_also_names_the_other_pages_and_the_neighbours(name):
    listed = {x.strip() for x in plain(sections(page(name))["SEE ALSO"]).split(",")}
    others = {f"{p.rpartition('.')[0]}({p.rpartition('.')[2]})" for p in PAGES if p != name}
    wanted = others | ({"iptables(8)", "nft(8)"} if name == "clamsmtp-netsetup.8"
                       else DAEMON_SEE_ALSO)
    assert wanted <= listed, wanted - listed


# -- SIGHUP: the registry's reload column is what the page and configuration.md say -----------

RESTART = {d.name for d in config.DIRECTIVES if d.reload is config.Reload.RESTART}
PARTLY = {d.name for d in config.DIRECTIVES if d.reload is config.Reload.PARTLY}


@pytest.mark.parametrize("name", [d.name for d in config.DIRECTIVES if d.alias_of is None])
def test_the_page_says_a_restart_exactly_where_reload_needs_one(name):
    says = "needs a restart" in entry(name)
    assert says == (name in RESTART | PARTLY), (name, entry(name))


def test_configuration_md_reload_column_is_the_registrys():
    table = (REPO / "docs" / "configuration.md").read_text().split("## Directives at a glance")[1]
    cells = dict(re.findall(r"^\| \[`(\w+)`\]\([^)]*\) \|.*\| ([^|]+) \|$", table, flags=re.M))
    for directive in config.DIRECTIVES:
        if directive.deprecated:
            continue
        cell = cells[directive.name]
        if directive.reload is config.Reload.RESTART:
            assert cell == "restart", (directive.name, cell)
        elif directive.reload is config.Reload.PARTLY:
            assert cell.startswith("yes (") and "restart" in cell, (directive.name, cell)
        else:
            assert cell.startswith("yes") and "restart" not in cell, (directive.name, cell)


@pytest.mark.parametrize("directive", [d for d in config.DIRECTIVES if d.alias_of is None
                                       and isinstance(d.kind, config._Choice)],
                         ids=lambda d: d.name)
def test_an_entry_names_every_word_its_directive_takes(directive):
    """The words come from the directive's enum (config.py), the page must list them all."""
    words = set(re.findall(r"[a-z]+", entry(directive.name)))
    assert set(directive.kind.kind) <= words, (directive.name, set(directive.kind.kind) - words)
