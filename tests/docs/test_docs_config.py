"""The clamsmtpd.conf snippets pass --check-config; -v and --check-config show what the docs say."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from docskit import BIN, REPO, SHIPPED_CONF, Block, blocks_of, documented, entry_argv, ok, run

import appliance

#: Snippets the page says warn: (page, a line of the snippet) -> the warning.
EXPECTED_WARNINGS: dict[tuple[str, str], str] = {}


@pytest.fixture(scope="module")
def checked_snippets(tmp_path_factory, tls_certs) -> dict[Block, subprocess.CompletedProcess]:
    """`python -m appliance.cli --check-config -f SNIPPET` for every snippet, in parallel.

    --check-config reads the certificate and key a snippet names: those paths (under
    /etc/clamsmtp/tls/) become the test's throwaway ones."""
    directory = tmp_path_factory.mktemp("conf")
    paths = {"/etc/clamsmtp/tls/cert.pem": str(tls_certs.proxy.cert),
             "/etc/clamsmtp/tls/key.pem": str(tls_certs.proxy.key),
             "/etc/clamsmtp/tls/ca.pem": str(tls_certs.ca.cert)}

    def check(numbered: tuple[int, Block]) -> subprocess.CompletedProcess:
        conf = directory / f"{numbered[0]}.conf"
        text = numbered[1].text
        for documented_path, real in paths.items():
            text = text.replace(documented_path, real)
        conf.write_text(text)
        return run([sys.executable, "-m", "appliance.cli", "--check-config", "-f", conf])

    snippets = blocks_of("clamsmtpd.conf")
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(snippets, pool.map(check, enumerate(snippets)), strict=True))


@pytest.mark.parametrize("block", blocks_of("clamsmtpd.conf"), ids=lambda b: b.where)
def test_clamsmtpd_conf_snippet(block, checked_snippets):
    result = checked_snippets[block]
    assert result.returncode == 0, f"{block.where}:\n{block.text}\n{result.stderr}"
    expected = [w for (page, line), w in EXPECTED_WARNINGS.items()
                if page == block.page and line in block.text.splitlines()]
    if expected:
        assert all(w in result.stderr for w in expected), result.stderr
    else:
        assert result.stderr == "", f"{block.where} warns:\n{result.stderr}"
    # every directive of the snippet is in the effective configuration it prints
    effective = result.stdout.lower()
    for line in block.lines():
        name = line.split(":")[0].strip().lower()
        assert f"{name}:" in effective or name == "outaddress", (name, result.stdout)


def test_the_debian_defaults_block_is_the_shipped_file():
    """configuration.md: "Debian's /etc/clamsmtpd.conf (the same file as
    appliance/data/clamsmtpd.conf) sets the following"."""
    shipped = [" ".join(x.split()) for x in SHIPPED_CONF.read_text().splitlines()
               if x.strip() and not x.startswith("#")]
    block = next(b for b in blocks_of("clamsmtpd.conf")
                 if b.page == "docs/configuration.md" and b.lines()[0] == "OutAddress: 10025")
    assert [" ".join(x.split()) for x in block.lines()] == shipped


def test_check_config_of_the_shipped_file():
    for command in documented("test_check_config_of_the_shipped_file"):
        words = command.words
        if "-f" in words:  # /etc/clamsmtpd.conf (what scripts/install puts there), or FILE
            words[words.index("-f") + 1] = str(SHIPPED_CONF)
        else:
            words += ["-f", str(SHIPPED_CONF)]
        result = ok(run(entry_argv(words)))
        assert result.stderr == "", command
        assert "Listen: 127.0.0.1:10026" in result.stdout, result.stdout
    # "every effective value on stdout (in clamsmtpd.conf syntax)": it reads back the same
    again = Path(tempfile.mkstemp(prefix="clamsmtp-docs-", suffix=".conf")[1])
    try:
        again.write_text(result.stdout)
        reread = ok(run([BIN / "clamsmtpd", "--check-config", "-f", again])).stdout
        assert reread.splitlines()[1:] == result.stdout.splitlines()[1:]  # [0]: the file name
    finally:
        again.unlink()


def test_clamsmtpd_v_prints_the_documented_version():
    version = f"clamsmtpd (version {appliance.__version__})"
    for command in documented("test_clamsmtpd_v_prints_the_documented_version"):
        result = ok(run(entry_argv(command.words)))
        assert result.stdout.splitlines()[0] == version, result.stdout
    text = (REPO / "docs" / "configuration.md").read_text()
    assert f"`{version}`" in text, "configuration.md shows another version for -v"
