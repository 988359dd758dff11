"""The Debian package clamsmtp (debian/, scripts/build-deb; issue #18).

One .deb is built per test session with `scripts/build-deb` (into dist/) and shared. Its
contents and lintian are checked here; installing it is checked as root on a throwaway
brand-new Debian 12 root from `scripts/fresh` (tests/freshroot.py: cached debootstrap, a new
copy per run), where apt fetches the dependencies from Debian's mirror, so these tests are slow
(a few minutes each) and skip where that root cannot be made:

- a new install: the commands, the shipped config passes --check-config, the manual pages, the
  user, the spool, the units (clamsmtpd enabled, clamsmtp-netsetup not), the daemon starts and
  greets as user clamsmtp; then purge: nothing of the package is left (dpkg's list of its
  files, looked at one by one), the user stays;
- the upgrade from Debian's own clamsmtp 1.10 with an edited /etc/clamsmtpd.conf: the edit is
  kept and passes --check-config, the user is the same, the init script is gone; then remove
  (config and spool stay) and purge (they go; clamav is taken out of the clamsmtp group).

Each root's commands are one bash script that stops at the first failing check and says which.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from freshroot import needs_fresh, run_fresh
from helpers import free_port

REPO = Path(__file__).resolve().parents[2]
BUILD_DEB = REPO / "scripts" / "build-deb"
VERSION = subprocess.run(["dpkg-parsechangelog", "-l", str(REPO / "debian" / "changelog"),
                          "-S", "Version"], capture_output=True, text=True).stdout.strip() \
    if shutil.which("dpkg-parsechangelog") else "2.0.0-1"
DEB_NAME = f"clamsmtp_{VERSION}_all.deb"
DEB_IN_ROOT = f"/root/files/{DEB_NAME}"

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None,
                                reason="needs dpkg (a Debian machine)")


def _inside_a_fresh_root() -> bool:
    try:  # scripts/fresh names its roots so
        return Path("/etc/hostname").read_text().strip() == "fresh-debian"
    except OSError:
        return False


not_nested = pytest.mark.skipif(
    _inside_a_fresh_root(), reason="already in a scripts/fresh root (scripts/fresh running the "
    "suite): a root in it would debootstrap again (minutes, 2 GB); the host's run checks this")


@pytest.fixture(scope="session")
def deb() -> Path:
    """The package, built once per session (scripts/build-deb installs its build tools)."""
    built = subprocess.run([str(BUILD_DEB), "--no-lintian"], capture_output=True, text=True,
                           timeout=1200)
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    path = REPO / "dist" / DEB_NAME
    assert path.is_file(), built.stdout
    return path


def deb_files(deb: Path) -> list[str]:
    listing = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True,
                             check=True).stdout
    names = subprocess.run(["tar", "-t"], input=listing, capture_output=True, check=True)
    return [name.decode().removeprefix(".") for name in names.stdout.splitlines()]


def test_the_package_holds_the_programs_config_units_and_pages_not_the_lab(deb):
    files = set(deb_files(deb))
    for path in ("/usr/sbin/clamsmtpd", "/usr/sbin/clamsmtp-netsetup", "/etc/clamsmtpd.conf",
                 "/etc/default/clamsmtp-netsetup", "/lib/systemd/system/clamsmtpd.service",
                 "/lib/systemd/system/clamsmtp-netsetup.service",
                 "/usr/share/man/man8/clamsmtpd.8.gz", "/usr/share/man/man5/clamsmtpd.conf.5.gz",
                 "/usr/share/man/man8/clamsmtp-netsetup.8.gz",
                 "/usr/share/clamsmtp/appliance/cli.py", "/usr/share/clamsmtp/netsetup/cli.py",
                 "/etc/logcheck/ignore.d.server/clamsmtp"):
        assert path in files, path
    assert not [f for f in files if "/lab/" in f or f.endswith("/lab")]  # the lab kit stays out
    assert not [f for f in files if "dist-packages" in f or f.startswith("/usr/bin/")]


def test_the_units_run_the_packaged_programs(deb, tmp_path):
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path)], check=True)
    units = tmp_path / "lib" / "systemd" / "system"
    for unit in ("clamsmtpd.service", "clamsmtp-netsetup.service"):
        text = (units / unit).read_text()
        assert "/usr/local" not in text and "scripts/install" not in text, unit
        assert re.search(r"^ExecStart=/usr/sbin/clamsmtp", text, re.M), unit


def test_control_depends_on_debians_libraries(deb):
    depends = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True,
                             text=True, check=True).stdout
    for dep in ("python3-iptables", "python3-pyroute2", "python3-prometheus-client", "adduser"):
        assert dep in depends
    assert "aiosmtpd" not in depends  # the relay owns its client connection (docs/dev/relay.md)
    assert "pyclamd" not in depends  # the scanner speaks INSTREAM itself (docs/dev/scanner.md)
    recommends = subprocess.run(["dpkg-deb", "-f", str(deb), "Recommends"], capture_output=True,
                                text=True, check=True).stdout
    assert "clamav-daemon" in recommends


@pytest.mark.skipif(shutil.which("lintian") is None, reason="needs lintian (scripts/build-deb "
                    "installs it)")
def test_lintian_is_clean(deb):
    result = subprocess.run(["lintian", "--fail-on", "error,warning", str(deb)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not re.search(r"^[EW]: ", result.stdout, re.M), result.stdout


# The checks in a fresh root: bash, stop at the first failure and name it.
PRELUDE = r"""
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
check() { echo "CHECK $*"; }
fail() { echo "FAILED: $*"; exit 1; }
# as in any chroot: maintainer scripts do not start services (there is no systemd as PID 1)
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
apt-get update -q >/dev/null
apt_install() { apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@"; }
nothing_left() {  # nothing_left LISTFILE: none of the files dpkg listed exists any more
    local left=""
    while read -r path; do
        [ "$path" != /. ] || continue
        if [ -d "$path" ] && { [ -L "$path" ] || dpkg-query -S "$path" >/dev/null 2>&1; }; then
            continue  # a directory other packages own too (/etc/default), or /lib -> usr/lib
        fi
        if [ -e "$path" ] || [ -L "$path" ]; then left="$left $path"; fi
    done < "$1"
    [ -z "$left" ] || fail "left after purge:$left"
    check "every file dpkg listed is gone ($(wc -l < "$1") listed)"
}
"""

NEW_INSTALL = PRELUDE + r"""
apt_install man-db >/dev/null
apt_install @DEB@
[ "$(dpkg-query -W -f='${Status} ${Version}' clamsmtp)" = "install ok installed @VERSION@" ] \
    || fail "dpkg status: $(dpkg-query -W -f='${Status} ${Version}' clamsmtp)"
check "installed @VERSION@"
out="$(clamsmtpd -v)" || fail "clamsmtpd -v"
[[ "$out" == "clamsmtpd (version "* ]] || fail "clamsmtpd -v: $out"
check "clamsmtpd -v: ${out%%$'\n'*}"
clamsmtpd --check-config -f /etc/clamsmtpd.conf >/dev/null || fail "--check-config"
check "the shipped config passes --check-config"
out="$(clamsmtp-netsetup --help)" || fail "clamsmtp-netsetup --help"
[[ "$out" == "usage: clamsmtp-netsetup"* ]] || fail "clamsmtp-netsetup --help: $out"
check "clamsmtp-netsetup --help"
for page in clamsmtpd.8 clamsmtpd.conf.5 clamsmtp-netsetup.8; do
    name="${page%.*}"; section="${page##*.}"
    [ "$(man -w "$section" "$name")" = "/usr/share/man/man$section/$page.gz" ] || fail "man $page"
    man "$section" "$name" > /root/page 2>/dev/null || fail "man $page renders"
    grep -q 'clamsmtp' /root/page || fail "man $page: $(head -5 /root/page)"
done
check "man clamsmtpd, clamsmtpd.conf, clamsmtp-netsetup"
getent passwd clamsmtp >/dev/null && getent group clamsmtp >/dev/null || fail "user"
check "user and group clamsmtp"
[ "$(stat -c '%a %U %G' /var/spool/clamsmtp)" = "700 clamsmtp clamsmtp" ] || fail "spool"
check "spool 0700 clamsmtp"
[ "$(systemctl is-enabled clamsmtpd.service || true)" = enabled ] || fail "clamsmtpd not enabled"
[ "$(systemctl is-enabled clamsmtp-netsetup.service || true)" = disabled ] \
    || fail "clamsmtp-netsetup: $(systemctl is-enabled clamsmtp-netsetup.service || true)"
check "clamsmtpd.service enabled, clamsmtp-netsetup.service installed, not enabled"
# started as root without systemd, as docs/install.md says: it detaches once it serves, as
# User: clamsmtp (on a free port of the host's network namespace, which the root shares)
# with a next hop that only greets (the daemon says 220 once its next hop did)
python3 -c 'import socket, time; s = socket.create_server(("127.0.0.1", @PORT2@)); c, _ = s.accept()
c.sendall(b"220 nexthop.test ESMTP\r\n"); time.sleep(30)' >/dev/null 2>&1 &
sed -e 's/^Listen: .*/Listen: 127.0.0.1:@PORT@/' -e 's/^OutAddress: .*/OutAddress: @PORT2@/' \
    /etc/clamsmtpd.conf > /etc/clamsmtpd-test.conf
install -d -o clamsmtp -g clamsmtp /run/clamsmtp
clamsmtpd -f /etc/clamsmtpd-test.conf || fail "clamsmtpd did not start"
greeting="$(python3 -c 'import socket; s = socket.create_connection(("127.0.0.1", @PORT@), 10)
print(s.recv(512).decode().strip())')" || fail "no greeting"
[[ "$greeting" == "220 "* ]] || fail "greeting: $greeting"
pid="$(cat /run/clamsmtp/clamsmtpd.pid)"
euid="$(awk '/^Uid:/ { print $3 }' "/proc/$pid/status")"
[ "$euid" = "$(id -u clamsmtp)" ] || fail "the daemon runs as uid $euid"
check "clamsmtpd started from the package, as clamsmtp: $greeting"
kill "$pid"
for _ in $(seq 50); do [ -e "/proc/$pid" ] || break; sleep 0.2; done
rm /etc/clamsmtpd-test.conf
kill %1
dpkg -L clamsmtp > /root/listed
apt-get purge -y -q clamsmtp >/dev/null
dpkg-query -W -f='${db:Status-Abbrev}' clamsmtp 2>/dev/null | grep -q '^i' && fail "still installed"
check "purged: dpkg: $(dpkg-query -W -f='${db:Status-Abbrev}' clamsmtp 2>&1 || true)"
nothing_left /root/listed
for path in /etc/clamsmtpd.conf /etc/default/clamsmtp-netsetup /var/spool/clamsmtp \
            /var/run/clamsmtp /usr/share/clamsmtp; do
    [ ! -e "$path" ] || fail "$path left after purge"
done
check "no config, spool, run directory or modules left"
getent passwd clamsmtp >/dev/null || fail "the user went (Debian's clamsmtp keeps it)"
check "the user stays, as with Debian's clamsmtp"
echo ALL-CHECKS-PASSED
"""

UPGRADE = PRELUDE + r"""
apt_install clamsmtp >/dev/null
old="$(dpkg-query -W -f='${Version}' clamsmtp)"
[ -x /etc/init.d/clamsmtp ] && dpkg --compare-versions "$old" lt 2 || fail "no Debian clamsmtp"
check "Debian's clamsmtp $old"
adduser --quiet clamav clamsmtp 2>/dev/null || true  # (its postinst does this when clamav exists)
uid="$(id -u clamsmtp)"
sed -i -e 's/^Listen: .*/Listen: 127.0.0.1:10099/' /etc/clamsmtpd.conf
printf '# edited by the admin\nAction: bounce\n' >> /etc/clamsmtpd.conf
sum="$(sha256sum < /etc/clamsmtpd.conf)"
check "config edited"
apt_install @DEB@
[ "$(dpkg-query -W -f='${Version}' clamsmtp)" = @VERSION@ ] || fail "not upgraded"
check "upgraded to @VERSION@"
[ "$(sha256sum < /etc/clamsmtpd.conf)" = "$sum" ] || fail "the edited config was replaced"
check "the edited /etc/clamsmtpd.conf is kept"
clamsmtpd --check-config -f /etc/clamsmtpd.conf > /root/described || fail "--check-config"
grep -q '^Listen: 127.0.0.1:10099$' /root/described && grep -q '^Action: bounce$' /root/described \
    || fail "the edit is not what --check-config shows"
check "it passes --check-config with the edits"
[ "$(id -u clamsmtp)" = "$uid" ] || fail "the user changed"
check "the user is the same (uid $uid)"
[ ! -e /etc/init.d/clamsmtp ] || fail "the old init script is left"
ls /etc/rc*.d/*clamsmtp 2>/dev/null && fail "the old init script's links are left"
check "the old init script and its links are gone"
[ "$(stat -c '%a %U' /var/spool/clamsmtp)" = "700 clamsmtp" ] || fail "spool"
check "spool 0700"
dpkg -L clamsmtp > /root/listed
apt-get remove -y -q clamsmtp >/dev/null
[ -f /etc/clamsmtpd.conf ] && [ -d /var/spool/clamsmtp ] || fail "remove took config or spool"
[ ! -e /usr/sbin/clamsmtpd ] || fail "remove left /usr/sbin/clamsmtpd"
check "removed: config and spool stay, the program goes"
apt-get purge -y -q clamsmtp >/dev/null
dpkg-query -W -f='${db:Status-Abbrev}' clamsmtp 2>/dev/null | grep -q '^[ir]' && fail "still known"
check "purged"
nothing_left /root/listed
for path in /etc/clamsmtpd.conf /etc/clamsmtpd.conf.dpkg-dist /etc/default/clamsmtp-netsetup \
            /var/spool/clamsmtp /var/run/clamsmtp /usr/share/clamsmtp /usr/sbin/clamsmtpd \
            /etc/init.d/clamsmtp; do
    [ ! -e "$path" ] || fail "$path left after purge"
done
check "no config, spool, run directory, modules or program left"
getent passwd clamsmtp >/dev/null || fail "the user went (Debian's clamsmtp keeps it)"
getent group clamsmtp | cut -d: -f4 | tr ',' '\n' | grep -qx clamav && fail "clamav in the group"
check "the user stays, clamav is out of its group, as Debian's clamsmtp does"
echo ALL-CHECKS-PASSED
"""


def in_fresh_root(script: str, deb: Path) -> str:
    script = script.replace("@DEB@", DEB_IN_ROOT).replace("@VERSION@", VERSION)
    script = script.replace("@PORT@", str(free_port())).replace("@PORT2@", str(free_port()))
    result = run_fresh(script, copy=[deb], checkout=False, timeout=1800)
    log = result.logs[0] if result.logs else ""
    assert result.returncode == 0 and "ALL-CHECKS-PASSED" in log, \
        result.stdout + "\n" + log[-8000:]
    return log


@pytest.mark.root
@needs_fresh
@not_nested
def test_new_install_then_purge_leaves_nothing(deb):
    log = in_fresh_root(NEW_INSTALL, deb)
    assert "CHECK every file dpkg listed is gone" in log


@pytest.mark.root
@needs_fresh
@not_nested
def test_upgrade_from_debians_clamsmtp_keeps_the_edited_config_then_remove_and_purge(deb):
    log = in_fresh_root(UPGRADE, deb)
    assert "CHECK the edited /etc/clamsmtpd.conf is kept" in log
