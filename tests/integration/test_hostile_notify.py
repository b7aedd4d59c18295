"""NOTIFY is open to every role that can connect: hostile payloads and forged
read-barrier tokens, sent by a role with no privileges at all, must neither
stop the revision nor let a STRONG read miss an acknowledged write."""

from __future__ import annotations

import asyncio
import itertools
import secrets

import asyncpg
import pytest

from sidecar.core import barrier, events
from tests.integration import test_metrics as metrics
from tests.support.proxy import Proxy
from tests.support.waiting import eventually


@pytest.fixture
async def stranger(postgres, db):
    """A connection of a role that owns nothing and may read nothing."""
    role = f"stranger_{secrets.token_hex(3)}"
    await db.execute(f"CREATE ROLE {role} LOGIN")
    conn = await asyncpg.connect(postgres.dsn, user=role)
    assert await conn.fetchval("SELECT current_user") == role
    yield conn
    await conn.close()
    await db.execute(f"DROP ROLE {role}")


@pytest.fixture
async def tables(db, schema) -> tuple[str, str]:
    await db.execute(
        f"CREATE TABLE {schema}.num (id numeric PRIMARY KEY, v int NOT NULL);"
        f"CREATE TABLE {schema}.txt (id text PRIMARY KEY, v int NOT NULL);"
        f"INSERT INTO {schema}.num VALUES (1, 0); INSERT INTO {schema}.txt VALUES ('a', 0)"
    )
    return f"{schema}.num", f"{schema}.txt"


def poison(schema: str) -> list[tuple[str, str]]:
    """Each alone froze the revision of every table, or poisoned Watch, before the fix."""
    return [
        ("txt", '"x":5,"k":[["\\ud800"]]'),  # a lone surrogate: Python holds it, PostgreSQL cannot
        ("num", '"x":5,"k":[[1e1000000]]'),  # beyond numeric's range
        ("num", '"x":5,"k":[["1e1000000"]]'),
        ("num", '"x":-1,"k":[[1]]'),  # not a uint64 transaction id
        ("num", '"x":18446744073709551616,"k":[[1]]'),
        ("num", '"x":5,"k":[[' + "[" * 3000 + "]" * 3000 + "]]"),  # deep nesting
        ("num", '"x":5,"k":[[{"a":1}]]'),
    ]


@pytest.mark.parametrize("case", range(len(poison(""))))
async def test_poison_payloads_from_a_role_without_privileges_stop_nothing(start_daemon, db, tables, stranger, case):
    num, txt = tables
    sidecar = await start_daemon([num, txt], query_timeout=3.0)
    engine = sidecar.engine
    schema = num.split(".")[0]
    table, body = poison(schema)[case]
    payload = f'{{"v":1,"s":"{schema}","t":"{table}","op":"U",{body}}}'
    await stranger.execute("SELECT pg_notify($1, $2)", sidecar.daemon.config.channel, payload)
    # A fresh write after the poison, then a barrier: both go through, on both tables.
    await db.execute(f"UPDATE {num} SET v = 1 WHERE id = 1; UPDATE {txt} SET v = 1 WHERE id = 'a'")
    await engine.sync()
    assert b'"v":1' in (await engine.get(num, [1]) or b"")
    await engine.prepare_read(True, None)
    assert b'"v":1' in (await engine.get(txt, ["a"]) or b"")
    revisions = sidecar.core.revisions
    await eventually(lambda: revisions.applied == revisions.seq, 10, what="the revision caught up")
    assert engine.ready and not engine.stalled
    # Watch history holds only batches whose transaction ids can be sent.
    assert all(0 <= batch.xid < 2**64 for batch in sidecar.core.fanout._history)


async def test_a_stranger_cannot_end_a_barrier_with_a_token(start_daemon, db, tables, stranger):
    num, _ = tables
    sidecar = await start_daemon([num])
    await stranger.execute("SELECT pg_notify($1, $2)", sidecar.daemon.config.channel, events.sync_payload("x" * 22))
    await eventually(lambda: sidecar.daemon.listener.stats.forged == 1, 5, what="the token counted as forged")
    await sidecar.engine.sync()  # our own tokens still work


@pytest.fixture
async def slow_link(postgres):
    """The sidecar hears PostgreSQL 20 ms late (a stranger nearer the database hears it first)."""
    if postgres.socket_path is None:
        pytest.skip("the proxy fronts a server this session started")
    proxy = Proxy(unix_path=postgres.socket_path, delay=0.02)
    await proxy.start()
    yield proxy
    await proxy.close()


async def test_forged_barrier_tokens_do_not_end_a_barrier(start_daemon, db, schema, stranger, slow_link, monkeypatch):
    """The attack: predict the next token and NOTIFY it before a write commits, so that it
    arrives after the next STRONG read began but before the write's notification. The
    tokens here are made predictable on purpose, so that this tests the PID check alone."""
    counter = itertools.count(1)
    monkeypatch.setattr(barrier, "new_token", lambda: f"tok-{next(counter)}")
    await db.execute(
        f"CREATE TABLE {schema}.acct (id int PRIMARY KEY, v int NOT NULL); INSERT INTO {schema}.acct VALUES (1, 0)"
    )
    name = f"{schema}.acct"
    dsn = f"postgresql://postgres@127.0.0.1:{slow_link.port}/postgres"
    sidecar = await start_daemon([name], dsn=dsn)
    engine = sidecar.engine
    channel = sidecar.daemon.config.channel
    stale = 0
    for value in range(1, 31):
        predicted = f"tok-{sidecar.core.trust.barrier.rounds + 1}"  # (one round per STRONG read here)
        await stranger.execute("SELECT pg_notify($1, $2)", channel, events.sync_payload(predicted))
        await db.execute(f"UPDATE {name} SET v = $1 WHERE id = 1", value)  # acknowledged: committed
        await engine.prepare_read(True, None)  # a STRONG read
        row = await engine.get(name, [1])
        stale += row is None or f'"v":{value}}}'.encode() not in row
    assert stale == 0, f"{stale} of 30 STRONG reads missed an acknowledged write"
    assert sidecar.daemon.listener.stats.forged >= 1


def whole_table(schema: str, table: str) -> str:
    return f'{{"v":1,"s":"{schema}","t":"{table}","x":5,"op":"T","all":"truncate"}}'


async def test_whole_table_changes_forged_by_a_role_that_cannot_write_cost_no_reload(
    start_daemon, db, schema, stranger
):
    """Before the sender check each forged event reloaded the table (reads went to the
    database meanwhile); now they are dropped, and a real TRUNCATE still shows."""
    await db.execute(
        f"CREATE TABLE {schema}.big (id int PRIMARY KEY, v text NOT NULL);"
        f"INSERT INTO {schema}.big SELECT g, 'row ' || g FROM generate_series(1, 20000) g;"
        f"GRANT USAGE ON SCHEMA {schema} TO PUBLIC; GRANT SELECT ON {schema}.big TO PUBLIC"  # (read, not write)
    )
    name = f"{schema}.big"
    sidecar = await start_daemon([name], metrics_listen="127.0.0.1:0")
    engine, table = sidecar.engine, sidecar.core.tables[name]
    flips: list[bool] = []
    engine.on_state_change(lambda: flips.append(engine.ready))
    reloads = table.reloads
    channel = sidecar.daemon.config.channel
    for _ in range(50):
        await stranger.execute("SELECT pg_notify($1, $2)", channel, whole_table(schema, "big"))
        assert await engine.get(name, [7]) is not None  # reads keep working
    await engine.sync()  # (ordered behind all 50)
    assert table.reloads == reloads, "a forged whole-table change reloaded the table"
    assert not table.reloading and table.peek((7,)) == (True, table.store.get((7,)))  # served from memory
    assert engine.ready and not engine.stalled and flips == []
    senders = sidecar.daemon.source.senders
    assert senders.stats.dropped == 50
    assert senders.stats.checks <= 2  # one look-up for the connection (maybe two: the verdict expired)
    samples = await asyncio.to_thread(metrics.scrape, sidecar.daemon.metrics_address)
    assert metrics.value(samples, "cache_sidecar_notifications_dropped_total") == 50
    assert ("cache_sidecar_notifications_sender_unknown_total", ()) in samples
    assert ("cache_sidecar_reloads_coalesced_total", (("table", name),)) in samples
    # The owner's real TRUNCATE is seen by the next STRONG read.
    await db.execute(f"TRUNCATE {name}")
    await engine.prepare_read(True, None, table)
    assert await engine.get(name, [7]) is None
    # (once by its trigger; maybe once more by the read barrier's catalog query, which sees the
    # TRUNCATE's new storage: a reload that changes no row)
    await eventually(lambda: table.reloads in (reloads + 1, reloads + 2), 10, what="the TRUNCATE reloaded")


@pytest.fixture
async def writers(postgres, db, schema):
    """Roles that may change ``schema.child`` only in a roundabout way, each with a connection."""
    suffix = secrets.token_hex(3)
    roles = {name: f"{name}_{suffix}" for name in ("member", "cascade", "definer")}
    await db.execute(
        f"""
        CREATE TABLE {schema}.parent (id int PRIMARY KEY);
        CREATE TABLE {schema}.child (id int PRIMARY KEY, parent int REFERENCES {schema}.parent ON DELETE CASCADE);
        INSERT INTO {schema}.parent VALUES (1); INSERT INTO {schema}.child VALUES (1, 1);
        CREATE FUNCTION {schema}.clear_child() RETURNS void LANGUAGE sql SECURITY DEFINER
          AS 'DELETE FROM {schema}.child';
        REVOKE ALL ON FUNCTION {schema}.clear_child() FROM PUBLIC;
        GRANT USAGE ON SCHEMA {schema} TO PUBLIC;
        CREATE ROLE writer_{suffix} NOLOGIN;
        GRANT INSERT ON {schema}.child TO writer_{suffix};
        CREATE ROLE {roles["member"]} LOGIN NOINHERIT IN ROLE writer_{suffix};
        CREATE ROLE {roles["cascade"]} LOGIN;
        GRANT SELECT, DELETE ON {schema}.parent TO {roles["cascade"]};
        CREATE ROLE {roles["definer"]} LOGIN;
        GRANT EXECUTE ON FUNCTION {schema}.clear_child() TO {roles["definer"]};
        """
    )
    conns = {kind: await asyncpg.connect(postgres.dsn, user=role) for kind, role in roles.items()}
    yield conns
    for conn in conns.values():
        await conn.close()
    await db.execute(f"DROP FUNCTION {schema}.clear_child(); REVOKE ALL ON ALL TABLES IN SCHEMA {schema} FROM PUBLIC")
    for role in (*roles.values(), f"writer_{suffix}"):
        await db.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")


@pytest.mark.parametrize("kind", ["member", "cascade", "definer"])
async def test_whole_table_changes_from_roles_that_may_change_the_table_are_applied(
    start_daemon, db, schema, writers, kind
):
    """A role that may SET ROLE to a writer, delete from a table whose foreign key cascades
    into this one, or call a SECURITY DEFINER function of a writer: its whole-table change
    may be real, and is applied."""
    name = f"{schema}.child"
    sidecar = await start_daemon([name])
    table = sidecar.core.tables[name]
    reloads = table.reloads
    await writers[kind].execute("SELECT pg_notify($1, $2)", sidecar.daemon.config.channel, whole_table(schema, "child"))
    await sidecar.engine.sync()
    await eventually(lambda: table.reloads == reloads + 1, 10, what="the change reloaded the table")
    assert sidecar.daemon.source.senders.stats.dropped == 0


@pytest.fixture
async def link(postgres):
    """A link from the sidecar to PostgreSQL that the test can stall for a moment."""
    if postgres.socket_path is None:
        pytest.skip("the proxy fronts a server this session started")
    proxy = Proxy(unix_path=postgres.socket_path)
    await proxy.start()
    yield proxy
    await proxy.close()


async def test_a_whole_table_change_whose_sender_has_gone_is_applied(
    start_daemon, postgres, db, tables, stranger, link
):
    """A writer may commit and disconnect before its notification is read: a sender that
    cannot be told is believed (a real change is never dropped for want of an answer)."""
    num, _ = tables
    schema = num.split(".")[0]
    sidecar = await start_daemon([num], dsn=f"postgresql://postgres@127.0.0.1:{link.port}/postgres")
    table = sidecar.core.tables[num]
    reloads = table.reloads
    link.stall()  # the sidecar hears nothing until the sender is gone
    try:
        role = await stranger.fetchval("SELECT current_user")
        gone = await asyncpg.connect(postgres.dsn, user=role)
        pid = gone.get_server_pid()
        await gone.execute("SELECT pg_notify($1, $2)", sidecar.daemon.config.channel, whole_table(schema, "num"))
        await gone.close()
        await eventually(
            lambda: db.fetchval("SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = $1", pid), what="it exited"
        )
    finally:
        link.resume()
    await sidecar.engine.sync()
    await eventually(lambda: table.reloads == reloads + 1, 10, what="the change applied")
    assert sidecar.daemon.source.senders.stats.unknown == 1 and sidecar.daemon.source.senders.stats.dropped == 0
