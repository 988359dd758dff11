"""The configured scan header: expand ``%i %l %d %%`` into the line added to clean mail.

Kept apart from the relay so the same rules serve the config check (``template_problems``)
and the message path (``expand_header``).
"""

from __future__ import annotations

import functools
import re
from datetime import datetime
from email.utils import format_datetime

_SYMBOLS = frozenset("ild%")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_FIELD_NAME = re.compile(r"[!-9;-~]+:")  # RFC 5322 ftext, then the colon


def expand_header(
    template: str, *, client_ip: str, local_ip: str, now: datetime | None = None
) -> bytes:
    """Return the header line(s) to add, CRLF-terminated UTF-8, or b"" when disabled.

    Line breaks written with ``\\n`` or ``\\r`` are sent as CRLF, and empty lines are
    dropped, because a bare LF or a blank line would corrupt the message's header block.
    """
    if not template:
        return b""
    parts = _parse(template)
    if isinstance(parts, bytes):
        return parts  # no %i, %l or %d: the same line for every message
    out: list[str] = []
    for part in parts:
        if isinstance(part, str):
            out.append(part)
        elif part == _CLIENT:
            out.append(client_ip)
        elif part == _LOCAL:
            out.append(local_ip)
        else:
            out.append(format_datetime(_aware(now)))
    return _lines("".join(out))


_CLIENT, _LOCAL, _DATE = 0, 1, 2
_SUBSTITUTIONS = {"i": _CLIENT, "l": _LOCAL, "d": _DATE}


@functools.lru_cache(maxsize=8)
def _parse(template: str) -> tuple[str | int, ...] | bytes:
    """The template read once, not character by character for every message: runs of literal
    text, and _CLIENT/_LOCAL/_DATE where %i/%l/%d go; the finished bytes when it has none."""
    parts: list[str | int] = []
    text: list[str] = []
    i = 0
    while i < len(template):
        char = template[i]
        symbol = template[i + 1] if char == "%" and i + 1 < len(template) else ""
        if symbol in _SUBSTITUTIONS:
            parts += ["".join(text), _SUBSTITUTIONS[symbol]]
            text = []
        elif symbol == "%":
            text.append("%")
        else:
            text.append(char + symbol)  # unknown symbols are kept as written
        i += 1 + len(symbol)
    if not parts:
        return _lines("".join(text))
    parts.append("".join(text))
    return tuple(parts)


def _lines(text: str) -> bytes:
    lines = [line for line in _LINE_BREAK.split(text) if line.strip()]
    if not lines:
        return b""
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def template_problems(template: str) -> list[str]:
    """Describe what looks wrong in a header template (for config warnings); [] if nothing."""
    problems: list[str] = []
    i = 0
    while i < len(template):
        if template[i] == "%":
            symbol = template[i + 1 : i + 2]
            problem = f"invalid header symbol: %{symbol}"
            if symbol not in _SYMBOLS and problem not in problems:
                problems.append(problem)
            i += 2
        else:
            i += 1
    if not template:
        return problems
    lines = _LINE_BREAK.split(template)
    if len(lines) > 1 and not lines[-1]:
        lines.pop()  # a final line break is harmless: expand_header adds its own
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            problems.append(f"empty header line {number} is dropped")
        elif number > 1 and line[0] in " \t":
            continue  # a folded continuation of the line before
        elif not _FIELD_NAME.match(line):
            problems.append(f"header line {number} is not of the form 'Name: value'")
    return problems


def _aware(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now().astimezone()
    return now if now.tzinfo is not None else now.astimezone()
