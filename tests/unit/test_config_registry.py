"""The directive registry (config.DIRECTIVES) is the one place a directive is defined: these
check that nothing else knows a directive it does not, and that a value is judged once."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from appliance import config
from appliance.config import DIRECTIVES, Config, ConfigError, Reload, parse_config, replace

FILE = "r.conf"
REPO = Path(__file__).resolve().parents[2]
OWN = [d for d in DIRECTIVES if d.alias_of is None]


def test_every_config_field_is_one_directives():
    fields = {f.name for f in dataclasses.fields(Config)} - {"path", "warnings"}
    assert sorted(d.field for d in OWN) == sorted(fields)
    names = {d.name for d in DIRECTIVES}
    assert all(d.alias_of in names and d.deprecated for d in DIRECTIVES if d.alias_of)


def test_check_config_shows_every_directive_once_in_registry_order():
    described = config.describe(parse_config("OutAddress: 25\nWorkers: auto\n", FILE))
    shown = [re.match(r"#? ?(\w+):", line).group(1) for line in described.splitlines()[1:]]
    order = list(dict.fromkeys(shown))  # a comment line may come before its directive's line
    assert order == [d.name for d in OWN]


def test_defaults_are_the_config_fields():
    parsed = parse_config("OutAddress: 25\n", FILE)
    for directive in OWN:
        if directive.name != "OutAddress":
            assert getattr(parsed, directive.field) == directive.default, directive.name


def test_restart_only_is_read_from_the_registry():
    assert config.RESTART_ONLY == {
        "listen": "Listen", "workers": "Workers", "event_loop": "EventLoop",
        "user": "User", "pid_file": "PidFile",
        "metrics_listen": "MetricsListen",
    }
    assert [d.name for d in DIRECTIVES if d.reload is Reload.PARTLY] == ["TransparentProxy"]


@pytest.mark.parametrize(
    ("line", "field", "value"),
    [
        ("MaxConnections: 0", "max_connections", 0),
        ("KeepAlives: 86401", "keepalives", 86401),
        ("InfectedHostBlock: 0", "infected_host_block", 0),
        ("Workers: 65", "workers", 65),
        ("Action: reject", "action", "reject"),
        ("OversizeAction: drop", "oversize_action", "drop"),
        ("TempDirectory:", "temp_directory", ""),
        ("RejectMessage: 451 later", "reject_message", "451 later"),
        ("InfectedHostLimit: 0 60", "infected_host_limit", (0, 60)),
        ("ClamAddress: " + " ".join(str(p) for p in range(3000, 3033)), "clam_addresses",
         tuple(config.Address(path=f"/c{i}") for i in range(33))),
        ("User: a b", "user", "a b"),
    ],
)
def test_a_value_set_in_code_gets_the_files_words(line: str, field: str, value: object):
    """One check per value: a Config built in code (replace, tests, the lab) is refused with
    the reason a file gets, after the directive's name."""
    with pytest.raises(ConfigError) as from_file:
        parse_config(f"OutAddress: 25\n{line}\n", FILE)
    with pytest.raises(ValueError) as from_code:
        replace(parse_config("OutAddress: 25\n", FILE), **{field: value})
    name = line.partition(":")[0]
    expected = re.search(r"\(expected .*\)|at most \d+\)|listed twice", from_file.value.reason)
    assert str(from_code.value).startswith(f"{name}: ")
    if expected:
        assert expected.group(0) in str(from_code.value), (from_file.value, from_code.value)
    else:
        assert from_file.value.reason.split("'")[0] in str(from_code.value)


def test_configuration_md_table_gives_each_default_as_check_config_shows_it():
    table = (REPO / "docs" / "configuration.md").read_text().split("## Directives at a glance")[1]
    cells = dict(re.findall(r"^\| \[`(\w+)`\]\([^)]*\) \| ([^|]*) \|", table, flags=re.M))
    described = config.describe(parse_config("OutAddress: 25\n", FILE)).splitlines()
    shown = dict(line.split(": ", 1) for line in described if not line.startswith("#")
                 and ": " in line)
    checked = 0
    for directive in OWN:
        value = shown.get(directive.name)
        if value and directive.name != "OutAddress":
            assert f"`{value}`" in cells[directive.name], (directive.name, value)
            checked += 1
    assert checked >= 20
