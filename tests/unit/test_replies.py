"""The product's replies (appliance/replies.py) and the tests' table (tests/replies.py) agree.

The table is written out independently on purpose: a reply changed in the product fails here,
and every test that asserts on the table keeps testing what clients really see."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import replies as R

from appliance import config, replies, verdict


def _strings(module, prefix: str = "") -> dict[str, str]:
    return {name: value for name, value in vars(module).items()
            if name.isupper() and name.startswith(prefix) and isinstance(value, str)}


def test_every_reply_of_the_product_is_in_the_tests_table():
    table = set(_strings(R).values())
    missing = {name: value for name, value in _strings(replies, "REPLY_").items()
               if value not in table}
    assert not missing, f"add these to tests/replies.py: {missing}"


def test_every_reply_of_the_tests_table_is_the_products():
    product = set(_strings(replies, "REPLY_").values())
    derived = {R.EHLO_FIRST, R.XFILTERED}
    unknown = {name: value for name, value in _strings(R).items()
               if value not in product and value not in derived}
    assert not unknown, f"the product never says these (appliance/replies.py): {unknown}"


def test_the_ehlo_rewrite_and_the_headers():
    assert f"250-{replies.PASSTHRU_NAME}" == R.EHLO_FIRST
    assert f"220 {replies.PASSTHRU_NAME}" == R.GREETING
    assert f"250 {replies.XFILTERED}" == R.XFILTERED
    assert config.DEFAULT_HEADER.encode() == R.DEFAULT_HEADER
    assert R.INFECTED_HEADER + b"\r\n" == verdict.INFECTED_HEADER
    assert config.DEFAULT_REJECT_MESSAGE == R.REJECTED


def _reply_literals(root: Path) -> list[str]:
    """String literals in the product that read as an SMTP reply (`421 ...`), outside
    replies.py; docstrings left out."""
    found = []
    for path in sorted((root / "appliance").rglob("*.py")):
        if path.name == "replies.py":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                           ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and id(node) not in docstrings:
                text = node.value.decode("latin-1") if isinstance(node.value, bytes) \
                    else node.value
                if isinstance(text, str) and _REPLY.match(text):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {text!r}")
    return found


_REPLY = re.compile(r"[2-5][0-9][0-9][ -]")


def test_no_reply_is_spelled_outside_replies_py():
    assert _reply_literals(Path(__file__).resolve().parents[2]) == []
