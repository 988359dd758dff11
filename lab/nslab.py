"""Network-namespace lab for root-only tests (netsetup now, the daemon's end-to-end tests later).

Only documentation address ranges are used (RFC 5737 / RFC 3849), and only inside namespaces
created here; no test traffic leaves them.  Everything is created with unique names and removed
by ``destroy``/the context managers, also when a test fails.

    client ns   c0 192.0.2.10/24      2001:db8:1::10/64   default via the gateway
      └─veth─ gateway ns  g0 192.0.2.1/24     2001:db8:1::1/64
                          g1 198.51.100.1/24  2001:db8:2::1/64  (IPv4 and IPv6 forwarding on)
                └─veth─ server ns  s0 198.51.100.25/24  2001:db8:2::25/64  default via the gateway

``lab/netlab.py`` (``scripts/netlab``, tests/e2e) builds its gateway lab with it too.

Use it with ``from lab import nslab`` (the lab package of the source checkout; see lab/__init__.py).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 60

CLIENT_V4, GATEWAY_IN_V4 = "192.0.2.10", "192.0.2.1"
GATEWAY_OUT_V4, SERVER_V4 = "198.51.100.1", "198.51.100.25"
CLIENT_V6, GATEWAY_IN_V6 = "2001:db8:1::10", "2001:db8:1::1"
GATEWAY_OUT_V6, SERVER_V6 = "2001:db8:2::1", "2001:db8:2::25"


def unavailable_reason(*commands: tuple[str, str]) -> str | None:
    """Why namespace tests cannot run here, or None when they can; `commands` are further
    (command, what provides it) pairs the tests need."""
    for command, provider in commands:
        if os.geteuid() == 0 and shutil.which(command) is None:
            return f"needs {command} ({provider})"
    if os.geteuid() != 0:
        return "needs root (network namespaces and netfilter changes)"
    if shutil.which("ip") is None:
        return "needs `ip` from iproute2"
    probe = unique_name("csprobe")
    result = subprocess.run(
        ["ip", "netns", "add", probe], capture_output=True, text=True, timeout=TIMEOUT
    )
    if result.returncode != 0:
        return f"`ip netns add` does not work here: {result.stderr.strip()}"
    destroy_namespace(probe)
    return None


def unique_name(prefix: str = "cs") -> str:
    return f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"


def ip(*args: str) -> None:
    """Run ``ip ARGS`` in the current namespace; raise with its stderr on failure."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=TIMEOUT)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def run_in(
    ns: str,
    argv: Sequence[str],
    *,
    check: bool = False,
    input: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside namespace ``ns`` (``ip netns exec``), capturing text output."""
    result = subprocess.run(
        ["ip", "netns", "exec", ns, *argv],
        capture_output=True,
        text=True,
        input=input,
        env=env,
        cwd=REPO_ROOT,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise RuntimeError(
            f"in {ns}: {' '.join(argv)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


def popen_in(ns: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
    """Start ``argv`` inside ``ns``; the caller must kill and wait for it."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    kwargs.setdefault("text", True)
    return subprocess.Popen(["ip", "netns", "exec", ns, *argv], cwd=REPO_ROOT, **kwargs)


def python_in(ns: str, code: str, *args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return run_in(ns, [sys.executable, "-c", code, *args], **kwargs)


def set_sysctl(ns: str, key: str, value: str) -> None:
    path = "/proc/sys/" + key.replace(".", "/")
    run_in(ns, ["sh", "-c", f"echo {value} > {path}"], check=True)


def create_namespace(name: str | None = None) -> str:
    """A new namespace with loopback up; returns its name."""
    name = name or unique_name()
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
    except Exception:
        destroy_namespace(name)
        raise
    return name


def destroy_namespace(name: str) -> None:
    """Remove ``name`` (its veths go with it); no error if it is already gone."""
    result = subprocess.run(
        ["ip", "netns", "del", name], capture_output=True, text=True, timeout=TIMEOUT
    )
    if result.returncode != 0 and os.path.exists(f"/run/netns/{name}"):
        raise RuntimeError(f"ip netns del {name}: {result.stderr.strip()}")


def namespace_pids(name: str) -> list[int]:
    """The processes running inside namespace ``name`` (``ip netns pids``); [] if it is gone."""
    result = subprocess.run(
        ["ip", "netns", "pids", name], capture_output=True, text=True, timeout=TIMEOUT
    )
    return sorted(int(pid) for pid in result.stdout.split() if pid.isdigit())


def kill_processes(name: str, timeout: float = 5.0) -> list[int]:
    """End every process still inside namespace ``name``: SIGTERM, SIGKILL after ``timeout``.

    ``ip netns del`` does not end them: they would keep the namespace alive, unnamed. Call this
    before ``destroy_namespace`` for a namespace something was started in (daemons started in
    the background by scripts run with ``ip netns exec``). Returns the pids it found.
    """
    found = [pid for pid in namespace_pids(name) if pid != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in namespace_pids(name):
            if pid != os.getpid():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while namespace_pids(name) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not namespace_pids(name):
            break
    return found


def veth(ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
    """A veth pair created directly inside the namespaces (no name clash in the caller's)."""
    ip("-n", ns_a, "link", "add", name_a, "type", "veth", "peer", "name", name_b, "netns", ns_b)
    ip("-n", ns_a, "link", "set", name_a, "up")
    ip("-n", ns_b, "link", "set", name_b, "up")


def address(ns: str, dev: str, cidr: str) -> None:
    extra = ["nodad"] if ":" in cidr else []  # usable at once, no duplicate detection wait
    ip("-n", ns, "addr", "add", cidr, "dev", dev, *extra)


def default_route(ns: str, via: str, dev: str | None = None) -> None:
    family = "-6" if ":" in via else "-4"
    ip("-n", ns, family, "route", "add", "default", "via", via, *(["dev", dev] if dev else []))


@dataclass
class GatewayLab:
    """Three namespaces: client -> gateway -> server (names are unique per lab)."""

    client: str
    gateway: str
    server: str
    gateway_in: str = "g0"  # towards the client
    gateway_out: str = "g1"  # towards the server

    @property
    def namespaces(self) -> tuple[str, str, str]:
        return self.client, self.gateway, self.server

    def destroy(self) -> None:
        for ns in self.namespaces:
            destroy_namespace(ns)


def create_gateway_lab(prefix: str = "cs") -> GatewayLab:
    tag = f"{os.getpid()}-{secrets.token_hex(3)}"
    lab = GatewayLab(f"{prefix}c-{tag}", f"{prefix}g-{tag}", f"{prefix}s-{tag}")
    created = []
    try:
        for ns in lab.namespaces:
            created.append(create_namespace(ns))
        veth(lab.client, "c0", lab.gateway, lab.gateway_in)
        veth(lab.gateway, lab.gateway_out, lab.server, "s0")
        address(lab.client, "c0", f"{CLIENT_V4}/24")
        address(lab.client, "c0", f"{CLIENT_V6}/64")
        address(lab.gateway, lab.gateway_in, f"{GATEWAY_IN_V4}/24")
        address(lab.gateway, lab.gateway_in, f"{GATEWAY_IN_V6}/64")
        address(lab.gateway, lab.gateway_out, f"{GATEWAY_OUT_V4}/24")
        address(lab.gateway, lab.gateway_out, f"{GATEWAY_OUT_V6}/64")
        address(lab.server, "s0", f"{SERVER_V4}/24")
        address(lab.server, "s0", f"{SERVER_V6}/64")
        for ns, v4, v6 in (
            (lab.client, GATEWAY_IN_V4, GATEWAY_IN_V6),
            (lab.server, GATEWAY_OUT_V4, GATEWAY_OUT_V6),
        ):
            default_route(ns, v4)
            default_route(ns, v6)
        set_sysctl(lab.gateway, "net.ipv4.ip_forward", "1")
        set_sysctl(lab.gateway, "net.ipv6.conf.all.forwarding", "1")
    except BaseException:
        for ns in created:
            destroy_namespace(ns)
        raise
    return lab


@contextlib.contextmanager
def gateway_lab(prefix: str = "cs") -> Iterator[GatewayLab]:
    lab = create_gateway_lab(prefix)
    try:
        yield lab
    finally:
        lab.destroy()


def create_router_namespace(prefix: str = "csr") -> str:
    """One namespace that looks like a small gateway, for rule-set tests.

    A veth pair with both ends inside: ``lan0`` (192.0.2.1/24, 2001:db8:1::1/64) and ``wan0``
    (198.51.100.1/24, 2001:db8:2::1/64) carrying the IPv4 and IPv6 default routes (to
    198.51.100.254 / 2001:db8:2::254, which do not exist: nothing is sent).  Discovery should
    pick lan0 only.
    """
    ns = create_namespace(unique_name(prefix))
    try:
        veth(ns, "lan0", ns, "wan0")
        address(ns, "lan0", "192.0.2.1/24")
        address(ns, "lan0", "2001:db8:1::1/64")
        address(ns, "wan0", "198.51.100.1/24")
        address(ns, "wan0", "2001:db8:2::1/64")
        default_route(ns, "198.51.100.254", "wan0")
        default_route(ns, "2001:db8:2::254", "wan0")
    except BaseException:
        destroy_namespace(ns)
        raise
    return ns


@contextlib.contextmanager
def router_namespace(prefix: str = "csr") -> Iterator[str]:
    """`create_router_namespace`, and afterwards whatever still runs in it killed and the
    namespace removed."""
    ns = create_router_namespace(prefix)
    try:
        yield ns
    finally:
        kill_processes(ns)
        destroy_namespace(ns)
