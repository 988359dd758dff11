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
