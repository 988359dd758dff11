"""clamsmtpd.conf parsing: the original's syntax and directives, validated with located errors."""

import os
from ipaddress import ip_network
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import appliance
from appliance.addresses import Address
from appliance.config import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_HEADER,
    Config,
    ConfigError,
    Transparency,
    describe,
    load_config,
    parse_config,
    replace,
)

FILE = "test.conf"
FORMS = "PORT, IPv4[:PORT], [IPv6][:PORT], HOST[:PORT] or /unix/socket/path"
DEBIAN_CONF = Path(appliance.__file__).parent / "data" / "clamsmtpd.conf"
DIRECTIVES = [
    "OutAddress", "Listen", "ClamAddress", "Header", "TempDirectory", "Action", "Quarantine",
    "VirusAction", "MaxConnections", "TimeOut", "KeepAlives", "XClient", "TransparentProxy",
    "User", "PidFile", "ScanErrorAction", "RejectMessage", "MaxScanSize", "OversizeAction",
    "SkipNetworks", "SkipAuthenticated", "VirusAllow", "InfectedHostLimit", "InfectedHostBlock",
    "ScanTimeout", "Workers",
]  # fmt: skip


def parse(*lines: str, out: bool = True) -> Config:
    """Parse lines, with an OutAddress first unless ``out`` is False."""
    head = ["OutAddress: 10026"] if out else []
    return parse_config("\n".join([*head, *lines]) + "\n", FILE)


def error(*lines: str, out: bool = True) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(*lines, out=out)
    return info.value


def without_location(config: Config) -> Config:
    return replace(config, path="-", warnings=())


# --- the shipped Debian file and the defaults ---


def test_debian_config_parses_unchanged() -> None:
    config = load_config(str(DEBIAN_CONF))
    assert config == Config(
        path=str(DEBIAN_CONF),
        out_address=Address(host=None, port=10025, port_only=True),
        listen=Address(host="127.0.0.1", port=10026),
        clam_addresses=(Address(path="/var/run/clamav/clamd.ctl"),),
        header="X-Virus-Scanned: ClamAV using ClamSMTP",
        temp_directory="/var/spool/clamsmtp",
        action="drop",
        quarantine=False,
        virus_action=None,
        max_connections=64,
        timeout=180.0,
        keepalives=0,
        xclient=False,
        transparent_proxy=False,
        user="clamsmtp",
        pid_file="/var/run/clamsmtp/clamsmtpd.pid",
        debug_files=False,
        warnings=(),
    )


def test_defaults() -> None:
    config = parse()
    assert config.out_address == Address(port=10026, port_only=True)
    assert config.listen == Address(host="0.0.0.0", port=10025, port_only=True)
    assert str(config.listen) == "0.0.0.0:10025"
    assert config.clam_addresses == (Address(path="/var/run/clamav/clamd"),)
    assert config.header == DEFAULT_HEADER == "X-Virus-Scanned: ClamAV using ClamSMTP"
    assert config.temp_directory == "/tmp"
    assert config.action == "drop"
    assert config.quarantine is False
    assert config.virus_action is None
    assert config.max_connections == 64
    assert config.timeout == 180
    assert config.scan_timeout == 120
    assert config.keepalives == 0
    assert config.xclient is False
    assert config.transparent_proxy is Transparency.OFF
    assert config.user is None
    assert config.pid_file is None
    assert config.debug_files is False
    assert config.warnings == ()
    assert config.path == FILE


def test_default_config_path() -> None:
    assert DEFAULT_CONFIG_PATH == "/etc/clamsmtpd.conf"


# --- every directive ---


@pytest.mark.parametrize(
    ("line", "field", "value"),
    [
        ("OutAddress: 10025", "out_address", Address(port=10025, port_only=True)),
        ("OutAddress: 192.0.2.1", "out_address", Address(host="192.0.2.1", port=25)),
        ("OutAddress: 127.0.0.1:10026", "out_address", Address(host="127.0.0.1", port=10026)),
        ("OutAddress: [2001:db8::1]:2525", "out_address", Address(host="2001:db8::1", port=2525)),
        ("OutAddress: mail.example.org", "out_address", Address(host="mail.example.org", port=25)),
        ("OutAddress: /run/smtp.sock", "out_address", Address(path="/run/smtp.sock")),
        ("Listen: 10026", "listen", Address(host="0.0.0.0", port=10026, port_only=True)),
        ("Listen: 127.0.0.1", "listen", Address(host="127.0.0.1", port=10025)),
        ("Listen: [::]:10025", "listen", Address(host="::", port=10025)),
        ("Listen: /run/clamsmtpd.sock", "listen", Address(path="/run/clamsmtpd.sock")),
        ("ClamAddress: 3310", "clam_addresses",
         (Address(host="127.0.0.1", port=3310, port_only=True),)),
        ("ClamAddress: 127.0.0.1", "clam_addresses", (Address(host="127.0.0.1", port=3310),)),
        ("ClamAddress: clamd.lan:3311", "clam_addresses", (Address(host="clamd.lan", port=3311),)),
        ("ClamAddress: /run/clamd.ctl", "clam_addresses", (Address(path="/run/clamd.ctl"),)),
        ("ClamAddress: 10.0.0.1, 10.0.0.2:3311", "clam_addresses",
         (Address(host="10.0.0.1", port=3310), Address(host="10.0.0.2", port=3311))),
        ("ClamAddress: /run/a.ctl [2001:db8::3]  clamd.lan,,3312", "clam_addresses",
         (Address(path="/run/a.ctl"), Address(host="2001:db8::3", port=3310),
          Address(host="clamd.lan", port=3310),
          Address(host="127.0.0.1", port=3312, port_only=True))),
        ("ScanTimeout: 30", "scan_timeout", 30.0),
        ("Workers: 4", "workers", 4),
        ("Workers: AUTO", "workers", 0),
        ("Header: X-AV: checked by %l", "header", "X-AV: checked by %l"),
        ("Header:", "header", ""),
        ("Header: X-A: 1\\r\\n\\tfolded", "header", "X-A: 1\r\n\tfolded"),
        ("Header: X-A: a\\nX-B: b", "header", "X-A: a\nX-B: b"),
        ("Header: X-A: \\\\ \\: \\q", "header", "X-A: \\ : q"),
        ("Header: X-A: end\\", "header", "X-A: end\\"),
        ("TempDirectory: /var/spool/clamsmtp", "temp_directory", "/var/spool/clamsmtp"),
        ("Action: drop", "action", "drop"),
        ("Action: bounce", "action", "bounce"),
        ("Action: pass", "action", "pass"),
        ("Action: PASS", "action", "pass"),
        ("Action: Bounce", "action", "bounce"),
        ("Quarantine: on", "quarantine", True),
        ("VirusAction: /bin/virus.sh --notify", "virus_action", "/bin/virus.sh --notify"),
        ("VirusAction:", "virus_action", None),
        ("MaxConnections: 1", "max_connections", 1),
        ("MaxConnections: 10240", "max_connections", 10240),
        ("TimeOut: 1", "timeout", 1.0),
        ("TimeOut: 600", "timeout", 600.0),
        ("KeepAlives: 0", "keepalives", 0),
        ("KeepAlives: 30", "keepalives", 30),
        ("XClient: on", "xclient", True),
        ("XClient: off", "xclient", False),
        ("User: clamsmtp", "user", "clamsmtp"),
        ("User: 108", "user", "108"),
        ("PidFile: /run/clamsmtpd.pid", "pid_file", "/run/clamsmtpd.pid"),
        ("PidFile:", "pid_file", None),
        ("ScanErrorAction: defer", "scan_error_action", "defer"),
        ("ScanErrorAction: Pass", "scan_error_action", "pass"),
        ("RejectMessage: 550 5.7.1 Virus found: %v", "reject_message",
         "550 5.7.1 Virus found: %v"),
        ("RejectMessage: 554 No", "reject_message", "554 No"),
        ("MaxScanSize: 25M", "max_scan_size", 25 << 20),
        ("MaxScanSize: 25 MB", "max_scan_size", 25 << 20),
        ("MaxScanSize: 512k", "max_scan_size", 512 << 10),
        ("MaxScanSize: 1000", "max_scan_size", 1000),
        ("MaxScanSize: 4G", "max_scan_size", 4 << 30),
        ("MaxScanSize:", "max_scan_size", None),
        ("OversizeAction: pass", "oversize_action", "pass"),
        ("OversizeAction: Reject", "oversize_action", "reject"),
        ("OversizeAction: defer", "oversize_action", "defer"),
        ("SkipNetworks: 192.0.2.0/24, 2001:db8::/32 198.51.100.7", "skip_networks",
         (ip_network("192.0.2.0/24"), ip_network("2001:db8::/32"), ip_network("198.51.100.7/32"))),
        ("SkipNetworks: ::ffff:203.0.113.0/120", "skip_networks", (ip_network("203.0.113.0/24"),)),
        ("SkipNetworks: 192.0.2.1 192.0.2.1/32", "skip_networks", (ip_network("192.0.2.1/32"),)),
        ("SkipNetworks:", "skip_networks", ()),
        ("SkipAuthenticated: on", "skip_authenticated", True),
        ("VirusAllow: PUA.* Heuristics.Encrypted.*, Win.Test.EICAR_HDB-1", "virus_allow",
         ("PUA.*", "Heuristics.Encrypted.*", "Win.Test.EICAR_HDB-1")),
        ("VirusAllow:", "virus_allow", ()),
        ("InfectedHostLimit: 3 600", "infected_host_limit", (3, 600)),
        ("InfectedHostLimit:", "infected_host_limit", None),
        ("InfectedHostBlock: 60", "infected_host_block", 60),
    ],
)
def test_directive(line: str, field: str, value: object) -> None:
    config = parse(line)
    assert getattr(config, field) == value
    assert config.warnings == ()


def test_timeout_is_a_float() -> None:
    assert isinstance(parse("TimeOut: 5").timeout, float)


@pytest.mark.parametrize("word", ["1", "yes", "true", "t", "on", "ON", "Yes", "TRUE", "T"])
def test_true_spellings(word: str) -> None:
    assert parse(f"Quarantine: {word}").quarantine is True


@pytest.mark.parametrize("word", ["0", "no", "false", "f", "off", "OFF", "No", "FALSE", "F"])
def test_false_spellings(word: str) -> None:
    assert parse("Quarantine: on", f"Quarantine: {word}").quarantine is False


def test_transparent_proxy_needs_no_out_address() -> None:
    config = parse("TransparentProxy: on", out=False)
    assert config.transparent_proxy is Transparency.ON
    assert config.out_address is None
    assert config.warnings == ()


@pytest.mark.parametrize("word", ["full", "Full", "FULL"])
def test_transparent_proxy_full(word: str) -> None:
    config = parse(f"TransparentProxy: {word}", out=False)
    assert config.transparent_proxy is Transparency.FULL
    assert config.transparent_proxy  # a transparent mode: the destination is the original one
    assert "TransparentProxy: full\n" in describe(config)
    assert parse_config(describe(config), FILE) == replace(config, path=FILE)


def test_transparent_proxy_off_is_false() -> None:
    assert not parse().transparent_proxy
    assert Config(path=FILE, out_address=None, transparent_proxy=True).transparent_proxy \
        is Transparency.ON


def test_out_address_ignored_with_transparent_proxy() -> None:
    config = parse_config("OutAddress: 10026\nTransparentProxy: yes\n", FILE)
    assert config.out_address is None
    assert config.warnings == (f"{FILE}:1: OutAddress: ignored because TransparentProxy is on",)


# --- syntax ---


def test_names_are_case_insensitive() -> None:
    config = parse_config("outaddress: 25\nACTION: bounce\nlisten: 2525\ntImEoUt: 5\n", FILE)
    assert config.action == "bounce"
    assert config.listen.port == 2525
    assert config.timeout == 5


def test_whitespace_comments_and_line_endings() -> None:
    text = (
        "\ufeff# a comment\r\n"
        "   \t  \r\n"
        "   # an indented comment\n"
        "\t OutAddress \t:\t 10026 \t\r\n"
        "Listen:127.0.0.1:2525\n"
        "Header :  X-A: b  \n"
    )
    config = parse_config(text, FILE)
    assert config.out_address == Address(port=10026, port_only=True)
    assert config.listen == Address(host="127.0.0.1", port=2525)
    assert config.header == "X-A: b"


def test_value_split_at_first_colon() -> None:
    assert parse("Header: X-A: b: c").header == "X-A: b: c"
    assert parse("VirusAction: echo a:b").virus_action == "echo a:b"


def test_last_directive_wins() -> None:
    config = parse("Action: bounce", "Action: pass", "Listen: 1", "Listen: 2")
    assert config.action == "pass"
    assert config.listen.port == 2
    assert parse("Header: X-A: 1", "Header:").header == ""


# --- deprecated directives ---


def test_bounce_on_sets_action_with_warning() -> None:
    config = parse("Bounce: on")
    assert config.action == "bounce"
    assert config.warnings == (f'{FILE}:2: Bounce: please use "Action" option instead of "Bounce"',)


def test_bounce_off_changes_nothing() -> None:
    assert parse("Action: pass", "Bounce: off").action == "pass"
    assert parse("Bounce: off").action == "drop"
    assert len(parse("Bounce: off").warnings) == 1


def test_bounce_is_order_dependent_as_the_original() -> None:
    assert parse("Action: pass", "Bounce: on").action == "bounce"
    assert parse("Bounce: on", "Action: pass").action == "pass"


def test_scan_header_is_an_alias_of_header() -> None:
    config = parse("ScanHeader: X-Old: %i\\tyes")
    assert config.header == "X-Old: %i\tyes"
    assert config.warnings == (
        f'{FILE}:2: ScanHeader: please use "Header" option instead of "ScanHeader"',
    )


def test_debug_files_is_accepted_with_a_warning() -> None:
    config = parse("DebugFiles: on")
    assert config.debug_files is True
    assert config.warnings == (f"{FILE}:2: DebugFiles: this option has no effect (deprecated)",)


# --- header warnings ---


def test_unknown_header_symbol_is_a_warning() -> None:
    config = parse("Header: X-A: %i %x")
    assert config.header == "X-A: %i %x"
    assert config.warnings == (f"{FILE}:2: Header: invalid header symbol: %x",)


def test_header_not_looking_like_a_header_is_a_warning() -> None:
    config = parse("Header: ClamAV was here")
    assert config.warnings == (f"{FILE}:2: Header: header line 1 is not of the form 'Name: value'",)


def test_header_length_limit_is_1024_bytes() -> None:
    exact = "X-A: " + "é" * ((1024 - 5) // 2) + "a"
    assert len(exact.encode()) == 1024
    assert parse(f"Header: {exact}").header == exact
    err = error(f"Header: {exact}b")
    assert str(err) == f"{FILE}:2: Header: header too long (1025 bytes, at most 1024)"


# --- errors: exact location prefix and what is accepted ---


@pytest.mark.parametrize(
    ("lines", "line", "directive", "reason"),
    [
        (["OutAddress 25"], 2, "OutAddress", "invalid config line (expected 'OutAddress: value')"),
        (["hi there"], 2, None, "invalid config line 'hi there' (expected 'Directive: value')"),
        ([": value"], 2, None, "invalid config line ': value' (no directive name before ':')"),
        (["Actoin: drop"], 2, "Actoin", "unknown directive (did you mean 'Action'?)"),
        (["Frobnicate: yes"], 2, "Frobnicate", "unknown directive (expected one of Action, "),
        (["Action: foo"], 2, "Action", "invalid value 'foo' (expected drop, bounce or pass)"),
        (["Action:"], 2, "Action", "invalid value '' (expected drop, bounce or pass)"),
        (["Quarantine: maybe"], 2, "Quarantine", "invalid value 'maybe' (expected on or off"),
        (["XClient: 2"], 2, "XClient", "invalid value '2' (expected on or off"),
        (["TransparentProxy: y"], 2, "TransparentProxy", "invalid value 'y'"),
        (["TransparentProxy: fully"], 2, "TransparentProxy",
         "invalid value 'fully' (expected on, off or full)"),
        (["Bounce: sometimes"], 2, "Bounce", "invalid value 'sometimes'"),
        (["DebugFiles: ?"], 2, "DebugFiles", "invalid value '?'"),
        (
            ["MaxConnections: 0"],
            2,
            "MaxConnections",
            "invalid value '0' (expected a whole number of connections from 1 to 10240)",
        ),
        (["MaxConnections: 10241"], 2, "MaxConnections", "invalid value '10241'"),
        (["MaxConnections: lots"], 2, "MaxConnections", "invalid value 'lots'"),
        (["MaxConnections: -5"], 2, "MaxConnections", "invalid value '-5'"),
        (
            ["TimeOut: 0"],
            2,
            "TimeOut",
            "invalid value '0' (expected a whole number of seconds from 1 to 86400)",
        ),
        (["TimeOut: 1.5"], 2, "TimeOut", "invalid value '1.5'"),
        (["TimeOut: 99999999999999999999"], 2, "TimeOut", "invalid value '99999999999999999999'"),
        (["TimeOut: ３"], 2, "TimeOut", "invalid value '３'"),
        (
            ["KeepAlives: -1"],
            2,
            "KeepAlives",
            "invalid value '-1' (expected a whole number of seconds from 0 to 86400)",
        ),
        (["TempDirectory:"], 2, "TempDirectory", "empty value (expected a directory path)"),
        (["User:"], 2, "User", "empty value (expected a user name or a numeric uid)"),
        (
            ["User: clam smtp"],
            2,
            "User",
            "invalid value 'clam smtp' (expected a user name or a numeric uid)",
        ),
        (["Listen:"], 2, "Listen", f"empty value (expected {FORMS})"),
        (
            ["Listen: 1.2.3.4:99999"],
            2,
            "Listen",
            "invalid address '1.2.3.4:99999': port 99999 out of range (expected 1-65535)",
        ),
        (
            ["ClamAddress: [::1"],
            2,
            "ClamAddress",
            f"invalid address '[::1': missing ']' after IPv6 address (expected {FORMS})",
        ),
        (["ClamAddress: 0"], 2, "ClamAddress", "port 0 out of range"),
        (["ClamAddress: 10.0.0.1, [::1"], 2, "ClamAddress", "invalid address '[::1': missing"),
        (["ClamAddress: 10.0.0.1 10.0.0.1:3310"], 2, "ClamAddress",
         "'10.0.0.1:3310' is listed twice"),
        (["ClamAddress: 3310, 127.0.0.1"], 2, "ClamAddress", "'127.0.0.1' is listed twice"),
        (["ClamAddress: ,"], 2, "ClamAddress", "empty value (expected one or more of"),
        ([f"ClamAddress: {' '.join(str(p) for p in range(3000, 3033))}"], 2, "ClamAddress",
         "33 addresses (at most 32)"),
        (["Workers: 0"], 2, "Workers",
         "invalid value '0' (expected auto, or a whole number of processes from 1 to 64)"),
        (["Workers: many"], 2, "Workers", "invalid value 'many' (expected auto, or a whole"),
        (["Workers: 65"], 2, "Workers", "invalid value '65'"),
        (["ScanTimeout: 0"], 2, "ScanTimeout",
         "invalid value '0' (expected a whole number of seconds from 1 to 86400)"),
        (["Listen: host name"], 2, "Listen", "invalid host name 'host name' (expected letters"),
        (["OutAddress: garbage!"], 2, "OutAddress", "invalid host name 'garbage!'"),
        (["VirusAction: a\0b"], 2, "VirusAction", "value contains a NUL character"),
        (["# fine", "", "Action: pass", "TimeOut: never"], 5, "TimeOut", "invalid value 'never'"),
        (["ScanErrorAction: drop"], 2, "ScanErrorAction",
         "invalid value 'drop' (expected defer or pass)"),
        (["ScanErrorAction:"], 2, "ScanErrorAction", "invalid value '' (expected defer or pass)"),
        (["RejectMessage: 451 try later"], 2, "RejectMessage",
         "'451 try later' is not a permanent SMTP reply (expected a 5xx code, a space and a text"),
        (["RejectMessage: 250 ok"], 2, "RejectMessage", "'250 ok' is not a permanent SMTP reply"),
        (["RejectMessage: Virus found"], 2, "RejectMessage",
         "'Virus found' is not a permanent SMTP reply"),
        (["RejectMessage: 550"], 2, "RejectMessage", "'550' is not a permanent SMTP reply"),
        (["RejectMessage:"], 2, "RejectMessage", "empty value (expected a 5xx code, a space"),
        (["RejectMessage: 550 Virus \u00e9"], 2, "RejectMessage", "only printable ASCII"),
        (["RejectMessage: 550 a\tb"], 2, "RejectMessage", "only printable ASCII"),
        (["RejectMessage: 550 " + "x" * 400], 2, "RejectMessage", "too long (404 characters"),
        (["MaxScanSize: 25 megs"], 2, "MaxScanSize",
         "invalid size '25 megs' (expected a number of bytes, optionally with K, M or G"),
        (["MaxScanSize: 1.5M"], 2, "MaxScanSize", "invalid size '1.5M'"),
        (["MaxScanSize: -1"], 2, "MaxScanSize", "invalid size '-1'"),
        (["MaxScanSize: 0"], 2, "MaxScanSize", "size '0' out of range (expected 1 to 4G)"),
        (["MaxScanSize: 5G"], 2, "MaxScanSize", "size '5G' out of range"),
        (["SkipNetworks: 192.0.2.1/24"], 2, "SkipNetworks",
         "'192.0.2.1/24' has host bits set (did you mean 192.0.2.0/24?)"),
        (["SkipNetworks: 192.0.2.0/24 mynet"], 2, "SkipNetworks",
         "invalid network 'mynet' (expected addresses or CIDR networks"),
        (["SkipNetworks: 192.0.2.0/33"], 2, "SkipNetworks", "invalid network '192.0.2.0/33'"),
        (["VirusAllow: PUA.* *"], 2, "VirusAllow",
         "pattern '*' matches every virus (use Action: pass to deliver them all)"),
        (["VirusAllow: Über.*"], 2, "VirusAllow", "invalid pattern 'Über.*' (expected a virus"),
        (["InfectedHostLimit: 3"], 2, "InfectedHostLimit",
         "invalid value '3' (expected COUNT SECONDS: 1 to 1000 infected messages within 1 to "
         "86400 seconds, e.g. 3 600)"),
        (["InfectedHostLimit: 0 600"], 2, "InfectedHostLimit", "value '0 600' out of range"),
        (["InfectedHostLimit: 3 100000"], 2, "InfectedHostLimit", "value '3 100000' out of"),
        (["InfectedHostBlock: 0"], 2, "InfectedHostBlock",
         "invalid value '0' (expected a whole number of seconds from 1 to 604800)"),
        (["SkipAuthenticated: sometimes"], 2, "SkipAuthenticated", "invalid value 'sometimes'"),
        (["OversizeAction: drop"], 2, "OversizeAction",
         "invalid value 'drop' (expected pass, defer or reject)"),
    ],
)
def test_errors_are_located(lines: list, line: int, directive: str | None, reason: str) -> None:
    err = error(*lines)
    assert (err.file, err.line, err.directive) == (FILE, line, directive)
    assert err.reason.startswith(reason)
    prefix = f"{FILE}:{line}: {directive}: " if directive else f"{FILE}:{line}: "
    assert str(err) == prefix + err.reason


def test_missing_out_address_is_a_whole_file_error() -> None:
    err = error("Listen: 10025", out=False)
    assert (err.line, err.directive) == (0, "OutAddress")
    assert str(err).startswith(f"{FILE}:0: OutAddress: no OutAddress specified")
    assert "TransparentProxy" in err.reason


def test_empty_file_needs_out_address() -> None:
    with pytest.raises(ConfigError, match="no OutAddress specified"):
        parse_config("", FILE)


def test_transparent_proxy_off_again_needs_out_address() -> None:
    err = error("TransparentProxy: on", "TransparentProxy: off", out=False)
    assert err.directive == "OutAddress"


def test_config_error_with_and_without_directive() -> None:
    assert str(ConfigError("f", 3, "Action", "bad")) == "f:3: Action: bad"
    assert str(ConfigError("f", 0, None, "bad")) == "f:0: bad"
    assert ConfigError("f", 0, None, "bad").args == ("f", 0, None, "bad")


def test_error_messages_show_control_characters_escaped() -> None:
    err = error("Action: dr\x1bop")
    assert "dr\\x1bop" in str(err)
    assert "\x1b" not in str(err)


# --- load_config ---


def test_load_config_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "clamsmtpd.conf"
    path.write_text("OutAddress: 10026\nAction: bounce\n")
    config = load_config(str(path))
    assert config.path == str(path)
    assert config.action == "bounce"


def test_load_config_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.conf")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.line, info.value.directive) == (0, None)
    assert str(info.value) == f"{path}:0: cannot read configuration file: No such file or directory"


def test_load_config_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration file: Is a directory"):
        load_config(str(tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_load_config_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "secret.conf"
    path.write_text("OutAddress: 25\n")
    path.chmod(0)
    with pytest.raises(ConfigError, match="cannot read configuration file: Permission denied"):
        load_config(str(path))


def test_load_config_non_utf8_path_kept_and_reported(tmp_path: Path) -> None:
    path = tmp_path / "latin1.conf"
    path.write_bytes(b"OutAddress: 25\n# caf\xe9\nTempDirectory: /var/spool/caf\xe9\n")
    config = load_config(str(path))
    assert os.fsencode(config.temp_directory) == b"/var/spool/caf\xe9"
    assert config.warnings == (f"{path}:2: not valid UTF-8; undecodable bytes are kept as is",)


def test_load_config_non_utf8_value_error_does_not_crash(tmp_path: Path) -> None:
    path = tmp_path / "latin1.conf"
    path.write_bytes(b"OutAddress: 25\nAction: dr\xf6p\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value).startswith(f"{path}:2: Action: invalid value 'dr\\xf6p'")
    str(info.value).encode("utf-8")  # printable anywhere


def test_load_config_non_utf8_header_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.conf"
    path.write_bytes(b"OutAddress: 25\nHeader: X-Gepr\xfcft: ja\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == f"{path}:2: Header: value is not valid UTF-8 (save the file as UTF-8)"


# --- describe, replace, validation ---

FULL = """\
OutAddress: [2001:db8::25]:2525
Listen: 127.0.0.1:10026
ClamAddress: 127.0.0.1
Header: X-Scanned: %i at %d\\r\\n\\tby %l \\\\o/
TempDirectory: /var/spool/clamsmtp
Action: pass
Quarantine: yes
VirusAction: /usr/local/bin/virus.sh
MaxConnections: 200
Workers: 3
TimeOut: 30
ScanTimeout: 20
KeepAlives: 10
XClient: on
TransparentProxy: off
User: clamsmtp
PidFile: /run/clamsmtpd.pid
DebugFiles: on
ScanErrorAction: pass
RejectMessage: 550 5.7.1 Virus found: %v (see https://example.org/av)
MaxScanSize: 1536K
OversizeAction: reject
SkipNetworks: 192.0.2.0/24 2001:db8::/32
SkipAuthenticated: on
VirusAllow: PUA.* Heuristics.Encrypted.*
InfectedHostLimit: 3 600
InfectedHostBlock: 7200
"""


@pytest.mark.parametrize(
    "text",
    [
        DEBIAN_CONF.read_text(),
        "OutAddress: 25\n",
        "TransparentProxy: on\nHeader:\n",
        "OutAddress: mail.example.org\nClamAddress: 3310\nListen: [::]\n",
        "OutAddress: 25\nClamAddress: /run/c.ctl, 3310 [2001:db8::1]:3311 clamd.lan\n",
        FULL,
    ],
    ids=["debian", "defaults", "transparent", "names", "clamd-pool", "full"],
)
def test_describe_parses_back_to_an_equal_config(text: str) -> None:
    config = parse_config(text, FILE)
    described = describe(config)
    again = parse_config(described, "described")
    assert without_location(again) == without_location(config)
    assert not [w for w in again.warnings if "DebugFiles" not in w]


def test_workers_auto_is_shown_resolved_and_parses_back() -> None:
    config = parse("Workers: auto")
    assert config.workers == 0 and config.worker_count == len(os.sched_getaffinity(0))
    described = describe(config)
    assert f"# Workers: auto is {config.worker_count} here (the number of CPUs)\nWorkers: auto\n" \
        in described
    assert parse_config(described, "described").workers == 0
    assert parse().worker_count == 1  # the default: one process, as the original


def test_describe_names_every_directive() -> None:
    described = describe(parse_config(FULL, FILE))
    for directive in [*DIRECTIVES, "DebugFiles"]:
        assert f"\n{directive}: " in described
    assert "\nHeader: X-Scanned: %i at %d\\r\\n\\tby %l \\\\o/\n" in described
    assert "\nClamAddress: 127.0.0.1:3310\n" in described


def test_describe_debian() -> None:
    described = describe(load_config(str(DEBIAN_CONF)))
    assert "\nOutAddress: 10025\n" in described
    assert "\nListen: 127.0.0.1:10026\n" in described
    assert "\nHeader: X-Virus-Scanned: ClamAV using ClamSMTP\n" in described
    assert "\nPidFile: /var/run/clamsmtp/clamsmtpd.pid\n" in described
    assert "\nVirusAction:\n" in described
    assert "\nTimeOut: 180\n" in described


def test_replace_overrides_and_revalidates() -> None:
    config = parse("PidFile: /run/a.pid")
    changed = replace(config, pid_file="/run/b.pid")
    assert changed.pid_file == "/run/b.pid"
    assert config.pid_file == "/run/a.pid"
    with pytest.raises(ValueError):
        replace(config, max_connections=0)


@pytest.mark.parametrize(
    "changes",
    [
        {"out_address": None},
        {"action": "reject"},
        {"max_connections": 10241},
        {"timeout": 0},
        {"keepalives": -1},
        {"temp_directory": ""},
        {"scan_error_action": "drop"},
        {"reject_message": "451 later"},
        {"max_scan_size": 0},
        {"oversize_action": "drop"},
        {"infected_host_limit": (0, 60)},
        {"infected_host_block": 0},
    ],
)
def test_config_validates_itself(changes: dict) -> None:
    with pytest.raises(ValueError):
        replace(parse(), **changes)


def test_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        parse().action = "pass"  # type: ignore[misc]


# --- properties ---

_NAMES = st.sampled_from(
    [*DIRECTIVES, "Bounce", "ScanHeader", "DebugFiles", "outaddress", "Unknown", ""]
)
_VALUES = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["on", "off", "0", "10025", "127.0.0.1:25", "[::1]:25", "/run/x", "%x\\"]),
)
_LINES = st.one_of(
    st.builds(lambda n, s, v: f"{n}{s}{v}", _NAMES, st.sampled_from([":", " : ", " "]), _VALUES),
    st.text(max_size=40),
)


# Lines that are valid, with free text where the syntax allows it: what describe() must keep.
_FREE_TEXT = st.text(st.characters(blacklist_characters="\n\0"), max_size=40)
_VALID_LINES = st.one_of(
    st.builds("Header: {}".format, _FREE_TEXT),
    st.builds("VirusAction: {}".format, _FREE_TEXT),
    st.builds("PidFile: {}".format, _FREE_TEXT),
    st.builds("TempDirectory: /{}".format, _FREE_TEXT),
    st.builds("User: u{}".format, st.text(st.characters(categories=["L", "N"]), max_size=8)),
    st.builds("TimeOut: {}".format, st.integers(1, 86400)),
    st.builds("ScanTimeout: {}".format, st.integers(1, 86400)),
    st.builds("ClamAddress: {}".format, st.lists(
        st.sampled_from(["1", "127.0.0.1:3311", "[::1]", "/run/y", "clamd.lan"]),
        min_size=1, max_size=4, unique=True).map(", ".join)),
    st.builds("KeepAlives: {}".format, st.integers(0, 86400)),
    st.builds("MaxConnections: {}".format, st.integers(1, 10240)),
    st.builds("Workers: {}".format, st.one_of(st.integers(1, 64), st.just("auto"))),
    st.builds("{}: {}".format, st.sampled_from(["OutAddress", "Listen", "ClamAddress"]),
              st.sampled_from(["1", "127.0.0.1", "10.0.0.1:2525", "[::1]", "::", "/run/x",
                               "mail.example.org", "Mail.Example.Org:26"])),
    st.builds("{}: {}".format, st.sampled_from(["Quarantine", "XClient", "TransparentProxy",
                                               "Bounce", "DebugFiles"]),
              st.sampled_from(["on", "off", "YES", "f"])),
    st.builds("TransparentProxy: {}".format, st.sampled_from(["full", "on", "off"])),
    st.builds("Action: {}".format, st.sampled_from(["drop", "BOUNCE", "Pass"])),
    st.builds("ScanErrorAction: {}".format, st.sampled_from(["defer", "PASS"])),
    st.builds("MaxScanSize: {}".format, st.one_of(
        st.integers(1, 4 << 30), st.sampled_from(["", "1K", "3m", "4G", "1025"]))),
    st.builds("OversizeAction: {}".format, st.sampled_from(["pass", "defer", "REJECT"])),
    st.builds("SkipNetworks: {}".format, st.lists(st.sampled_from(
        ["10.0.0.0/8", "192.0.2.7", "::1", "2001:db8::/32", "::ffff:192.0.2.0/120"]), max_size=4)
        .map(", ".join)),
    st.builds("SkipAuthenticated: {}".format, st.sampled_from(["on", "off"])),
    st.builds("InfectedHostLimit: {} {}".format, st.integers(1, 1000), st.integers(1, 86400)),
    st.builds("InfectedHostBlock: {}".format, st.integers(1, 604800)),
    st.builds("VirusAllow: {}".format, st.lists(st.from_regex(r"\A[!-+\--~]{1,20}\Z"), max_size=3)
              .filter(lambda ps: all(p.strip("*?") for p in ps)).map(" ".join)),
    st.builds("RejectMessage: 5{}".format, st.from_regex(r"\A[0-9]{2} [ -~]{0,29}[!-~]\Z")),
)  # fmt: skip


@given(st.lists(_VALID_LINES, max_size=10), st.booleans())
def test_describe_round_trips_any_valid_config(lines: list, out: bool) -> None:
    try:
        config = parse(*lines, out=out)
    except ConfigError as err:  # no OutAddress, or a lone surrogate (undecodable byte) in Header
        assert "no OutAddress specified" in str(err) or "not valid UTF-8" in str(err)
        return
    again = parse_config(describe(config), FILE)
    assert without_location(again) == without_location(config)


@given(st.text(max_size=300))
def test_parse_config_only_raises_config_error(text: str) -> None:
    try:
        parse_config(text, FILE)
    except ConfigError as err:
        assert str(err).startswith(f"{FILE}:")


@given(st.lists(_LINES, max_size=8), st.booleans())
def test_directive_lines_only_raise_config_error_and_round_trip(lines: list, out: bool) -> None:
    try:
        config = parse(*lines, out=out)
    except ConfigError as err:
        assert str(err).startswith(f"{FILE}:")
        return
    again = parse_config(describe(config), FILE)
    assert without_location(again) == without_location(config)


@given(st.binary(max_size=200))
def test_load_config_survives_any_bytes(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    path = tmp_path_factory.mktemp("conf") / "clamsmtpd.conf"
    path.write_bytes(data)
    try:
        config = load_config(str(path))
    except ConfigError as err:
        str(err).encode("utf-8")
        return
    describe(config)


@pytest.mark.parametrize(
    ("lines", "effective"),
    [
        ([], None),  # as 1.10: too big for clamd is a scan error
        (["MaxScanSize: 10M"], "pass"),
        (["MaxScanSize: 10M", "OversizeAction: defer"], "defer"),
        (["OversizeAction: reject"], "reject"),  # clamd's StreamMaxLength only
    ],
)
def test_effective_oversize_action(lines: list, effective: str | None) -> None:
    assert parse(*lines).effective_oversize_action == effective


def test_describe_writes_sizes_in_the_largest_exact_unit() -> None:
    assert "\nMaxScanSize: 25M\n" in describe(parse("MaxScanSize: 26214400"))
    assert "\nMaxScanSize: 1025\n" in describe(parse("MaxScanSize: 1025"))
    assert "\n# MaxScanSize: not set" in describe(parse())
