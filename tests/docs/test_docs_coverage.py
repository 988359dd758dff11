"""The tables are complete: every documented command and block is known, named tests exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from docskit import (
    BLOCK_CHECKS,
    BLOCKS,
    COMMANDS,
    KNOWN_SCRIPTS,
    MAPPED,
    REPO,
    RUN_HERE,
    SCRIPT_ENTRY,
    TABLES,
    block_commands,
    block_kind,
    blocks_of,
    inline_commands,
    parse_page,
    rules_matching,
    script_key,
)


def test_the_docs_have_commands_and_snippets():
    assert len(COMMANDS) > 80 and len(blocks_of("clamsmtpd.conf")) > 20
    assert {"docs/install.md", "docs/postfix.md", "README.md"} <= {c.page for c in COMMANDS}


def test_every_documented_command_is_run_or_mapped():
    unclassified, ambiguous = [], []
    for command in COMMANDS:
        rules = rules_matching(command)
        if not rules:
            unclassified.append(str(command))
        elif len(rules) > 1:
            ambiguous.append(f"{command}\n    " + "\n    ".join(map(str, rules)))
    assert not unclassified, (
        "documented commands that nothing runs: run them in a test of tests/docs (RUN_HERE), "
        "map them to the test that runs them (MAPPED), or say why they cannot run here "
        "(CANNOT_RUN_HERE):\n" + "\n".join(unclassified))
    assert not ambiguous, "commands matching several patterns:\n" + "\n".join(ambiguous)


NEW_PAGE = """# A new page

Run `clamsmtpd --new-flag` first, then:

```sh
scripts/newtool --go     # a new script
systemctl enable --now clamsmtpd
```

    clamsmtp-netsetup enable -i eth9 --proxy-port 10099

```conf
OutAddress: 127.0.0.1:10025
```

```
clamsmtpd: 100000: accepted connection from: 127.0.0.1
```
"""


def test_a_command_added_to_a_page_is_caught(tmp_path):
    """The extraction finds new commands wherever they are written; those that no pattern
    knows fail test_every_documented_command_is_run_or_mapped."""
    page = tmp_path / "new.md"
    page.write_text(NEW_PAGE)
    blocks, prose = parse_page(page, "docs/new.md")
    commands = [*(c for b in blocks for c in block_commands(b)),
                *inline_commands("docs/new.md", prose)]
    assert sorted(c.normal for c in commands) == [
        "clamsmtp-netsetup enable -i eth9 --proxy-port 10099", "clamsmtpd --new-flag",
        "scripts/newtool --go", "systemctl enable --now clamsmtpd"]
    known = [c.normal for c in commands if rules_matching(c)]
    assert known == ["systemctl enable --now clamsmtpd"]
    assert [block_kind(b) for b in blocks] == ["shell", "output", "clamsmtpd.conf", "output"]


def test_every_pattern_still_matches_a_documented_command():
    stale = [f"{table}: {pattern}" for table, rules in TABLES.items() for pattern in rules
             if not any(re.fullmatch(pattern, c.normal) for c in COMMANDS)]
    assert not stale, "patterns that match no documented command any more:\n" + "\n".join(stale)


def test_every_code_block_is_recognised():
    problems = []
    for block in BLOCKS:
        kind = block_kind(block)
        if kind == "script":
            if script_key(block) not in KNOWN_SCRIPTS:
                problems.append(f"{block.where}: script {script_key(block)} is not in "
                                "KNOWN_SCRIPTS")
        elif kind not in BLOCK_CHECKS:
            problems.append(f"{block.where}: {kind}")
    assert not problems, "code blocks of an unknown kind:\n" + "\n".join(problems)


def _defined(path: Path, name: str) -> bool:
    tree = ast.parse(path.read_text())
    *classes, function = name.split("::")
    body = tree.body
    for cls in classes:
        body = next((n.body for n in body if isinstance(n, ast.ClassDef) and n.name == cls), [])
    return any(isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == function
               for n in body)


def test_mapped_tests_exist():
    targets = [*MAPPED.values(), *(t for t in BLOCK_CHECKS.values() if "::" in t)]
    for target in targets:
        path, _, name = target.partition("::")
        assert (REPO / path).is_file(), target
        assert _defined(REPO / path, name), f"{target}: no such test"


#: The test modules of tests/docs: "this module" of the tables (their tests without a path).
DOCS_TESTS = sorted(Path(__file__).resolve().parent.glob("test_*.py"))


def test_run_here_tests_exist_in_this_module():
    """The tests the tables name without a path are test functions of tests/docs."""
    assert Path(__file__).resolve() in DOCS_TESTS
    names = {*RUN_HERE.values(), *KNOWN_SCRIPTS.values(),
             *(t for t in BLOCK_CHECKS.values() if "::" not in t)}
    for name in names:
        assert name.startswith("test_") and any(_defined(p, name) for p in DOCS_TESTS), name


def test_the_scripts_run_setup_then_the_entry_point_that_runs_here():
    """scripts/lab, bench and netlab are `scripts/setup` (apt, pip: not run here) followed by
    one exec; the tests of tests/docs run what they exec, with the same arguments."""
    for script, target in SCRIPT_ENTRY.items():
        text = (REPO / script).read_text()
        assert 'bash "$REPO/scripts/setup"' in text, script
        execs = re.findall(r"^exec (.+)$", text, flags=re.M)
        assert execs == [target], (script, execs)
    assert "exec bash scripts/test -q" in (REPO / ".ci" / "run").read_text()  # README.md
