"""Fault tests: the shared fixtures of tests/conftest.py, plus two markers that put a
misbehaving peer where the real one would be (the `appliance` fixture then points at it):

    @pytest.mark.fake_next_hop(script={"DATA": "451 4.3.0 not now"}, ...)   # FakeSMTPServer
    @pytest.mark.fake_clamd(behaviour="silent", ...)   # FakeClamd; the test asks for own_clamd

Without the marker, `next_hop` is the usual RecordingNextHop and `own_clamd` a real clamd.
A parametrized test may add options per case with a `next_hop_options` or `clamd_options`
parameter (a dict, merged over the marker's keyword arguments).
"""

from __future__ import annotations

import pytest
from faultkit import FakeClamd, FakeSMTPServer
from helpers import next_hop_options

from lab import PrivateClamd, RecordingNextHop


def pytest_configure(config):
    config.addinivalue_line("markers", "fake_next_hop(**kwargs): next_hop is a FakeSMTPServer")
    config.addinivalue_line("markers", "fake_clamd(**kwargs): own_clamd is a FakeClamd")


def _options(request, marker, param: str) -> dict:
    callspec = getattr(request.node, "callspec", None)
    extra = callspec.params.get(param, {}) if callspec is not None else {}
    return {**marker.kwargs, **extra}


@pytest.fixture
def next_hop(request):
    marker = request.node.get_closest_marker("fake_next_hop")
    if marker is None:
        with RecordingNextHop("127.0.0.1", 0, **next_hop_options(request)) as hop:
            yield hop
    else:
        with FakeSMTPServer(**_options(request, marker, "next_hop_options")) as hop:
            yield hop


@pytest.fixture
def own_clamd(request, tmp_path_factory):
    marker = request.node.get_closest_marker("fake_clamd")
    if marker is None:
        with PrivateClamd(tmp_path_factory.mktemp("own-clamd"), tcp=True) as daemon:
            yield daemon
    else:
        real = request.getfixturevalue("clamd")
        kwargs = {"relay_to": real.socket_path, **_options(request, marker, "clamd_options")}
        with FakeClamd(tmp_path_factory.mktemp("fake-clamd"), **kwargs) as fake:
            yield fake
