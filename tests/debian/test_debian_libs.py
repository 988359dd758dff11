"""The code on Debian 12's own libraries, the ones the .deb depends on (issue #18).

pyproject.toml admits them (aiosmtpd 1.4.3, python-iptables 1.0.1, pyroute2 0.7.2,
prometheus-client 0.16), and these tests hold it to that: `scripts/debian-venv` makes one venv,
<repo>/.venv-debian, with Debian's /usr/bin/python3 over the apt packages (built once, reused while
pyproject.toml is unchanged), and a selection of the suite runs in it: the unit tests, the relay's
and the command line's integration tests (aiosmtpd is their next hop), and the
netsetup tests that drive python-iptables in a network namespace. The whole suite runs there with
`scripts/debian-venv && .venv-debian/bin/pytest tests/unit tests/integration tests/netsetup`
(docs/dev/debpkg.md); the selection keeps CI to about a minute.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEBIAN_VENV = REPO / "scripts" / "debian-venv"
PYTHON = REPO / ".venv-debian" / "bin" / "python"
#: Debian 12's versions: what the .deb's Depends give (the security updates included).
DEBIAN_12 = {"aiosmtpd": "1.4.3", "pyclamd": "0.4.0", "python-iptables": "1.0.1",
             "pyroute2": "0.7.2", "prometheus-client": "0.16.0",
             "uvloop": "0.17.0"}  # (Recommends: the daemon's loop there, EventLoop: auto)
SELECTIONS = {
    "unit": ["tests/unit"],
    # (the daemon-mode test is left out: it is timing-sensitive under load, on any library)
    "relay": ["tests/integration/test_proxy.py", "tests/integration/test_cli.py", "--deselect",
              "tests/integration/test_cli.py::test_daemon_mode_detaches_and_writes_a_pid_file"],
}
NETNS_SELECTION = [
    "tests/netsetup/test_netns.py::test_enable_installs_rules_and_status_shows_them",
    "tests/netsetup/test_netns.py::test_nftables_host_forced_iptables_works_and_warns",
    "tests/netsetup/test_netns.py::test_redirected_connection_arrives_with_original_destination",
]


@pytest.fixture(scope="module")
def debian_python() -> Path:
    if not Path("/usr/bin/python3").exists() or shutil.which("dpkg-query") is None:
        pytest.skip("needs Debian's /usr/bin/python3 and dpkg (a Debian 12 machine)")
    if os.geteuid() != 0 and shutil.which("sudo") is None:
        pytest.skip("scripts/debian-venv installs apt packages: needs root or sudo")
    made = subprocess.run([str(DEBIAN_VENV)], capture_output=True, text=True, timeout=900)
    assert made.returncode == 0, made.stdout + made.stderr
    return PYTHON


def run_selection(python: Path, paths: list[str]) -> None:
    result = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *paths],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def test_the_venv_has_debian_12s_libraries(debian_python):
    code = """if True:
        import json, sys, importlib.metadata as m
        import aiosmtpd, iptc, pyroute2, prometheus_client, pyclamd, uvloop
        print(json.dumps({"versions": {n: m.version(n) for n in sys.argv[1:]},
                          "files": [x.__file__ for x in (aiosmtpd, iptc, pyroute2,
                                                         prometheus_client, pyclamd, uvloop)]}))
    """
    found = json.loads(subprocess.run([str(debian_python), "-c", code, *DEBIAN_12], cwd="/",
                                      check=True, capture_output=True, text=True).stdout)
    assert found["versions"] == DEBIAN_12
    assert all(f.startswith("/usr/lib/python3/dist-packages/") for f in found["files"])


@pytest.mark.parametrize("selection", sorted(SELECTIONS))
def test_suite_passes_on_debian_libraries(debian_python, selection):
    run_selection(debian_python, SELECTIONS[selection])


@pytest.mark.root
def test_netsetup_in_a_namespace_passes_on_debian_libraries(debian_python):
    run_selection(debian_python, NETNS_SELECTION)
