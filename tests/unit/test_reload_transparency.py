"""SIGHUP and TransparentProxy: off <-> on at once; to or from full only with a restart (the
listener's IP_TRANSPARENT and the kept CAP_NET_ADMIN are set up at start-up)."""

import socket

import pytest

from appliance.config import Transparency, parse_config
from appliance.server import Appliance


@pytest.fixture
def sock():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s


def _appliance(sock, text):
    return Appliance(parse_config(text + "ClamAddress: 127.0.0.1:1\n", "t.conf"), sock)


def test_on_to_full_waits_for_a_restart(sock):
    appliance = _appliance(sock, "TransparentProxy: on\n")
    assert appliance.reload(parse_config("TransparentProxy: full\n", "t.conf")) == [
        "TransparentProxy"]
    assert appliance.config.transparent_proxy is Transparency.ON


def test_off_to_full_keeps_the_out_address_in_use(sock):
    appliance = _appliance(sock, "OutAddress: 2525\n")
    assert appliance.reload(parse_config("TransparentProxy: full\n", "t.conf")) == [
        "TransparentProxy"]
    assert appliance.config.transparent_proxy is Transparency.OFF
    assert appliance.config.out_address.port == 2525


def test_on_to_off_is_taken_at_once(sock):
    appliance = _appliance(sock, "TransparentProxy: on\n")
    assert appliance.reload(parse_config("OutAddress: 2525\n", "t.conf")) == []
    assert appliance.config.transparent_proxy is Transparency.OFF
