"""The relay's reading and rewriting of SMTP lines, as the C original does it (its section 5.2-5.4).

Pure functions on bytes, so each rule is a one-line test.
"""

from __future__ import annotations

from .replies import PASSTHRU_NAME, XFILTERED

_PASSTHRU = PASSTHRU_NAME.encode()
_XFILTERED = b" " + XFILTERED.encode()

#: EHLO keywords the proxy cannot honour, removed from the next hop's list (as the original
#: did, and PIPELINING too; the relay reads pipelined groups now, RFC 2920, so it stays).
#: BURL (RFC 4468) too: its message comes from an IMAP server, never through the proxy's scan.
FILTERED_EXTENSIONS = frozenset(
    {b"STARTTLS", b"CHUNKING", b"BINARYMIME", b"CHECKPOINT", b"XCLIENT", b"XEXCH50", b"BURL"}
)
#: Commands that may be followed by more in a pipelined group (RFC 2920 3.1): the relay sends a
#: run of these to a pipelining next hop in one write. Every other verb ends a group (DATA,
#: EHLO, QUIT, NOOP, AUTH, STARTTLS...) and is relayed on its own, after the group's replies.
GROUPED_VERBS = frozenset({b"MAIL", b"RCPT", b"RSET"})


def filter_ehlo(lines: tuple[bytes, ...], add: tuple[bytes, ...] = ()) -> tuple[bytes, ...]:
    """Rewrite the greeting line and drop extensions we cannot pass on (the original's rules).

    The first line becomes `250 smtp.passthru` (a mail loop check on the other side must not see
    its own name). A removed extension in the last line becomes `250 XFILTERED`, so the reply
    still ends with a final line. `add`: keywords of our own (STARTTLS with ClientTLS: on),
    listed before the next hop's last line.
    """
    last = len(lines) - 1
    first = lines[0]
    cont = first[3:4] == b"-"
    out = [first[:3] + (b"-" if cont else b" ") + _PASSTHRU]
    for i, line in enumerate(lines[1:], start=1):
        words = line[4:].split(None, 1)
        keyword = words[0].upper() if words else b""  # (a line of only blanks is kept)
        if keyword in FILTERED_EXTENSIONS:
            if i == last:
                out.append(line[:3] + _XFILTERED)
            continue
        out.append(line)
    if add:
        code = out[0][:3]
        if len(out) == 1:  # "250 smtp.passthru" becomes the first line of a list
            out[0] = code + b"-" + out[0][4:]
            out += [code + b"-" + keyword for keyword in add[:-1]] + [code + b" " + add[-1]]
        else:
            out[-1:-1] = [code + b"-" + keyword for keyword in add]
    return tuple(out)


def ehlo_size(lines: tuple[bytes, ...]) -> int | None:
    """The next hop's message size limit from its EHLO reply (`250-SIZE 10240000`), if any."""
    for line in lines[1:]:
        words = line[4:].split()
        if len(words) == 2 and words[0].upper() == b"SIZE" and words[1].isdigit():
            return int(words[1]) or None  # SIZE 0 means no fixed limit
    return None


def advertises(lines: tuple[bytes, ...], keyword: bytes) -> bool:
    """Whether an EHLO reply lists `keyword` (its first word, any case)."""
    return any((line[4:].split(None, 1) or [b""])[0].upper() == keyword for line in lines[1:])


def xforward_attributes(line: bytes) -> dict[str, str]:
    """ADDR= and HELO= of an XFORWARD line (for VirusAction's REMOTE and REMOTE_HELO)."""
    found = {}
    for word in line.split()[1:]:
        key, sep, value = word.partition(b"=")
        key_text = key.decode("ascii", "replace").upper()
        if sep and key_text in ("ADDR", "HELO"):
            value = value.strip(b"[]")
            if value and value.upper() not in (b"UNAVAILABLE", b"TEMPUNAVAIL"):
                found[key_text] = value.decode("utf-8", "replace")
    return found


def envelope_address(line: bytes) -> str:
    """The address of a MAIL FROM / RCPT TO line, without brackets; `<>` for the null sender."""
    _, _, rest = line.partition(b":")
    rest = rest.strip()
    if rest.startswith(b"<"):
        inner, sep, _ = rest[1:].partition(b">")
        address = inner if sep else rest[1:]
        address = address.strip()
        return address.decode("utf-8", "replace") if address else "<>"
    return rest.split(None, 1)[0].decode("utf-8", "replace") if rest else "<>"


def command_verb(line: bytes) -> bytes:
    """The verb a command line is dispatched by: its first word, split on any whitespace."""
    words = line.split(None, 1)
    return words[0].upper() if words else b""


def loggable_command(line: bytes) -> bytes:
    """`line` as the debug log may show it: an AUTH command keeps its mechanism only.

    Decided by the same verb as dispatch (`AUTH\tPLAIN <base64>` is AUTH too): the initial
    response is a password.
    """
    if command_verb(line) == b"AUTH":
        return b" ".join(line.split()[:2]) + b" [...]"
    return line
