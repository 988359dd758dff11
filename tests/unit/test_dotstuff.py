"""DATA transparency: what the client meant arrives, byte for byte, and nothing can hide a second
message from us or from the next hop."""

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.dotstuff import DataDecoder, normalise_line_endings, stuff


def decode(wire: bytes, splits=()) -> tuple[bytes, DataDecoder]:
    decoder = DataDecoder()
    out, pos = [], 0
    for cut in [*sorted(splits), len(wire)]:
        out.append(decoder.feed(wire[pos:cut]))
        pos = cut
    return b"".join(out), decoder


def encode(body: bytes) -> bytes:
    return b"".join(stuff([body])) + b".\r\n"


def test_end_of_data_only_at_crlf_dot_crlf():
    body, decoder = decode(b"line\r\n.\r\nQUIT\r\n")
    assert decoder.done and body == b"line\r\n" and decoder.rest == b"QUIT\r\n"


def test_empty_body():
    body, decoder = decode(b".\r\n")
    assert decoder.done and body == b""


def test_leading_dots_are_unstuffed():
    body, _ = decode(b"..one\r\n...two\r\n.\r\n")
    assert body == b".one\r\n..two\r\n"


def test_dot_then_text_on_first_line():
    body, _ = decode(b".x\r\n.\r\n")
    assert body == b"x\r\n"


def test_nul_and_8bit_bytes_pass_untouched():
    raw = bytes(range(256)).replace(b"\r", b"").replace(b"\n", b"")
    body, _ = decode(raw + b"\r\n.\r\n")
    assert body == raw + b"\r\n"


def test_bare_lf_dot_does_not_end_data_and_is_normalised():
    body, decoder = decode(b"a\n.\nMAIL FROM:<x>\r\n.\r\n")
    assert decoder.done
    assert body == b"a\r\n.\r\nMAIL FROM:<x>\r\n"  # one message; the dot line will be re-stuffed
    assert b"".join(stuff([body])) == b"a\r\n..\r\nMAIL FROM:<x>\r\n"


def test_smuggling_variants_never_end_data():
    for marker in (b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n", b"\r\n.\r"):
        body, decoder = decode(b"a" + marker + b"MAIL FROM:<evil>\r\n")
        assert not decoder.done, marker
        wire = b"".join(stuff([normalise_line_endings(body)]))
        # whatever the next hop's idea of a line ending, no line of ours is a lone dot
        for line in wire.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n"):
            assert line != b".", marker


def test_split_anywhere():
    wire = b"..a\r\n.\r\nb\r\n..\r\n.\r\n"
    expected, _ = decode(wire)
    for i in range(len(wire) + 1):
        for j in range(i, len(wire) + 1):
            assert decode(wire, (i, j))[0] == expected


def test_normalise_fast_path_returns_same_object():
    data = b"a\r\nb\r\n"
    assert normalise_line_endings(data) is data
    assert normalise_line_endings(b"a\rb\nc\r\n") == b"a\r\nb\r\nc\r\n"


def _crlf_terminated(body: bytes) -> bytes:
    return body if not body or body.endswith(b"\r\n") else body + b"\r\n"


crlf_bodies = st.lists(
    st.sampled_from([b".", b"..", b"a", b"\x00", b"\xff", b"\r\n", b".\r\n", b"\r\n."]), max_size=20
).map(b"".join).map(_crlf_terminated)


@settings(max_examples=500)
@given(body=crlf_bodies, data=st.data())
def test_round_trip_property(body, data):
    wire = encode(body) + b"NEXT"
    splits = data.draw(st.lists(st.integers(0, len(wire)), max_size=4))
    decoded, decoder = decode(wire, splits)
    assert decoder.done and decoded == body and decoder.rest == b"NEXT"
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=4)))
    chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    assert b"".join(stuff(chunks)) == b"".join(stuff([body]))


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_arbitrary_input_never_breaks(raw):
    decoded, decoder = decode(raw)
    if not decoder.done:
        return
    # a decoded body has only CRLF line endings, and its re-encoding ends data exactly once
    assert normalise_line_endings(decoded) == decoded
    wire = encode(decoded)
    again, second = decode(wire + b"X")
    assert second.done and again == decoded and second.rest == b"X"
