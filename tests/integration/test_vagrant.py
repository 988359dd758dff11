"""The Vagrant lab cannot boot here (no VMs): check that its Vagrantfile validates and calls only
provisioning scripts and options that exist (the scripts themselves run in tests/e2e)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

VAGRANT_DIR = Path(__file__).resolve().parents[2] / "vagrant"
VAGRANTFILE = VAGRANT_DIR / "Vagrantfile"


@pytest.mark.skipif(shutil.which("vagrant") is None, reason="vagrant is not installed "
                    "(scripts/setup installs it)")
def test_vagrantfile_validates(tmp_path):
    copy = tmp_path / "Vagrantfile"  # keep vagrant's .vagrant/ state out of the checkout
    copy.write_text(VAGRANTFILE.read_text())
    result = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validated successfully" in result.stdout


def test_vagrantfile_calls_existing_scripts_with_known_options():
    text = VAGRANTFILE.read_text()
    calls = re.findall(r"/vagrant/provision/(\w+\.sh) (up|send)((?:[^\n]|\\\n)*)", text)
    assert {script for script, _, _ in calls} == {"clamd.sh", "gateway.sh", "mailserver.sh",
                                                  "client.sh"}
    for script, _, args in calls:
        path = VAGRANT_DIR / "provision" / script
        assert path.exists() and path.stat().st_mode & 0o111, script
        usage = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True,
                               timeout=30).stdout
        for option in re.findall(r"(--[a-z][a-z0-9-]*)", args):
            assert option in usage, f"{script} does not document {option}"
    assert "/scripts/install --venv /opt/clamsmtp" in text


def _lab_python(bin_dir: Path, path: str) -> subprocess.CompletedProcess[str]:
    script = bin_dir.parent / "which-python.sh"  # sourced from a script, as the provisioners do
    script.write_text(f'set -euo pipefail\nsource "{VAGRANT_DIR}/provision/lib.sh"\nlab_python\n')
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60,
                          env={"PATH": path, "CLAMSMTP_BIN": str(bin_dir)})


def _python_stub(directory: Path, has_aiosmtpd: bool) -> Path:
    directory.mkdir()
    stub = directory / ("python" if directory.name == "venv" else "python3")
    stub.write_text(f"#!/bin/sh\nexit {0 if has_aiosmtpd else 1}\n")
    stub.chmod(0o755)
    return stub


def test_the_sink_runs_on_a_python_with_aiosmtpd_when_the_product_venv_has_none(tmp_path):
    # scripts/install's venv (the Vagrantfile's fallback when no .deb is built) has no aiosmtpd:
    # the product does not need it, the lab's mail server does (Debian's python3-aiosmtpd has it).
    _python_stub(tmp_path / "venv", has_aiosmtpd=False)
    system = _python_stub(tmp_path / "system", has_aiosmtpd=True)
    found = _lab_python(tmp_path / "venv", f"{system.parent}:/usr/bin:/bin")
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == str(system)

    bare = _python_stub(tmp_path / "bare", has_aiosmtpd=False)  # first python3 on PATH
    missing = _lab_python(tmp_path / "venv", f"{bare.parent}:/usr/bin:/bin")
    assert missing.returncode != 0
    assert "apt-get install python3-aiosmtpd" in missing.stderr
