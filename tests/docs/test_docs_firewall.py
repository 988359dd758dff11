"""Documented firewall commands (netsetup, sysctl, iptables, nft) in throwaway namespaces."""

from __future__ import annotations

import importlib.util
import os
import re
import secrets
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from docskit import (
    BIN,
    IS_ROOT,
    SHIPPED_CONF,
    SHIPPED_DEFAULTS,
    Block,
    Command,
    documented,
    needs_root,
    ok,
    run,
    script_block,
    sh,
    split_words,
    tool,
    user_exists,
)


def _netns_problem() -> str | None:
    if not IS_ROOT:
        return "needs root"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "needs ip (iproute2) and unshare (util-linux)"
    probe = f"docs-{os.getpid()}-{secrets.token_hex(3)}"
    result = run(["ip", "netns", "add", probe])
    if result.returncode != 0:
        return f"ip netns add does not work here: {result.stderr.strip()}"
    run(["ip", "netns", "del", probe])
    return None


def ip(*args: str) -> None:
    ok(run(["ip", *args]))


class Namespace:
    """A network namespace with a LAN side (`lan`, no default route) and a WAN side (`wan0`,
    the default routes), both ends of one veth pair."""

    def __init__(self, lan: str) -> None:
        self.name = f"docs-{os.getpid()}-{secrets.token_hex(3)}"
        ip("netns", "add", self.name)
        try:
            ip("-n", self.name, "link", "set", "lo", "up")
            ip("-n", self.name, "link", "add", lan, "type", "veth", "peer", "name", "wan0")
            for dev, v4, v6 in ((lan, "192.0.2.1/24", "2001:db8:1::1/64"),
                                ("wan0", "198.51.100.1/24", "2001:db8:2::1/64")):
                ip("-n", self.name, "addr", "add", v4, "dev", dev)
                ip("-n", self.name, "addr", "add", v6, "dev", dev, "nodad")
                ip("-n", self.name, "link", "set", dev, "up")
            ip("-n", self.name, "-4", "route", "add", "default", "via", "198.51.100.254")
            ip("-n", self.name, "-6", "route", "add", "default", "via", "2001:db8:2::254")
        except BaseException:
            self.delete()
            raise

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return run(["ip", "netns", "exec", self.name, *argv], **kwargs)

    def delete(self) -> None:
        run(["ip", "netns", "del", self.name])


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    """A throwaway namespace whose LAN side is `lan0`, as in netsetup.md's examples."""
    problem = _netns_problem()
    if problem:
        pytest.skip(f"network namespaces: {problem}")
    space = Namespace("lan0")
    try:
        yield space
    finally:
        space.delete()


def with_shipped_config(argv: list[str]) -> list[str]:
    """Run `argv` with appliance/data/clamsmtpd.conf (what scripts/install puts in /etc) seen
    at /etc/clamsmtpd.conf, in a private mount namespace: the machine's file is left alone."""
    script = 'if [ -e /etc/clamsmtpd.conf ]; then mount --bind "$0" /etc/clamsmtpd.conf; fi; ' \
             'exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
            str(SHIPPED_CONF), *argv]


def netsetup_args() -> list[str]:
    """$NETSETUP_ARGS as clamsmtp-netsetup.service gets it from the shipped
    /etc/default/clamsmtp-netsetup (EnvironmentFile=, split at spaces)."""
    value = ok(sh(f'. {shlex.quote(str(SHIPPED_DEFAULTS))} && printf %s "$NETSETUP_ARGS"'))
    return value.stdout.split()


def expanded(command: Command) -> list[str]:
    words = []
    for word in command.words:
        words += netsetup_args() if word == "$NETSETUP_ARGS" else [word]
    return words


def _netsetup_groups() -> list[list[Command]]:
    """The commands of one block stay together, in order (a status after its enable); each
    inline command stands alone. The same group twice runs once."""
    groups: dict[tuple[str, ...], list[Command]] = {}
    by_block: dict[Block | None, list[Command]] = {}
    for command in documented("test_netsetup_and_sysctl_commands_in_a_namespace"):
        if command.block is None:
            groups.setdefault((" ".join(expanded(command)),), [command])
        else:
            by_block.setdefault(command.block, []).append(command)
    for commands in by_block.values():
        groups.setdefault(tuple(" ".join(expanded(c)) for c in commands), commands)
    return list(groups.values())


def _run_netsetup_group(commands: list[Command]) -> None:
    space = Namespace("eth1")
    try:
        for command in commands:
            words = expanded(command)
            if words[0] == "sysctl":
                ok(space.run(words))
                key, value = words[-1].split("=")
                assert ok(space.run(["sysctl", "-n", key])).stdout.strip() == value
                continue
            result = space.run(with_shipped_config([str(BIN / words[0]), *words[1:]]))
            assert result.returncode == 0, (str(command), result.stdout, result.stderr)
            assert result.stdout.startswith("backend:"), (str(command), result.stdout)
            if words[1] == "enable":
                assert re.search(r"^enabled: TCP 25 on eth1\b", result.stdout, flags=re.M), (
                    result.stdout)
            if words[1] == "status" and len(commands) > 1:  # right after the enable of its block
                assert re.search(r"\): installed$", result.stdout, flags=re.M), result.stdout
    finally:
        space.delete()


@needs_root
def test_netsetup_and_sysctl_commands_in_a_namespace():
    """The clamsmtp-netsetup and sysctl lines of transparent.md, netsetup.md and install.md, for
    real, on a veth `eth1` of throwaway namespaces (one per block, in parallel);
    /etc/clamsmtpd.conf is the shipped one, and $NETSETUP_ARGS comes from the shipped
    /etc/default/clamsmtp-netsetup, as the unit reads it (so `enable $NETSETUP_ARGS` is
    `enable`, and runs once)."""
    problem = _netns_problem()
    if problem:
        pytest.skip(f"network namespaces: {problem}")
    if importlib.util.find_spec("iptc") is None:
        pytest.skip("python-iptables (the netsetup extra) is not installed")
    if not user_exists("clamsmtp"):
        pytest.skip("no user clamsmtp for `--local --user clamsmtp`")
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        list(pool.map(_run_netsetup_group, _netsetup_groups()))


def test_iptables_recipe_and_nft_ruleset_in_a_namespace(namespace, tmp_path):
    """netsetup.md: upstream's iptables recipe works as quoted; the nft ruleset it shows is what
    `--backend nft --dry-run` prints for that plan, and applies, lists and deletes as its
    comment says."""
    if tool("nft") is None or tool("iptables") is None:
        pytest.skip("needs nft (nftables) and iptables")
    ruleset = script_block("nft", "clamsmtp-netsetup")
    printed = namespace.run([str(BIN / "clamsmtp-netsetup"), "enable", "--backend", "nft",
                             "--dry-run", "--local", "--user", "105",
                             "--exempt-source", "192.0.2.25/32",
                             "-i", "lan0", "--proxy-port", "10025"])
    assert printed.returncode == 0, printed.stderr
    script = printed.stdout[printed.stdout.index("#!/usr/sbin/nft"):]
    script = script[:script.index("\n}\n") + 3]  # the dry run's last line follows it
    assert script.split() == ruleset.text.split(), script
    rules = tmp_path / "clamsmtp.nft"
    rules.write_text(ruleset.text)
    comment = next(x for x in ruleset.text.splitlines() if x.startswith("# apply:"))
    apply, remove = re.fullmatch(r"# apply: (.+?)\s{2,}remove: (.+)", comment).groups()
    commands = documented("test_iptables_recipe_and_nft_ruleset_in_a_namespace")
    nft = [c.normal for c in commands if c.words[0] == "nft"]
    assert apply.startswith(tuple(nft)) and remove.startswith(tuple(nft))
    for _ in range(2):  # re-applying converges
        ok(namespace.run(split_words(apply.replace("FILE", str(rules)))))
    for command in commands:
        if command.normal.startswith("nft list table"):
            listed = ok(namespace.run(command.words)).stdout
            assert listed.count("redirect to :10025") == 2, listed
    ok(namespace.run(split_words(remove)))
    assert "clamsmtp" not in ok(namespace.run(["nft", "list", "tables"])).stdout
    for command in commands:
        if command.words[0] == "iptables":
            ok(namespace.run(command.words))
            shown = ok(namespace.run(["iptables", "-t", "nat", "-S", "PREROUTING"])).stdout
            assert "--dport 25 -j REDIRECT --to-ports 10025" in shown, shown
