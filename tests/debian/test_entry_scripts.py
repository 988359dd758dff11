"""The package's entry scripts (debian/bin/) run the real command, as /usr/sbin/... would.

Found by the Vagrant lab (issue #20): the packaged clamsmtp-netsetup called main() at import,
and the xtables backend's workers (multiprocessing's spawn) import the main script again, so
`clamsmtp-netsetup enable` died ("IPv4 xtables worker died during check_rules"). Here each
script runs from a copy whose /usr/share/clamsmtp is this checkout, in a throwaway network
namespace.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.root
def test_packaged_netsetup_enables_with_the_xtables_workers(tmp_path):
    script = tmp_path / "clamsmtp-netsetup"
    script.write_text((REPO / "debian" / "bin" / "clamsmtp-netsetup").read_text()
                      .replace("/usr/share/clamsmtp", str(REPO)))
    ns = f"debentry-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "add", "eth1", "type", "veth", "peer", "name",
                        "eth2"], check=True)
        result = subprocess.run(["ip", "netns", "exec", ns, sys.executable, str(script),
                                 "enable", "-i", "eth1", "--proxy-port", "10025"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "enabled: TCP 25 on eth1 -> port 10025" in result.stdout
    finally:
        subprocess.run(["ip", "netns", "del", ns])


def test_entry_scripts_call_main_only_when_run():
    for name in ("clamsmtpd", "clamsmtp-netsetup"):
        text = (REPO / "debian" / "bin" / name).read_text()
        assert 'if __name__ == "__main__":\n    sys.exit(main())' in text, name
