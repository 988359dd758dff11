"""Coverage-guided fuzzing of the DATA decoder with atheris (by hand; CI does not run it).

    .venv/bin/pip install atheris
    .venv/bin/python tests/fuzz/atheris_dotstuff.py -max_total_time=60 -print_final_stats=1

Each input is a DATA stream (the bytes after "354") plus a chunking. It checks what
test_session_fuzz.py checks with Hypothesis: `DataDecoder` gives the same output, end and rest
for the stream in one piece and in chunks, and that is what the reference model of RFC 5321 4.5.2
says (end at the first CRLF "." CRLF, leading dot removed, then bare CR and LF made CRLF);
`stuff()` of the decoded body decodes back to it and has no line end but CRLF.
"""

from __future__ import annotations

import re
import sys

import atheris

with atheris.instrument_imports():
    from appliance.dotstuff import DataDecoder, normalise_line_endings, stuff

END = b"\r\n.\r\n"
BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def reference(wire: bytes) -> tuple[bytes, bytes] | None:
    at = (b"\r\n" + wire).find(END)
    if at < 0:
        return None
    lines = wire[:at].split(b"\r\n")
    body = b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)
    return re.sub(rb"\r\n|\r|\n", b"\r\n", body), wire[at + 3:]


def decode(wire: bytes, sizes: list[int]) -> tuple[bytes, bool, bytes]:
    decoder = DataDecoder()
    out, pos, i = [], 0, 0
    while pos < len(wire):
        size = sizes[i % len(sizes)] if sizes else len(wire)
        out.append(decoder.feed(wire[pos:pos + size]))
        pos += size
        i += 1
    return b"".join(out), decoder.done, decoder.rest


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    sizes = [fdp.ConsumeIntInRange(1, 16) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    wire = fdp.ConsumeBytes(fdp.remaining_bytes())
    whole = decode(wire, [])
    chunked = decode(wire, sizes)
    assert chunked == whole, (wire, sizes, chunked, whole)
    expected = reference(wire)
    if expected is None:
        assert not whole[1], wire
        return
    body, done, rest = whole
    assert done and (body, rest) == expected, (wire, whole, expected)
    assert normalise_line_endings(body) == body
    out = b"".join(stuff([body[:7], body[7:]])) + b".\r\n"
    assert BARE.search(out) is None, out
    assert reference(out) == (body, b""), (body, out)


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
