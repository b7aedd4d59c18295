"""sidecar.pg.pgoutput on messages a live server sends now (the unit tests read a stored capture)."""

from __future__ import annotations

import json
from pathlib import Path

from sidecar.pg import pgoutput as p
from tests.support.logical import SCENARIOS, capture, trimmed

STORED = json.loads((Path(__file__).parents[2] / "unit" / "pgoutput_messages.json").read_text())["scenarios"]


async def test_every_scenario_parses_and_matches_the_stored_capture(logical_dsn: str) -> None:
    captured = await capture(logical_dsn)
    assert set(captured) == set(SCENARIOS) == set(STORED)
    for name, messages in captured.items():
        decoder = p.StreamDecoder()
        live = [type(decoder.feed(m)).__name__ for m in messages]
        assert decoder.streamed_xid is None, name
        decoder = p.StreamDecoder()
        live_trimmed = [type(decoder.feed(m)).__name__ for m in trimmed(messages)]
        decoder = p.StreamDecoder()
        stored = [type(decoder.feed(bytes.fromhex(m))).__name__ for m in STORED[name]]
        assert live_trimmed == stored, f"{name}: the stored capture is stale (python -m tests.support.logical)"
        assert live, name


async def test_every_scenario_parses_on_the_system_version(system_logical_dsn: str) -> None:
    names = [name for name in SCENARIOS if name != "streamed_parallel"]  # protocol 4: PostgreSQL 16+
    captured = await capture(system_logical_dsn, names)
    for name, messages in captured.items():
        decoder = p.StreamDecoder()
        kinds = {type(decoder.feed(m)) for m in messages}
        assert decoder.streamed_xid is None and kinds, name
    assert {type(p.parse(m)) for m in captured["two_phase"]} >= {p.BeginPrepare, p.Prepare, p.CommitPrepared}
