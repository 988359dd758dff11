"""EventLoop: auto | uvloop | asyncio (appliance/eventloop.py): which loop runs, what an admin is
told when uvloop is asked for and missing, and that nothing global is changed. The daemon on both
loops: tests/conftest.py's BOTH_EVENT_LOOPS."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from appliance import eventloop
from appliance.config import ConfigError, describe, parse_config
from appliance.eventloop import EventLoop

needs_uvloop = pytest.mark.skipif(eventloop.uvloop_problem() is not None,
                                  reason="uvloop is not installed (pip install '.[uvloop]')")

#: Runs Python with uvloop made unimportable (as on a machine without it), then `code`.
WITHOUT_UVLOOP = "import sys; sys.modules['uvloop'] = None\n"


@pytest.fixture
def no_uvloop(monkeypatch):
    """uvloop cannot be imported (sys.modules entry None: ImportError naming uvloop)."""
    monkeypatch.setitem(sys.modules, "uvloop", None)
    eventloop.uvloop_problem.cache_clear()
    yield
    eventloop.uvloop_problem.cache_clear()


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


@needs_uvloop
def test_auto_is_uvloop_where_installed_and_each_choice_runs_its_loop():
    import uvloop

    assert eventloop.resolve(EventLoop.AUTO) is EventLoop.UVLOOP
    assert eventloop.run(_loop_module(), EventLoop.AUTO).startswith("uvloop")
    assert eventloop.run(_loop_module(), EventLoop.UVLOOP).startswith("uvloop")
    assert eventloop.run(_loop_module(), EventLoop.ASYNCIO).startswith("asyncio")
    assert eventloop.version(EventLoop.AUTO) == f"uvloop {uvloop.__version__}"
    assert eventloop.version(EventLoop.ASYNCIO) == "asyncio"


@needs_uvloop
def test_run_leaves_the_global_policy_alone():
    """Only the daemon's own loop is uvloop's: asyncio.run elsewhere (the lab, libraries) is not
    switched over behind their back, as uvloop.install() would."""
    before = type(asyncio.get_event_loop_policy())
    eventloop.run(_loop_module(), EventLoop.UVLOOP)
    assert type(asyncio.get_event_loop_policy()) is before
    assert asyncio.run(_loop_module()).startswith("asyncio")


def test_auto_falls_back_to_asyncio_without_uvloop(no_uvloop):
    assert eventloop.uvloop_problem() == "uvloop is not installed"
    assert eventloop.resolve(EventLoop.AUTO) is EventLoop.ASYNCIO
    assert eventloop.run(_loop_module(), EventLoop.AUTO).startswith("asyncio")
    config = parse_config("OutAddress: 10026\nEventLoop: auto\n", "c.conf")
    assert "# EventLoop: auto is asyncio here\nEventLoop: auto\n" in describe(config)


def test_uvloop_without_uvloop_is_a_config_error_that_says_how_to_install_it(no_uvloop):
    with pytest.raises(ConfigError) as caught:
        parse_config("OutAddress: 10026\n\nEventLoop: uvloop\n", "/etc/clamsmtpd.conf")
    assert (caught.value.file, caught.value.line, caught.value.directive) == (
        "/etc/clamsmtpd.conf", 3, "EventLoop")
    assert str(caught.value) == (
        "/etc/clamsmtpd.conf:3: EventLoop: uvloop is not installed: install it (Debian: apt-get "
        "install python3-uvloop; a venv: pip install 'clamsmtp[uvloop]'), or use EventLoop: "
        "auto or asyncio")
    # asyncio and auto need nothing
    for word in ("asyncio", "AUTO"):
        parse_config(f"OutAddress: 10026\nEventLoop: {word}\n", "c.conf")


@needs_uvloop
@pytest.mark.parametrize(("text", "shown"), [
    ("EventLoop: uvloop", ["EventLoop: uvloop"]),
    ("EventLoop: Asyncio", ["EventLoop: asyncio"]),
    ("", ["# EventLoop: auto is uvloop here", "EventLoop: auto"]),
])
def test_check_config_shows_it_and_parses_back(text, shown):
    config = parse_config(f"OutAddress: 10026\n{text}\n", "c.conf")
    described = describe(config)
    assert "\n".join(shown) + "\n" in described
    assert parse_config(described, "c.conf") == config


def test_a_word_it_does_not_know_names_the_choices():
    with pytest.raises(ConfigError, match=r"^c.conf:2: EventLoop: invalid value 'libev' "
                       r"\(expected auto, uvloop or asyncio\)$"):
        parse_config("OutAddress: 10026\nEventLoop: libev\n", "c.conf")


def test_clamsmtpd_refuses_to_start_on_a_missing_uvloop(tmp_path):
    """As an admin sees it: exit 2 and the located reason, before anything is bound."""
    conf = tmp_path / "clamsmtpd.conf"
    conf.write_text("OutAddress: 10026\nListen: 127.0.0.1:1\nEventLoop: uvloop\n")
    code = WITHOUT_UVLOOP + "from appliance.cli import main; sys.exit(main(sys.argv[1:]))"
    for args in (["--check-config"], ["-d", "3"]):
        result = subprocess.run([sys.executable, "-c", code, "-f", str(conf), *args],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 2, result
        assert result.stderr == (f"clamsmtpd: {conf}:3: EventLoop: uvloop is not installed: "
                                 "install it (Debian: apt-get install python3-uvloop; a venv: "
                                 "pip install 'clamsmtp[uvloop]'), or use EventLoop: auto or "
                                 "asyncio\n")
