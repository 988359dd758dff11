"""instream.Clamd against a small clamd of our own on a real unix socket, in-process: the
framing it sends, and what it makes of each kind of answer. (The real clamd and the fault
matrix's misbehaving ones check the same through the whole daemon: tests/faults.)"""

from __future__ import annotations

import asyncio
import io
import struct

import pytest

from appliance.addresses import Address
from appliance.instream import CHUNK, CLEAN, ERROR, OVERSIZE, SIZE_LIMIT_REPLY, VIRUS, Clamd


async def _read_stream(reader: asyncio.StreamReader) -> bytes:
    """The body of one INSTREAM, after its command line, reassembled from its chunks."""
    body = bytearray()
    while True:
        (length,) = struct.unpack("!L", await reader.readexactly(4))
        if not length:
            return bytes(body)
        body += await reader.readexactly(length)


def _scan(tmp_path, answer, body: bytes = b"Subject: hi\r\n\r\nhello\r\n", *,
          timeout: float = 5.0, scan_timeout: float = 5.0):
    """Scan `body` on a clamd that hands the connection to `answer(reader, writer, seen)`;
    (outcome, what clamd received: command line and body)."""
    path = str(tmp_path / "clamd.sock")
    seen: dict = {}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen["command"] = await reader.readline()
        try:
            await answer(reader, writer, seen)
        finally:
            writer.close()

    async def main():
        server = await asyncio.start_unix_server(serve, path)
        async with server:
            clamd = Clamd(Address(path=path), timeout, scan_timeout)
            return await clamd.scan(io.BytesIO(body))

    return asyncio.run(main()), seen


def _replying(*pieces: bytes, delay: float = 0.0):
    async def answer(reader, writer, seen) -> None:
        seen["body"] = await _read_stream(reader)
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(delay)
    return answer


def test_clean_message_is_framed_as_instream(tmp_path):
    outcome, seen = _scan(tmp_path, _replying(b"stream: OK\n"))
    assert outcome.result.status == CLEAN and not outcome.clamd_failed
    assert seen["command"] == b"nINSTREAM\n"
    assert seen["body"] == b"Subject: hi\r\n\r\nhello\r\n"


def test_a_body_of_several_chunks_arrives_whole(tmp_path):
    body = bytes(range(256)) * (3 * CHUNK // 256 + 77)  # more than the socket buffer takes
    outcome, seen = _scan(tmp_path, _replying(b"stream: OK\n"), body)
    assert outcome.result.status == CLEAN
    assert seen["body"] == body


def test_an_empty_body(tmp_path):
    outcome, seen = _scan(tmp_path, _replying(b"stream: OK\n"), b"")
    assert outcome.result.status == CLEAN and seen["body"] == b""


def test_virus_found(tmp_path):
    outcome, _ = _scan(tmp_path, _replying(b"stream: Eicar-Signature FOUND\n"))
    assert outcome.result.status == VIRUS and outcome.result.virus == "Eicar-Signature"


def test_found_wins_over_an_error_line(tmp_path):
    outcome, _ = _scan(tmp_path, _replying(b"stream: Can't read ERROR\n",
                                           b"stream: Eicar-Signature FOUND\n"))
    assert outcome.result.status == VIRUS


def test_a_reply_in_pieces_is_read_whole(tmp_path):
    outcome, _ = _scan(tmp_path, _replying(b"str", b"eam: O", b"K\n", delay=0.02))
    assert outcome.result.status == CLEAN


def test_clamds_own_error_is_not_a_clamd_failure(tmp_path):
    outcome, _ = _scan(tmp_path, _replying(b"stream: Can't allocate memory ERROR\n"))
    assert outcome.result.status == ERROR and not outcome.clamd_failed
    assert outcome.result.detail == "Can't allocate memory"


@pytest.mark.parametrize(("pieces", "detail"), [
    ((b"stream: OK",), "reply cut short by a close: 'stream: OK'"),
    ((), "unexpected response from clamd: nothing (connection closed)"),
    ((b"hello there\n",), "unexpected response from clamd: hello there"),
    ((b"stream: OK\n", b"stream: Eicar-Signature\n"), "unexpected response from clamd: "
                                                      "stream: OK / stream: Eicar-Signature"),
])
def test_anything_but_ok_is_never_clean(tmp_path, pieces, detail):
    outcome, _ = _scan(tmp_path, _replying(*pieces))
    assert outcome.result.status == ERROR and outcome.clamd_failed
    assert detail in outcome.result.detail


def test_size_limit_while_the_body_is_still_being_sent(tmp_path):
    async def refuse(reader, writer, seen) -> None:
        await reader.readexactly(1 << 16)
        writer.write(SIZE_LIMIT_REPLY.encode() + b"\n")
        await writer.drain()

    outcome, _ = _scan(tmp_path, refuse, b"x" * (8 << 20))
    assert outcome.result.status == OVERSIZE and not outcome.clamd_failed
    assert "raise StreamMaxLength" in outcome.result.detail


def test_timeout_per_read_and_scan_timeout_for_the_whole(tmp_path):
    outcome, _ = _scan(tmp_path, _replying(b"stream: OK\n", delay=0.0), timeout=5.0)
    assert outcome.result.status == CLEAN
    silent = _replying()  # reads the stream, says nothing, keeps the connection

    async def never(reader, writer, seen) -> None:
        await silent(reader, writer, seen)
        await reader.read()

    outcome, _ = _scan(tmp_path, never, timeout=0.2, scan_timeout=5.0)
    assert outcome.result.detail == "clamd timed out (TimeOut 0.2 s)" and outcome.clamd_failed
    trickle = _replying(*(bytes([b]) for b in b"stream: OK\n"), delay=0.1)
    outcome, _ = _scan(tmp_path, trickle, timeout=0.5, scan_timeout=0.35)
    assert outcome.result.detail == "clamd did not finish within ScanTimeout (0.35 s)"


def test_unreachable_clamd_was_sent_nothing(tmp_path):
    path = str(tmp_path / "none.sock")
    outcome = asyncio.run(Clamd(Address(path=path), 1.0, 1.0).scan(io.BytesIO(b"x")))
    assert outcome.clamd_failed and not outcome.sent
    assert outcome.result.detail == f"could not reach clamd at {path}: No such file or directory"


@pytest.mark.parametrize(("answer", "expected"), [(b"PONG\n", True), (b"PANG\n", False),
                                                  (None, False)])
def test_ping(tmp_path, answer, expected):
    path = str(tmp_path / "clamd.sock")

    async def serve(reader, writer) -> None:
        try:
            assert await reader.readline() == b"nPING\n"
            if answer is None:
                await reader.read()  # until the scanner gives up
            else:
                writer.write(answer)
        finally:
            writer.close()

    async def main() -> bool:
        async with await asyncio.start_unix_server(serve, path):
            return await Clamd(Address(path=path), 5.0, 5.0).ping(0.2)

    assert asyncio.run(main()) is expected
