"""OutTLS: may and a client that says HELO: the EHLO probe before its HELO is skipped while the
next hop is remembered to offer no STARTTLS (appliance/tlsmemory.py, docs/dev/tlsmemory.md).
Real RelaySessions against the scripted next hop of test_relay_inprocess, several sessions on
one RelayContext as in the daemon."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path

import replies as R
from test_relay_inprocess import CLEAN_RESULT, WAIT, Client, FakeScanner, NextHop

from appliance.actions import VirusActions
from appliance.addresses import Address
from appliance.channel import ClientChannel
from appliance.config import parse_config
from appliance.relay import RelayContext, RelaySession
from appliance.tls import load as load_tls
from appliance.tlsmemory import ClearNextHops

STARTTLS_EHLO = ("250-nexthop.test", "250-STARTTLS", "250 8BITMIME")


def _protocol(session: RelaySession) -> Callable[[], ClientChannel]:
    return lambda: session.channel


def sessions(tmp_path: Path, greetings: list[bytes], *, config: str = "",
             ehlo: tuple[str, ...] | None = None, memory: ClearNextHops | None = None
             ) -> tuple[list[list[bytes]], list[str], ClearNextHops]:
    """One session per greeting line, one after the other, on one RelayContext: the commands
    the next hop got in each session, and the reply each client got to its greeting."""
    hop = NextHop(tmp_path / "nexthop.sock", **({"ehlo": ehlo} if ehlo else {}))
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    parsed = parse_config(f"OutAddress: 10025\nTempDirectory: {spool}\nTimeOut: 10\n{config}",
                          "memory.conf")
    seen: list[list[bytes]] = []
    replies: list[str] = []

    async def main() -> ClearNextHops:
        server = await asyncio.start_unix_server(hop.serve, path=str(hop.path))
        destination = Address(path=str(hop.path))
        context = RelayContext(parsed, FakeScanner(CLEAN_RESULT), lambda ip, t: destination,
                               VirusActions(None), tls=load_tls(parsed))
        if memory is not None:
            context.clear_next_hops = memory
        try:
            for greeting in greetings:
                before = len(hop.commands)
                ours, theirs = socket.socketpair()
                loop = asyncio.get_running_loop()
                await loop.connect_accepted_socket(_protocol(RelaySession(context)), sock=ours)
                client = Client(*await asyncio.open_connection(sock=theirs))
                assert (await client.reply()).startswith("220 ")
                replies.append(await client.say(greeting))
                if not replies[-1].startswith("421"):
                    assert await client.say(b"QUIT\r\n") == "221 2.0.0 Bye"
                client.writer.close()
                for _ in range(int(WAIT / 0.01)):
                    if not context.sessions:
                        break
                    await asyncio.sleep(0.01)
                seen.append(hop.commands[before:])
        finally:
            server.close()
        return context.clear_next_hops

    return seen, replies, asyncio.run(main())


def test_a_helo_client_pays_the_probe_once_per_memory_period(tmp_path):
    """The first session probes (EHLO, then the client's HELO); the next ones, within
    MEMORY_SECONDS, send the client's HELO alone, as with OutTLS: none."""
    seen, replies, memory = sessions(tmp_path, [b"HELO one.test\r\n", b"HELO two.test\r\n",
                                                b"HELO three.test\r\n"])
    assert seen == [
        [b"EHLO one.test", b"HELO one.test", b"QUIT"],
        [b"HELO two.test", b"QUIT"],
        [b"HELO three.test", b"QUIT"],
    ]
    assert all(reply.startswith("250 ") for reply in replies)
    assert len(memory) == 1


def test_an_ehlo_client_is_its_own_probe_as_before(tmp_path):
    seen, _, _ = sessions(tmp_path, [b"EHLO one.test\r\n", b"EHLO two.test\r\n"])
    assert seen == [[b"EHLO one.test", b"QUIT"], [b"EHLO two.test", b"QUIT"]]


def test_a_next_hop_that_offers_starttls_is_not_remembered(tmp_path):
    """(its STARTTLS is refused by the scripted next hop's 250: the leg stays in clear, and
    the probe is made again in the next session)"""
    seen, _, memory = sessions(tmp_path, [b"HELO one.test\r\n", b"HELO two.test\r\n"],
                               ehlo=STARTTLS_EHLO)
    assert [commands[0] for commands in seen] == [b"EHLO one.test", b"EHLO two.test"]
    assert len(memory) == 0


def test_the_memory_ends_after_its_period(tmp_path):
    now = [1000.0]
    memory = ClearNextHops(seconds=60, clock=lambda: now[0])
    destination = Address(path="/run/next.sock")
    memory.remember(destination)
    now[0] += 59.9
    assert destination in memory
    now[0] += 0.2
    assert destination not in memory and len(memory) == 0


def test_the_memory_is_bounded_and_loses_the_oldest_first():
    memory = ClearNextHops(limit=2)
    a, b, c = (Address(host=f"192.0.2.{i}", port=25) for i in (1, 2, 3))
    memory.remember(a)
    memory.remember(b)
    memory.remember(a)  # seen again: now the newest
    memory.remember(c)
    assert a in memory and c in memory and b not in memory


def test_encrypt_always_probes_whatever_the_memory_says(tmp_path):
    """OutTLS: encrypt must see STARTTLS offered in every session: a remembered destination
    changes nothing (the client gets 421 and nothing goes to the next hop in clear)."""
    memory = ClearNextHops()
    memory.remember(Address(path=str(tmp_path / "nexthop.sock")))
    seen, replies, _ = sessions(tmp_path, [b"HELO one.test\r\n"], config="OutTLS: encrypt\n",
                                memory=memory)
    assert seen[0][0] == b"EHLO one.test" and b"HELO one.test" not in seen[0]
    assert replies == [R.NEXT_HOP_INSECURE]
