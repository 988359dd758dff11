"""SMTP DATA transparency (RFC 5321 4.5.2), in both directions, on chunks.

The body is handled in chunks, never line by line and never whole, so a 50 MB message costs a few
`bytes.find` passes and no more memory than one chunk.

Inbound (client -> spool), `DataDecoder`:
- the data ends only at CRLF "." CRLF (a bare-LF or bare-CR dot line does not end it: that is the
  SMTP-smuggling ambiguity of 2023, so we never guess);
- a leading dot is removed from every line that starts after a CRLF;
- bare CR and bare LF are then normalised to CRLF, so the next hop can never read a line ending
  (or an end of data) that we did not see. A dot line made that way is re-stuffed on the way out.

Outbound (spool -> next hop), `Stuffer` and `stuff()`: a dot is added to every line that starts
with one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

_LINE_ENDINGS = re.compile(rb"\r\n|\r|\n")


def normalise_line_endings(data: bytes) -> bytes:
    """Turn every bare CR and bare LF into CRLF (three C-speed counts decide the fast path)."""
    crlf = data.count(b"\r\n")
    if crlf == data.count(b"\r") and crlf == data.count(b"\n"):
        return data
    return _LINE_ENDINGS.sub(b"\r\n", data)


class DataDecoder:
    """Undo dot-stuffing on a DATA stream that arrives in arbitrary chunks.

    `feed()` returns the decoded bytes that are final so far. Once the end-of-data line has been
    seen, `done` is true and `rest` holds what the client sent after it (a pipelined command).
    """

    __slots__ = ("done", "rest", "_pending", "_bol")

    def __init__(self) -> None:
        self.done = False
        self.rest = b""
        self._pending = b""  # bytes held back because the next chunk decides their meaning
        self._bol = True  # the next byte starts a line (the body starts at a line start)

    def feed(self, chunk: bytes) -> bytes:
        if self.done:
            self.rest += chunk
            return b""
        data = self._pending + chunk if self._pending else chunk
        self._pending = b""
        out: list[bytes] = []
        pos = 0
        end = len(data)
        while pos < end:
            if self._bol and data[pos] == 0x2E:  # "." at a line start
                if end - pos < 3 and b".\r\n".startswith(data[pos:]):
                    self._pending = data[pos:]  # "." or ".\r": could still be the end
                    break
                if data.startswith(b".\r\n", pos):
                    self.done = True
                    self.rest = data[pos + 3 :]
                    break
                pos += 1  # the stuffed dot
                self._bol = False
                continue
            nxt = data.find(b"\r\n.", pos)
            if nxt >= 0:
                out.append(data[pos : nxt + 2])
                pos = nxt + 2
                self._bol = True
                continue
            # No dot line in this chunk: all of it is final, except a trailing CR or CRLF whose
            # meaning depends on what follows.
            if data.endswith(b"\r\n"):
                out.append(data[pos:])
                self._bol = True
            elif data.endswith(b"\r"):
                out.append(data[pos : end - 1])
                self._pending = b"\r"
                self._bol = False
            else:
                out.append(data[pos:])
                self._bol = False
            break
        if not out:
            return b""
        return normalise_line_endings(b"".join(out))


class Stuffer:
    """Dot-stuff a CRLF-normalised body for the wire, chunk by chunk (the end-of-data line is
    not added): the body read back from the spool, or one streamed through as it arrives.

    Chunks may split a line ending anywhere (file reads do), so the state between two chunks is
    "at a line start" or "just after a CR".
    """

    __slots__ = ("_bol", "_after_cr")

    def __init__(self) -> None:
        self._bol = True
        self._after_cr = False

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        if self._bol and chunk[0] == 0x2E:
            chunk = b"." + chunk
        elif self._after_cr and chunk.startswith(b"\n."):
            chunk = b"\n.." + chunk[2:]
        if b"\r\n." in chunk:
            chunk = chunk.replace(b"\r\n.", b"\r\n..")
        self._bol = chunk.endswith(b"\r\n") or (self._after_cr and chunk == b"\n")
        self._after_cr = chunk.endswith(b"\r")
        return chunk


def stuff(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """`Stuffer` over an iterable of chunks."""
    stuffer = Stuffer()
    for chunk in chunks:
        if chunk:
            yield stuffer.feed(chunk)
