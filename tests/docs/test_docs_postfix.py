"""The Postfix snippets and commands pass postconf and postmap in a private configuration
directory (`-c DIR`): never the system's /etc/postfix, which a new machine's Postfix installed
with "No configuration" does not even have a main.cf in."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from docskit import (
    MASTER_SERVICE,
    MIME_HEADER_CHECKS,
    Block,
    blocks_of,
    documented,
    ok,
    run,
    split_words,
    tool,
)

POSTCONF, POSTMAP = tool("postconf"), tool("postmap")
#: What Debian's postfix package ships whatever was answered at its install (debconf).
MASTER_DIST = Path("/usr/share/postfix/master.cf.dist")
needs_postconf = pytest.mark.skipif(
    POSTCONF is None or not MASTER_DIST.exists(),
    reason=f"postconf or {MASTER_DIST} is missing (Debian package postfix)")
#: A main.cf of Postfix 3.7's defaults, as `postconf -n` of a new Debian install has them.
BASE_MAIN = "compatibility_level = 3.6\n"


def postfix_copy(tmp_path: Path, main: str = "", master: str = "") -> Path:
    """A private Postfix configuration directory, Debian's shipped master.cf and a default
    main.cf, with `main` and `master` appended (never the system's /etc/postfix)."""
    directory = tmp_path / f"postfix-{secrets.token_hex(3)}"
    directory.mkdir()
    (directory / "main.cf").write_text(BASE_MAIN)
    shutil.copyfile(MASTER_DIST, directory / "master.cf")
    for name, extra in (("main.cf", main), ("master.cf", master)):
        if extra:
            with open(directory / name, "a") as file:
                file.write("\n# appended by tests/docs/test_docs_postfix.py\n" + extra)
    settled(directory)
    return directory


def settled(directory: Path) -> None:
    """Date main.cf and master.cf back: postconf waits a second or two for a file changed
    within the last second to settle."""
    past = time.time() - 10
    for name in ("main.cf", "master.cf"):
        os.utime(directory / name, (past, past))


def postconf_warnings(directory: Path) -> list[str]:
    lines = []
    for flag in ("-n", "-M"):
        result = run([POSTCONF, "-c", directory, flag])
        assert result.returncode == 0, result.stderr
        lines += [x.replace(str(directory), "DIR") for x in result.stderr.splitlines()]
    return sorted(set(lines))


def master_variants() -> list[tuple[Block, str]]:
    """Each master.cf snippet as Postfix would read it. A block of `-o` lines only changes the
    service of the page's previous full master.cf block whose `-o name=` it repeats."""
    variants, full = [], {}
    for block in blocks_of("master.cf"):
        if any(MASTER_SERVICE.match(x) for x in block.lines()):
            full[block.page] = block.text
            variants.append((block, block.text))
            continue
        assert block.page in full, f"{block.where}: -o lines without a service above them"
        text = full[block.page]
        for line in block.lines():
            name = line.split("=")[0]
            old = [x for x in text.splitlines() if x.startswith(name + "=")]
            assert len(old) == 1, f"{block.where}: {name} is in {len(old)} lines of the service"
            text = text.replace(old[0] + "\n", line + "\n")
        variants.append((block, text))
    return variants


@needs_postconf
def test_postfix_snippets_pass_postconf(tmp_path):
    main_blocks = blocks_of("main.cf")
    assert main_blocks and blocks_of("master.cf")
    typo = master_variants()[0][1].replace("smtp_send_xforward_command=",
                                           "smtp_send_xforward_commando=")
    cases = [(None, "", ""), *((b, b.text, "") for b in main_blocks),
             *((b, "", text) for b, text in master_variants()), ("typo", "", typo)]
    directories = [postfix_copy(tmp_path, main, master) for _, main, master in cases]
    with ThreadPoolExecutor(max_workers=4) as pool:
        warnings = list(pool.map(postconf_warnings, directories))
    baseline = warnings[0]
    for (block, main, master), directory, found in zip(cases, directories, warnings,
                                                      strict=True):
        if block == "typo":  # the check is not blind: a misspelt -o parameter is reported
            assert found != baseline
            continue
        assert found == baseline, (block and block.where, found)
        if main:
            shown = ok(run([POSTCONF, "-c", directory, "-n"])).stdout.splitlines()
            for line in block.lines():
                assert " ".join(line.split()) in shown, (block.where, line)
        if master:
            services = ok(run([POSTCONF, "-c", directory, "-M"])).stdout
            for line in master.splitlines():
                if MASTER_SERVICE.match(line):
                    name, kind = line.split()[:2]
                    assert re.search(rf"^{re.escape(name)}\s+{kind}\s", services,
                                     flags=re.M), line


@needs_postconf
def test_documented_postconf_commands(tmp_path):
    """postfix.md's "Apply and check", after its main.cf and master.cf sections."""
    main = next(b for b in blocks_of("main.cf") if "content_filter" in b.text)
    master = next(text for block, text in master_variants() if block.page == main.page)
    directory = postfix_copy(tmp_path, main=main.text, master=master)
    for command in documented("test_documented_postconf_commands"):
        words = command.words
        result = run([POSTCONF, "-c", directory, *words[1:]])
        assert result.returncode == 0 and result.stderr == "", (str(command), result.stderr)
        names = [w for w in words[2:] if not w.startswith("-")]
        lines = result.stdout.splitlines()
        assert len(lines) == len(names), (str(command), result.stdout)
        for name, line in zip(names, lines, strict=True):
            assert line.startswith(name.replace("/", " ").split()[0] + " "), (name, line)
        if words[1] == "-n":
            assert lines == [" ".join(x.split()) for x in main.lines()]


@needs_postconf
@pytest.mark.skipif(POSTMAP is None, reason="postmap is missing (Debian package postfix)")
def test_mime_header_checks_example(tmp_path):
    rules = [x for x in MIME_HEADER_CHECKS.read_text().splitlines()
             if x.strip() and not x.startswith("#")]
    tables = blocks_of("regexp table")
    assert tables and all(b.lines() == rules for b in tables), "docs and the example file differ"
    config = postfix_copy(tmp_path)  # postmap reads main.cf: a private one
    commands = documented("test_mime_header_checks_example")
    installs = [c for c in commands if c.words[0] == "install"]
    assert installs, "postfix.md no longer shows how the example gets to /etc/postfix"
    for command in installs:  # the docs' own install line, into the private directory
        ok(run([str(config / "mime_header_checks") if w.startswith("/etc/postfix/") else w
                for w in command.words]))
    table = f"regexp:{config}/mime_header_checks"
    content_filter = next(b for b in blocks_of("main.cf") if "content_filter" in b.text)
    destination = re.search(r"content_filter\s*=\s*(\S+)", content_filter.text)[1]
    action = f"FILTER {destination}"  # the same transport as the content filter
    for header, expected in {
        "Content-Type: application/zip": action,
        "Content-Type: application/octet-stream; name=eicar.com": action,
        "content-type: APPLICATION/PDF": action,  # regexp tables ignore case
        "Content-Type: text/html; charset=utf-8": action,
        "Content-Type: text/plain; charset=us-ascii": None,
        "Content-Type: image/png": None,  # the "paranoid" rule is commented out
    }.items():
        result = run([POSTMAP, "-c", config, "-q", header, table])
        assert result.stderr == "", result.stderr
        if expected is None:
            assert result.returncode == 1 and result.stdout == "", header
        else:
            assert result.returncode == 0 and result.stdout.strip() == expected, header
    comment = [x.lstrip("# ") for x in MIME_HEADER_CHECKS.read_text().splitlines()
               if x.startswith("#   ")]
    for command in (c for c in commands if c.words[0] == "postmap"):
        assert command.text in comment, "the example file shows another test command"
        words = [table if w == "regexp:/etc/postfix/mime_header_checks" else w
                 for w in command.words]
        assert ok(run([POSTMAP, "-c", config, *words[1:]])).stdout.strip() == action
    # the file's own install line, in a private configuration directory
    install = next(x for x in comment if x.startswith("postconf -e "))
    directory = postfix_copy(tmp_path)
    ok(run([POSTCONF, "-c", directory, *split_words(install)[1:]]))
    settled(directory)
    shown = ok(run([POSTCONF, "-c", directory, "-n", "mime_header_checks"]))
    assert shown.stdout.strip() == split_words(install)[-1] and shown.stderr == ""
