"""VirusActions: the script named when the virus was found is the one that runs."""

from __future__ import annotations

import asyncio
from pathlib import Path

from appliance.actions import VirusActions, VirusEvent


def _event(tmp_path: Path) -> VirusEvent:
    return VirusEvent(sender="s@example.org", recipients=("r@example.org",), client="192.0.2.1",
                      server="192.0.2.2", virus="Eicar-Test-Signature", tmpdir=str(tmp_path))


def test_a_reload_that_drops_virus_action_does_not_break_a_script_already_started(tmp_path):
    """SIGHUP sets VirusActions.command from the new config; a script that was started (and
    waits for its slot) runs the command of the config that found the virus. It used to read
    the command again when its turn came, and a reload to no VirusAction made that None: the
    task died with TypeError and the admin's script never ran."""
    ran = tmp_path / "ran"

    async def scenario() -> None:
        actions = VirusActions(f'echo "$VIRUS" > {ran}')
        actions.start(_event(tmp_path))
        actions.command = None  # the reload, before the task's first step
        await actions.stop(timeout=10)

    asyncio.run(scenario())
    assert ran.read_text() == "Eicar-Test-Signature\n"
