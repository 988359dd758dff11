"""scripts/install and scripts/uninstall, and the systemd units they install (docs/install.md).

Everything is installed under throwaway directories with `--root DIR --no-apt`, into a fake root
holding copies of the machine's account files (without clamsmtp), so the machine's own /etc,
/opt and /usr/local are never touched; `guard_real_system` checks that at the end. The venv is
built with pip (PyPI or its cache). One fake root is shared, in order, by the tests of the
default install: installed -> installed again (twice harmless, config kept) -> uninstalled ->
purged. The units are also checked with `systemd-analyze verify` and `systemd-analyze security`
(systemd 252), and the daemon is started the way the unit starts it (there is no running
systemd here to start the unit itself).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import free_port

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "scripts" / "install"
UNINSTALL = REPO / "scripts" / "uninstall"
DATA = REPO / "appliance" / "data"
SHIPPED_CONF = DATA / "clamsmtpd.conf"
SHIPPED_DEFAULTS = DATA / "default-clamsmtp-netsetup"
UNITS = ("clamsmtpd.service", "clamsmtp-netsetup.service")
ACCOUNT = "clamsmtp"
ACCOUNT_FILES = {"passwd": 0o644, "group": 0o644, "shadow": 0o640, "gshadow": 0o640}
VENV = "/opt/clamsmtp/venv"
SBIN = "/usr/local/sbin"
PID_FILE = "/run/clamsmtp/clamsmtpd.pid"
DAEMON_EXEC = f"{SBIN}/clamsmtpd -f /etc/clamsmtpd.conf -p {PID_FILE}"
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # Debian's, for root
SCRIPT_TIMEOUT = 600
MAN_DIR = "/usr/local/share/man"
#: The manual pages (appliance/data/man) and where scripts/install puts them.
MAN_PAGES = {name: f"{MAN_DIR}/man{name.rpartition('.')[2]}/{name}"
             for name in ("clamsmtpd.8", "clamsmtpd.conf.5", "clamsmtp-netsetup.8")}

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is missing (Debian package systemd)"
)
DEV_BIN = Path(sys.executable).parent  # the dev venv running these tests has both commands
MAN = shutil.which("man")
needs_man = pytest.mark.skipif(MAN is None, reason="man is missing (Debian package man-db)")


# -- helpers --------------------------------------------------------------------------------


def run(argv: list[str | Path], **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("timeout", SCRIPT_TIMEOUT)
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kwargs)


def run_ok(argv: list[str | Path], **kwargs) -> subprocess.CompletedProcess:
    result = run(argv, **kwargs)
    assert result.returncode == 0, (
        f"{' '.join(map(str, argv))} exited {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result


def install(root: Path, *options: str) -> subprocess.CompletedProcess:
    return run_ok([INSTALL, "--root", root, "--no-apt", *options])


def uninstall(root: Path, *options: str) -> subprocess.CompletedProcess:
    return run_ok([UNINSTALL, "--root", root, *options])


def _without_account(name: str, line: str) -> str | None:
    fields = line.rstrip("\n").split(":")
    if fields[0] == ACCOUNT:
        return None
    if name in ("group", "gshadow"):  # members are the last field
        members = [m for m in fields[-1].split(",") if m and m != ACCOUNT]
        fields[-1] = ",".join(members)
    return ":".join(fields) + "\n"


def make_fake_root(path: Path) -> Path:
    """A root with the machine's account files minus clamsmtp, and login.defs, for useradd."""
    etc = path / "etc"
    etc.mkdir(parents=True)
    for name, mode in ACCOUNT_FILES.items():
        lines = Path("/etc", name).read_text().splitlines(keepends=True)
        kept = [k for k in (_without_account(name, line) for line in lines) if k is not None]
        (etc / name).write_text("".join(kept))
        (etc / name).chmod(mode)
    shutil.copy2("/etc/login.defs", etc / "login.defs")
    return path


def account_line(root: Path, name: str) -> list[str] | None:
    for line in (root / "etc" / name).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == ACCOUNT:
            return fields
    return None


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def inside(root: Path, link: Path) -> Path:
    """Where the absolute link `link` (in the fake root) points, inside the fake root."""
    return root / os.readlink(link).lstrip("/")


def snapshot(root: Path, skip: str = VENV) -> dict[str, tuple]:
    """Every path under `root` except the venv: type, mode, owner and content or link."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = "/" + str(path.relative_to(root))
        if rel == skip or rel.startswith(skip + "/"):
            continue
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            what = ("link", os.readlink(path))
        elif stat.S_ISREG(st.st_mode):
            what = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
        else:
            what = ("dir",)
        found[rel] = (*what, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    return found


def write_dpkg_status(root: Path, package: str) -> Path:
    status = root / "var" / "lib" / "dpkg" / "status"
    status.parent.mkdir(parents=True, exist_ok=True)
    status.write_text(
        f"Package: {package}\nStatus: install ok installed\nVersion: 1.10-17.2\n"
        "Architecture: amd64\nMaintainer: Debian <debian@example.org>\nDescription: test\n\n"
    )
    return status


@contextlib.contextmanager
def greeting_next_hop():
    """A next hop that only greets (220) every connection; yields its port."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"220 next-hop.test ESMTP\r\n")
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    while conn.recv(4096):
                        pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        server.close()


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- the real system stays as it was ----------------------------------------------------------

#: What scripts/install and scripts/uninstall would change on the real system.
GUARDED = ["/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow", "/etc/clamsmtpd.conf",
           "/etc/default/clamsmtp-netsetup", "/etc/systemd/system/clamsmtpd.service",
           "/etc/systemd/system/clamsmtp-netsetup.service", "/opt/clamsmtp",
           "/usr/local/sbin/clamsmtpd", "/usr/local/sbin/clamsmtp-netsetup",
           "/usr/local/bin/clamsmtpd", "/usr/local/bin/clamsmtp-netsetup",
           "/var/spool/clamsmtp", "/run/clamsmtp", *MAN_PAGES.values()]


def _real_system_state() -> dict[str, object]:
    state: dict[str, object] = {}
    for name in GUARDED:
        path = Path(name)
        if not path.exists() and not path.is_symlink():
            state[name] = None
            continue
        st = path.lstat()
        content: str | None = None
        if path.is_symlink():
            content = os.readlink(path)
        elif path.is_file() and os.access(path, os.R_OK):  # /etc/shadow: root only
            content = hashlib.sha256(path.read_bytes()).hexdigest()
        state[name] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid,
                       st.st_mtime_ns, content)
    state["site-packages"] = sorted(p.name for p in Path("/usr/local/lib").glob("python3*/*/*"))
    return state


@pytest.fixture(scope="module", autouse=True)
def guard_real_system():
    before = _real_system_state()
    yield
    assert _real_system_state() == before, "the tests changed the real system"


# -- the units as shipped (no root needed) ----------------------------------------------------


def test_units_have_the_documented_settings():
    daemon = unit_settings((DATA / "systemd" / "clamsmtpd.service").read_text())
    expected = {
        "After": "network.target clamav-daemon.service",
        "Wants": "clamav-daemon.service",
        "Conflicts": "clamsmtp.service",
        "Type": "forking",
        "PIDFile": PID_FILE,
        "ExecStart": DAEMON_EXEC,
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "Restart": "on-failure",
        "User": ACCOUNT,
        "Group": ACCOUNT,
        "RuntimeDirectory": "clamsmtp",
        "UMask": "0077",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "ProtectSystem": "strict",
        "ReadWritePaths": "/var/spool/clamsmtp",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "ProtectClock": "yes",
        "ProtectHostname": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "SystemCallArchitectures": "native",
        "SystemCallFilter": "@system-service",
        "WantedBy": "multi-user.target",
    }
    assert {key: daemon.get(key) for key in expected} == {k: [v] for k, v in expected.items()}
    assert "AmbientCapabilities" not in daemon  # documented as a drop-in for ports < 1024

    netsetup = unit_settings((DATA / "systemd" / "clamsmtp-netsetup.service").read_text())
    expected = {
        "Type": "oneshot",
        "RemainAfterExit": "yes",
        "EnvironmentFile": "-/etc/default/clamsmtp-netsetup",
        "ExecStart": f"{SBIN}/clamsmtp-netsetup enable $NETSETUP_ARGS",
        "ExecReload": f"{SBIN}/clamsmtp-netsetup enable $NETSETUP_ARGS",
        "ExecStop": f"{SBIN}/clamsmtp-netsetup disable $NETSETUP_ARGS",
        "Wants": "network-online.target",
        # nftables.service flushes the ruleset on start/reload/restart: re-apply ours after it
        "After": "network-online.target clamsmtpd.service nftables.service",
        "PartOf": "nftables.service",
        "ReloadPropagatedFrom": "nftables.service",
        "WantedBy": "multi-user.target",
    }
    assert {key: netsetup.get(key) for key in expected} == {k: [v] for k, v in expected.items()}
    assert "NETSETUP_ARGS" in unit_settings(SHIPPED_DEFAULTS.read_text())


def _verify(units: list[Path]) -> list[str]:
    """`systemd-analyze verify`; the lines it prints about these units (none when clean)."""
    result = run([SYSTEMD_ANALYZE, "verify", *units], cwd=units[0].parent, timeout=60)
    names = [u.name for u in units] + [str(units[0].parent)]
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if any(name in line for name in names)]
    if result.returncode != 0:
        complaints.append(f"exit status {result.returncode}")
    return complaints


def _copies_with_bin(tmp_path: Path, bin_dir: Path, source_dir: Path) -> list[Path]:
    """The units with ExecStart/ExecStop pointing at `bin_dir` (verify wants real programs)."""
    copies = []
    for unit in UNITS:
        copy = tmp_path / unit
        copy.write_text((source_dir / unit).read_text().replace(f"{SBIN}/", f"{bin_dir}/"))
        copies.append(copy)
    return copies


@pytest.fixture
def dev_units(tmp_path) -> list[Path]:
    """Copies of the shipped units, with the dev venv's commands (pip install -e .)."""
    if not all((DEV_BIN / name).exists() for name in ("clamsmtpd", "clamsmtp-netsetup")):
        pytest.skip(f"no clamsmtpd/clamsmtp-netsetup in {DEV_BIN} (pip install -e .)")
    return _copies_with_bin(tmp_path, DEV_BIN, DATA / "systemd")


@needs_systemd_analyze
def test_systemd_analyze_verify_accepts_the_units(dev_units, tmp_path):
    units = dev_units
    assert _verify(units) == []

    # The check is not blind: a misspelt directive is reported (verify still exits 0 then).
    bad = tmp_path / "bad" / "clamsmtpd.service"
    bad.parent.mkdir()
    bad.write_text(units[0].read_text().replace("ProtectClock=", "ProtectClok="))
    assert any("ProtectClok" in line for line in _verify([bad]))


@needs_systemd_analyze
def test_systemd_analyze_security_rates_the_daemon_unit_ok(dev_units):
    unit = dev_units[0]
    result = run([SYSTEMD_ANALYZE, "security", "--offline=true", unit], timeout=60)
    if "--offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
    found = re.search(r"Overall exposure level for clamsmtpd\.service: ([0-9.]+) (\w+)",
                      result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found[1]) <= 2.5, result.stdout  # 1.9 "OK" with systemd 252


DOC = REPO / "docs" / "install.md"
#: Every option of scripts/install and scripts/uninstall that this module runs.
TESTED_OPTIONS = {"--root", "--no-apt", "--venv", "--system", "--purge", "--purge-config"}


def _doc_blocks() -> list[str]:
    return re.findall(r"^ *```\w*\n(.*?)^ *```", DOC.read_text(), flags=re.M | re.S)


def test_the_documented_script_commands_use_tested_options():
    commands = [line.strip() for block in _doc_blocks() for line in block.splitlines()
                if line.strip().startswith(("scripts/install", "scripts/uninstall"))]
    assert commands
    for command in commands:
        options = {word for word in command.split() if word.startswith("--")}
        assert options <= TESTED_OPTIONS, command


@needs_systemd_analyze
def test_the_documented_low_port_drop_in_verifies(dev_units):
    drop_in = next(b for b in _doc_blocks() if "AmbientCapabilities=" in b)
    units = dev_units
    drop_in_dir = units[0].parent / "clamsmtpd.service.d"
    drop_in_dir.mkdir()
    (drop_in_dir / "low-port.conf").write_text(
        "\n".join(line.strip() for line in drop_in.splitlines()) + "\n")
    assert _verify(units) == []
    result = run([SYSTEMD_ANALYZE, "security", "--offline=true", units[0]], timeout=60)
    # the drop-in is read, and merged: the unit may now hold CAP_NET_BIND_SERVICE
    assert "✗ CapabilityBoundingSet=~CAP_NET_(BIND_SERVICE" in result.stdout, result.stdout


@needs_systemd_analyze
def test_the_documented_full_transparency_drop_in_verifies(dev_units):
    """docs/transparent.md's drop-in for TransparentProxy: full gives CAP_NET_ADMIN, and the
    unit without it gives none (the daemon then refuses to start in full mode)."""
    text = (REPO / "docs" / "transparent.md").read_text()
    [drop_in] = [b for b in re.findall(r"^```ini\n(.*?)^```", text, flags=re.M | re.S)
                 if "CAP_NET_ADMIN" in b]
    units = dev_units
    before = run([SYSTEMD_ANALYZE, "security", "--offline=true", units[0]], timeout=60).stdout
    assert "✓ CapabilityBoundingSet=~CAP_NET_ADMIN" in before, before
    drop_in_dir = units[0].parent / "clamsmtpd.service.d"
    drop_in_dir.mkdir()
    (drop_in_dir / "transparent-full.conf").write_text(drop_in)
    assert _verify(units) == []
    after = run([SYSTEMD_ANALYZE, "security", "--offline=true", units[0]], timeout=60).stdout
    assert "✗ CapabilityBoundingSet=~CAP_NET_ADMIN" in after, after
    assert "✓ CapabilityBoundingSet=~CAP_SYS_ADMIN" in after  # nothing else comes with it


# -- the default install (venv in /opt/clamsmtp), one fake root for the whole flow -----------


@dataclass
class FakeRoot:
    root: Path
    results: list[subprocess.CompletedProcess] = field(default_factory=list)
    snapshots: list[dict] = field(default_factory=list)
    notes: dict = field(default_factory=dict)


@pytest.fixture(scope="module")
def installed():
    # Not under pytest's 0700 tmp directory: the daemon test runs the venv as user nobody.
    root = Path(tempfile.mkdtemp(prefix="clamsmtp-install-"))
    try:
        root.chmod(0o755)
        make_fake_root(root)
        state = FakeRoot(root)
        state.results.append(install(root))
        yield state
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def reinstalled(installed):
    """install run twice more: unchanged, then over a changed config and a loosened spool."""
    root = installed.root
    installed.snapshots.append(snapshot(root))
    installed.results.append(install(root))
    installed.snapshots.append(snapshot(root))
    conf = root / "etc" / "clamsmtpd.conf"
    conf.write_text(conf.read_text() + "Listen: 10025\nTransparentProxy: on\n")
    installed.notes["changed_conf"] = conf.read_bytes()
    spool = root / "var" / "spool" / "clamsmtp"
    spool.chmod(0o750)
    os.chown(spool, 0, 0)
    installed.results.append(install(root))
    return installed


@pytest.fixture(scope="module")
def uninstalled(reinstalled):
    root = reinstalled.root
    reinstalled.notes["before_uninstall"] = snapshot(root)
    reinstalled.results.append(uninstall(root))
    reinstalled.notes["after_uninstall"] = snapshot(root, skip="/nothing")
    reinstalled.results.append(uninstall(root))
    reinstalled.notes["after_second_uninstall"] = snapshot(root, skip="/nothing")
    return reinstalled


@pytest.mark.root
def test_install_creates_the_system_user_and_group(installed):
    user = account_line(installed.root, "passwd")
    group = account_line(installed.root, "group")
    assert user is not None and group is not None
    assert user[3] == group[2]  # primary group
    assert user[5:] == ["/var/spool/clamsmtp", "/usr/sbin/nologin"]
    assert int(user[2]) < 1000  # a system account
    assert account_line(installed.root, "shadow")[1].startswith(("!", "*"))  # no password
    assert "user clamsmtp: created" in installed.results[0].stdout


@pytest.mark.root
def test_install_makes_the_spool_0700_for_the_user(installed):
    st = (installed.root / "var/spool/clamsmtp").stat()
    assert stat.S_IMODE(st.st_mode) == 0o700
    assert st.st_uid == int(account_line(installed.root, "passwd")[2])
    assert st.st_gid == int(account_line(installed.root, "group")[2])


@pytest.mark.root
def test_install_puts_the_shipped_config_files_in_place(installed):
    etc = installed.root / "etc"
    assert (etc / "clamsmtpd.conf").read_bytes() == SHIPPED_CONF.read_bytes()
    assert (etc / "default/clamsmtp-netsetup").read_bytes() == SHIPPED_DEFAULTS.read_bytes()
    assert stat.S_IMODE((etc / "clamsmtpd.conf").stat().st_mode) == 0o644


@pytest.mark.root
def test_install_puts_the_units_in_etc_systemd_system(installed):
    unit_dir = installed.root / "etc/systemd/system"
    for unit in UNITS:
        assert (unit_dir / unit).read_text() == (DATA / "systemd" / unit).read_text()
    daemon = unit_settings((unit_dir / "clamsmtpd.service").read_text())
    assert daemon["ExecStart"] == [DAEMON_EXEC]
    netsetup = unit_settings((unit_dir / "clamsmtp-netsetup.service").read_text())
    assert netsetup["ExecStart"] == [f"{SBIN}/clamsmtp-netsetup enable $NETSETUP_ARGS"]
    assert "daemon-reload" not in installed.results[0].stdout  # never with --root


@pytest.mark.root
@needs_systemd_analyze
def test_installed_units_verify_with_the_installed_commands(installed, tmp_path):
    units = _copies_with_bin(tmp_path, installed.root / VENV.lstrip("/") / "bin",
                             installed.root / "etc/systemd/system")
    assert _verify(units) == []


@pytest.mark.root
def test_the_venv_commands_run_and_check_the_installed_config(installed):
    bin_dir = installed.root / VENV.lstrip("/") / "bin"
    version = run_ok([bin_dir / "clamsmtpd", "-v"])
    assert version.stdout.startswith("clamsmtpd (version ")
    run_ok([bin_dir / "clamsmtpd", "--check-config", "-f", installed.root / "etc/clamsmtpd.conf"])
    run_ok([bin_dir / "clamsmtp-netsetup", "--help"])
    # The scripts find their python next to them, so they also run at /opt/... on the target.
    assert (bin_dir / "clamsmtpd").read_text().startswith("#!/bin/sh\n'''exec' ")
    assert str(installed.root) not in (bin_dir / "clamsmtpd").read_text()


@pytest.mark.root
def test_the_sbin_links_point_into_the_venv(installed):
    for name in ("clamsmtpd", "clamsmtp-netsetup"):
        link = installed.root / SBIN.lstrip("/") / name
        assert link.is_symlink()
        assert os.readlink(link) == f"{VENV}/bin/{name}"
        assert os.access(inside(installed.root, link), os.X_OK)
    assert not (installed.root / "usr/sbin").exists()  # Debian's /usr/sbin/clamsmtpd: not ours


def man_pages_in(root: Path) -> dict[str, Path]:
    return {name: root / path.lstrip("/") for name, path in MAN_PAGES.items()}


@pytest.mark.root
def test_install_puts_the_man_pages_in_usr_local_share_man(installed):
    for name, page in man_pages_in(installed.root).items():
        assert page.read_bytes() == (DATA / "man" / name).read_bytes(), page
        assert stat.S_IMODE(page.stat().st_mode) == 0o644
        assert f"manual page {MAN_PAGES[name]}: installed" in installed.results[0].stdout
    # They are package data too (pyproject.toml), so the installed package has them.
    shipped = list((installed.root / VENV.lstrip("/")).glob("lib/python3*/site-packages/"
                                                            "appliance/data/man/*"))
    assert sorted(p.name for p in shipped) == sorted(MAN_PAGES)


@pytest.mark.root
@needs_man
def test_install_puts_the_man_pages_where_man_finds_them(installed):
    """`man -l PAGE` renders each installed page without a warning, and `man NAME` (what
    docs/install.md says) finds it: /usr/local/share/man comes before /usr/share/man, where
    Debian's clamsmtp package has its own clamsmtpd(8) and clamsmtpd.conf(5)."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("MANPATH", "MANOPT", "MAN_KEEP_FORMATTING", "MANPAGER", "PAGER")}
    env.update(MANWIDTH="80", LC_ALL="C.UTF-8")
    man_dir = installed.root / MAN_DIR.lstrip("/")
    for name, page in man_pages_in(installed.root).items():
        stem = name.rpartition(".")[0]
        rendered = run([MAN, "--warnings", "-l", page], env=env, timeout=60)
        assert (rendered.returncode, rendered.stderr) == (0, ""), rendered.stderr
        text = rendered.stdout.replace("\u2212", "-").replace("\u2010", "-")  # \- in UTF-8
        assert re.match(rf"{re.escape(stem.upper())}\(\d\)", text), text[:400]
        assert f"\nNAME\n       {stem} - " in text, text[:400]
        found = run_ok([MAN, "-M", f"{man_dir}:/usr/share/man", "-w", stem], env=env)
        assert found.stdout.strip() == str(page)
        shown = run_ok([MAN, "-M", f"{man_dir}:/usr/share/man", stem], env=env)
        assert shown.stdout == rendered.stdout
    # The real manpath (from PATH, /etc/manpath.config) has /usr/local/share/man first.
    manpath = shutil.which("manpath")
    if manpath:
        dirs = run_ok([manpath], env={**env, "PATH": ROOT_PATH}).stdout.strip().split(":")
        assert dirs.index(MAN_DIR) < dirs.index("/usr/share/man"), dirs


@pytest.mark.root
def test_the_daemon_starts_as_the_unit_starts_it(installed, tmp_path_factory):
    """ExecStart as the unit runs it, with User=/UMask= and a RuntimeDirectory= of its own:
    it returns once the daemon serves (Type=forking), PIDFile names the daemon, the
    ExecReload signal keeps it serving, SIGTERM ends it and removes the pid file."""
    root = installed.root
    work = Path(tempfile.mkdtemp(prefix="run-", dir=root))  # readable by nobody, unlike tmp_path
    work.chmod(0o755)
    run_dir, spool = work / "run", work / "spool"
    for directory in (run_dir, spool):
        directory.mkdir()
        os.chown(directory, 65534, 65534)
    port = free_port()
    conf = work / "clamsmtpd.conf"
    conf.write_text(
        (root / "etc/clamsmtpd.conf").read_text()
        .replace("Listen: 127.0.0.1:10026", f"Listen: 127.0.0.1:{port}")
        .replace("TempDirectory: /var/spool/clamsmtp", f"TempDirectory: {spool}")
        .replace("ClamAddress: /var/run/clamav/clamd.ctl", f"ClamAddress: {work}/clamd.ctl")
        .replace("User: clamsmtp", "User: nobody")
    )
    conf.chmod(0o644)
    pid_file = run_dir / "clamsmtpd.pid"
    daemon = unit_settings((root / "etc/systemd/system/clamsmtpd.service").read_text())
    argv = (daemon["ExecStart"][0]
            .replace(f"{SBIN}/clamsmtpd", str(root / VENV.lstrip("/") / "bin/clamsmtpd"))
            .replace("/etc/clamsmtpd.conf", str(conf))
            .replace(PID_FILE, str(pid_file))).split()
    with greeting_next_hop() as next_hop:
        conf.write_text(conf.read_text().replace("OutAddress: 10025", f"OutAddress: {next_hop}"))
        # stderr to a file: with no syslog here the detached daemon keeps it for its log, and
        # a pipe would not end while it runs
        with open(work / "stderr", "w") as err:
            started = subprocess.run(argv, user="nobody", group="nogroup", extra_groups=[],
                                     umask=0o077, cwd="/", timeout=30, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=err)
        assert started.returncode == 0, (work / "stderr").read_text()
        pid = int(pid_file.read_text())
        try:
            assert alive(pid)
            assert Path(f"/proc/{pid}").stat().st_uid == 65534
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                assert client.recv(512).startswith(b"220 ")
            os.kill(pid, signal.SIGHUP)  # ExecReload
            time.sleep(0.3)
            assert alive(pid)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                assert client.recv(512).startswith(b"220 ")
            os.kill(pid, signal.SIGTERM)  # systemctl stop
            assert wait_until(lambda: not alive(pid), 15)
            assert not pid_file.exists()
        finally:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
            shutil.rmtree(work, ignore_errors=True)


@pytest.mark.root
def test_installing_twice_changes_nothing(reinstalled):
    first, second = reinstalled.snapshots
    assert second == first
    assert "user clamsmtp: exists" in reinstalled.results[1].stdout
    assert "/etc/clamsmtpd.conf: kept" in reinstalled.results[1].stdout
    for path in MAN_PAGES.values():
        assert f"manual page {path}: up to date" in reinstalled.results[1].stdout


@pytest.mark.root
def test_reinstall_keeps_a_changed_config_byte_for_byte(reinstalled):
    root = reinstalled.root
    assert (root / "etc/clamsmtpd.conf").read_bytes() == reinstalled.notes["changed_conf"]
    assert "/etc/clamsmtpd.conf: kept the existing file, not overwritten" in (
        reinstalled.results[2].stdout)


@pytest.mark.root
def test_reinstall_restores_the_spool_mode_and_owner(reinstalled):
    st = (reinstalled.root / "var/spool/clamsmtp").stat()
    assert stat.S_IMODE(st.st_mode) == 0o700
    assert st.st_uid == int(account_line(reinstalled.root, "passwd")[2])


@pytest.mark.root
def test_reinstalled_venv_still_works(reinstalled):
    bin_dir = reinstalled.root / VENV.lstrip("/") / "bin"
    run_ok([bin_dir / "clamsmtpd", "--check-config", "-f",
            reinstalled.root / "etc/clamsmtpd.conf"])


@pytest.mark.root
def test_uninstall_removes_venv_links_and_units(uninstalled):
    root = uninstalled.root
    assert not (root / VENV.lstrip("/")).exists()
    assert not (root / "opt/clamsmtp").exists()
    for name in ("clamsmtpd", "clamsmtp-netsetup"):
        assert not (root / SBIN.lstrip("/") / name).is_symlink()
    for unit in UNITS:
        assert not (root / "etc/systemd/system" / unit).exists()


@pytest.mark.root
def test_uninstall_removes_the_man_pages(uninstalled):
    for page in man_pages_in(uninstalled.root).values():
        assert not page.exists(), page
    for path in MAN_PAGES.values():
        assert f"removed the manual page {path}" in uninstalled.results[3].stdout
    assert "manual page" not in uninstalled.results[4].stdout  # the second run: none left


@pytest.mark.root
def test_uninstall_keeps_a_man_page_that_is_not_ours(tmp_path):
    """A clamsmtpd(8) in /usr/local/share/man that is not ours (the C clamsmtp built from
    source installs there) stays; ours say "clamsmtp for Python" in their .TH line."""
    root = make_fake_root(tmp_path / "root")
    foreign = man_pages_in(root)["clamsmtpd.8"]
    foreign.parent.mkdir(parents=True)
    foreign.write_text('.Dd July, 2004\n.Dt clamsmtpd 8\n.Os clamsmtp\n.Sh NAME\n')
    ours = man_pages_in(root)["clamsmtp-netsetup.8"]
    shutil.copy2(DATA / "man" / "clamsmtp-netsetup.8", ours)
    result = uninstall(root)
    assert foreign.exists() and not ours.exists()
    assert f"kept {MAN_PAGES['clamsmtpd.8']}: not ours" in result.stdout


@pytest.mark.root
def test_uninstall_refuses_while_a_process_runs_from_the_venv(tmp_path):
    """Removing the venv under a running daemon left it serving from deleted files, and the
    uninstall said "done": it refuses now, removing nothing, unless --force."""
    root = make_fake_root(tmp_path / "root")
    venv = root / VENV.lstrip("/")
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    python = venv / "bin" / "python"
    python.symlink_to(sys.executable)
    daemon = subprocess.Popen([python, "-c", "import time; time.sleep(60)"])
    try:
        refused = run([UNINSTALL, "--root", root])
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert f"still running from {VENV}: pid {daemon.pid}" in refused.stderr
        assert "--force" in refused.stderr
        assert python.is_symlink()  # nothing removed
        forced = run_ok([UNINSTALL, "--root", root, "--force"])
        assert f"pid {daemon.pid}; removing anyway (--force)" in forced.stdout
        assert not venv.exists()
    finally:
        daemon.kill()
        daemon.wait()


@pytest.mark.root
def test_uninstall_keeps_config_spool_and_user(uninstalled):
    root = uninstalled.root
    before = uninstalled.notes["before_uninstall"]
    after = uninstalled.notes["after_uninstall"]
    for kept in ("/etc/clamsmtpd.conf", "/etc/default/clamsmtp-netsetup",
                 "/var/spool/clamsmtp", "/etc/passwd", "/etc/group", "/etc/shadow"):
        assert after[kept] == before[kept], kept
    assert account_line(root, "passwd") is not None


@pytest.mark.root
def test_uninstalling_twice_is_harmless(uninstalled):
    assert uninstalled.notes["after_second_uninstall"] == uninstalled.notes["after_uninstall"]


@pytest.mark.root
def test_purge_removes_spool_user_and_only_an_unchanged_config(uninstalled):
    root = uninstalled.root
    conf = root / "etc/clamsmtpd.conf"
    spool = root / "var/spool/clamsmtp"

    # While Debian's clamsmtp package is installed, its config, spool and user are kept.
    status = write_dpkg_status(root, "clamsmtp")
    result = uninstall(root, "--purge")
    assert "Debian's clamsmtp package is installed" in result.stdout
    assert "/run/clamsmtp" in result.stdout  # kept too, as docs/install.md says: said so
    assert conf.exists() and spool.is_dir() and account_line(root, "passwd") is not None
    status.unlink()

    result = uninstall(root, "--purge")
    assert not spool.exists()
    assert account_line(root, "passwd") is None
    assert account_line(root, "group") is None
    assert account_line(root, "shadow") is None
    assert not (root / "etc/default/clamsmtp-netsetup").exists()  # unchanged: removed
    assert conf.read_bytes() == uninstalled.notes["changed_conf"]  # changed: kept
    assert "kept /etc/clamsmtpd.conf: changed" in result.stdout

    uninstall(root, "--purge-config")
    assert not conf.exists()
    uninstall(root, "--purge", "--purge")  # nothing left to do
    assert run([UNINSTALL, "--bogus"]).returncode == 2


# -- other ways to install ------------------------------------------------------------------


@pytest.mark.root
def test_purge_removes_an_unchanged_config(tmp_path):
    root = make_fake_root(tmp_path / "root")
    (root / "etc").mkdir(exist_ok=True)
    shutil.copy2(SHIPPED_CONF, root / "etc/clamsmtpd.conf")
    uninstall(root, "--purge")
    assert not (root / "etc/clamsmtpd.conf").exists()


@pytest.mark.root
def test_custom_venv_directory_and_debian_clamsmtp_spool(tmp_path):
    root = make_fake_root(tmp_path / "root")
    # Debian's clamsmtp package is installed, and its spool is there, too open.
    write_dpkg_status(root, "clamsmtp")
    spool = root / "var/spool/clamsmtp"
    spool.mkdir(parents=True)
    spool.chmod(0o775)
    install(root, "--venv", "/srv/clamsmtp")
    st = spool.stat()
    assert stat.S_IMODE(st.st_mode) == 0o750  # its clamd reads the files through the group
    assert st.st_uid == int(account_line(root, "passwd")[2])
    link = root / SBIN.lstrip("/") / "clamsmtpd"
    assert os.readlink(link) == "/srv/clamsmtp/venv/bin/clamsmtpd"
    run_ok([inside(root, link), "-v"])
    assert not (root / "opt").exists()
    assert all(page.is_file() for page in man_pages_in(root).values())
    uninstall(root, "--venv", "/srv/clamsmtp")
    assert not (root / "srv/clamsmtp").exists() and not link.is_symlink()
    assert not any(page.exists() for page in man_pages_in(root).values())


@pytest.mark.root
def test_system_install_and_uninstall(tmp_path):
    root = make_fake_root(tmp_path / "root")
    result = install(root, "--system")
    assert "--break-system-packages" in result.stdout
    site = run_ok(["/usr/bin/python3", "-c",
                   "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip()
    assert site.startswith("/usr/local/lib/python3")  # Debian's Python reads it; never /usr
    package_dir = root / site.lstrip("/")
    assert (package_dir / "appliance" / "cli.py").exists()
    for name in ("clamsmtpd", "clamsmtp-netsetup"):
        link = root / SBIN.lstrip("/") / name
        assert os.readlink(link) == f"/usr/local/bin/{name}"
        assert inside(root, link).read_text().startswith("#!/usr/bin/python3\n")
    env = {**os.environ, "PYTHONPATH": str(package_dir)}
    run_ok(["/usr/bin/python3", root / "usr/local/bin/clamsmtpd", "--check-config",
            "-f", root / "etc/clamsmtpd.conf"], env=env)
    assert not (root / "opt").exists()
    assert all(page.is_file() for page in man_pages_in(root).values())  # the same place
    assert sorted(p.name for p in (package_dir / "appliance/data/man").iterdir()) == sorted(
        MAN_PAGES)

    uninstall(root, "--purge")
    assert not any(page.exists() for page in man_pages_in(root).values())
    assert not (package_dir / "appliance").exists()
    assert not (root / "usr/local/bin/clamsmtpd").exists()
    assert not list(package_dir.glob("clamsmtp-*.dist-info"))
    assert not (root / SBIN.lstrip("/") / "clamsmtpd").is_symlink()
    assert account_line(root, "passwd") is None
