"""The local lab: real parts to run the appliance against, for people and for the tests.

Not part of the product: it imports `appliance` (and runs `clamsmtp-netsetup`), the tests and
scripts/lab, netlab and bench import it, never the other way round; the wheel and the .deb leave
it out, and scripts/setup puts the checkout on the dev venv's path for it (docs/dev/lab.md).

- `PrivateClamd` (clamd.py): clamd with a one-line EICAR database on a private socket.
- `RecordingNextHop` (sink.py): an aiosmtpd server that records what it receives and can be
  scripted to refuse.
- `DelayLine` (delayline.py): a TCP relay holding each chunk N ms each way, a WAN on loopback.
- `daemon_argv()`: how to start the daemon under test in the foreground.
- `python -m lab` / `scripts/lab` (__main__.py): all of it wired together.
- `python -m lab.clamdrun` / `.sinkrun`: PrivateClamd and a RecordingNextHop that
  stores each message as files, as long-running programs for vagrant/provision/*.sh.
- `python -m lab.netlab` / `scripts/netlab` (netlab.py): the transparent gateway end
  to end in network namespaces, built with those provisioning scripts (root only); its
  `NetLab` is in netgateway.py, the topology and requirements in nettopo.py.
"""

from __future__ import annotations

import subprocess
import sys

from .clamd import EICAR, PrivateClamd, eicar_bytes, free_tcp_port
from .sink import Received, RecordingNextHop

__all__ = [
    "EICAR",
    "PrivateClamd",
    "Received",
    "RecordingNextHop",
    "daemon_argv",
    "eicar_bytes",
    "free_tcp_port",
    "stop_process",
]


def daemon_argv(conf_path: str, *, debug_level: int = 3, reference: bool = False) -> list[str]:
    """The command that runs the daemon in the foreground on `conf_path`.

    `reference=True` runs the C clamsmtpd of the Debian clamsmtp package instead of this
    project's daemon, to compare behaviour with the original.
    """
    if reference:
        # not shutil.which: with the venv on PATH it would find our own console script
        binary = "/usr/sbin/clamsmtpd"
        return [binary, "-d", str(debug_level), "-f", str(conf_path)]
    return [sys.executable, "-m", "appliance.cli", "-d", str(debug_level), "-f", str(conf_path)]


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after `timeout`; the exit status (negative: killed by a signal)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
