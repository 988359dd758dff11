"""The spool: small bodies in memory, big ones (or past the budget) in a private file."""

from __future__ import annotations

import os
import stat

import pytest

from appliance import spool as spool_module
from appliance.spool import MEMORY_LIMIT, Spool, SpoolError, check_directory

BODY = b"Subject: t\r\n\r\nhello\r\n"


def held() -> int:
    return spool_module._in_memory


def test_a_small_body_never_touches_the_directory(tmp_path):
    with Spool(str(tmp_path)) as spool:
        spool.write(BODY)
        spool.finish()
        assert not spool.on_disk and spool.path is None
        assert held() == len(BODY)
        with spool.open() as f:
            assert f.read() == BODY
        assert b"".join(spool.chunks(b"X-H: 1\r\n")) == b"Subject: t\r\nX-H: 1\r\n\r\nhello\r\n"
        assert os.listdir(tmp_path) == []
    assert held() == 0


def test_a_big_body_goes_to_a_nameless_private_file(tmp_path):
    data = b"Subject: big\r\n\r\n" + b"x" * MEMORY_LIMIT
    with Spool(str(tmp_path)) as spool:
        spool.write(data[:1000])
        assert not spool.on_disk
        spool.write(data[1000:])
        spool.finish()
        assert spool.on_disk and held() == 0
        assert stat.S_IMODE(os.stat(spool.path).st_mode) == 0o600
        with spool.open() as f:
            assert f.read() == data
        assert spool.header_end == data.index(b"\r\n\r\n") + 2
    assert os.listdir(tmp_path) == [] and held() == 0


def test_past_the_budget_bodies_go_to_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_module, "MEMORY_BUDGET", 3 * len(BODY))
    spools = [Spool(str(tmp_path)) for _ in range(4)]
    try:
        for s in spools:
            s.write(BODY)
        assert [s.on_disk for s in spools] == [False, False, False, True]
        assert held() == 3 * len(BODY)
    finally:
        for s in spools:
            s.remove()
            s.remove()  # twice is harmless and does not count twice
    assert held() == 0


def test_an_unusable_directory_fails_only_when_a_file_is_needed(tmp_path):
    missing = str(tmp_path / "missing")
    assert check_directory(missing) == "No such file or directory"
    assert check_directory(str(tmp_path)) is None
    with Spool(missing) as spool:
        spool.write(BODY)  # fine: memory
        with pytest.raises(SpoolError) as caught:
            spool.write(b"x" * MEMORY_LIMIT)
        assert str(caught.value).startswith(f"couldn't open cache file in {missing}: ")
    assert held() == 0


@pytest.mark.parametrize("size", [len(BODY), MEMORY_LIMIT + 1])
def test_save_as_makes_a_private_copy_and_never_overwrites(tmp_path, size):
    data = (BODY * (size // len(BODY) + 1))[:size]
    with Spool(str(tmp_path)) as spool:
        spool.write(data)
        spool.finish()
        target = tmp_path / "virus.abc"
        spool.save_as(str(target))
        assert target.read_bytes() == data
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
        with pytest.raises(FileExistsError):
            spool.save_as(str(target))
