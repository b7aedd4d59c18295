'use strict';
// Exact keys and rows, watch() resumption and the near-cache against a real
// daemon on a PostgreSQL of the test's own (so that the daemon can be
// restarted, and its LISTEN backend killed, while the database stays).

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { Client: PgClient } = require('pg');
const { CacheClient } = require('../src/index.js');
const { freePort, eventually, startPostgres, startDaemon, startProxy } = require('./support.js');

const ITEMS = 'public.items';
const MAX = 9223372036854775807n;
let postgres;
let db;
let port;
let daemon;
let cache; // plain client, exact rows

async function serve() {
  const probe = new CacheClient(`127.0.0.1:${port}`, { timeoutMs: 1000 });
  try {
    return await startDaemon(
      ['--dsn', postgres.dsn, '--table', ITEMS, '--install-triggers', '--listen', `127.0.0.1:${port}`],
      async () => (await probe.listTables()).every((t) => t.loaded),
    );
  } finally {
    probe.close();
  }
}

before(async () => {
  postgres = await startPostgres();
  db = new PgClient({ host: postgres.socketDir, user: 'postgres', database: 'postgres' });
  await db.connect();
  await db.query(`
    CREATE TABLE items (id bigint PRIMARY KEY, version int NOT NULL, amount numeric, big bigint);
    INSERT INTO items SELECT g, 0, 0, 0 FROM generate_series(1, 20) g;
    INSERT INTO items VALUES (9223372036854775807, 0, 12345678901234567890.000000000000000001, 9223372036854775807),
                             (9223372036854775806, 0, 0.1, 9223372036854775806)`);
  port = await freePort();
  daemon = await serve();
  cache = new CacheClient(`127.0.0.1:${port}`, { decode: 'exact' });
});

after(async () => {
  if (cache) cache.close();
  if (daemon) assert.equal(await daemon.stop(), 0);
  if (db) await db.end();
  if (postgres) await postgres.stop();
});

/** Resolves once the near-cache's stream has applied everything committed before the call. */
async function caughtUp(near) {
  const revision = await cache.sync();
  await eventually(
    () => near.connected && near.position && near.position.epoch === revision.epoch && BigInt(near.position.number) >= BigInt(revision.number),
    { what: `near-cache at ${revision.number}` },
  );
}

test('int8 keys stay distinct in events, and rows are exact with decode: "exact"', async () => {
  const top = await cache.get(ITEMS, MAX);
  assert.deepEqual(top, { id: MAX, version: 0, amount: '12345678901234567890.000000000000000001', big: MAX });
  assert.equal((await cache.get(ITEMS, '9223372036854775806')).big, MAX - 1n); // a key sent as a string
  assert.deepEqual((await cache.batchGet(ITEMS, [MAX - 1n, 1])).map((r) => r.id), [MAX - 1n, 1]);
  const plain = new CacheClient(`127.0.0.1:${port}`); // JSON.parse, as before: documented as lossy
  assert.equal((await plain.get(ITEMS, MAX)).big, 9223372036854775807);
  plain.close();

  const updated = [];
  const following = (async () => {
    for await (const item of cache.watch([ITEMS], { initialState: true })) {
      if (item.type === 'initialStateDone') await db.query('UPDATE items SET version = 1 WHERE id > 9223372036854775805');
      if (item.type === 'changes') updated.push(...item.changes.filter((c) => c.operation === 'update'));
      if (updated.length >= 2) break;
    }
  })();
  await eventually(() => updated.length >= 2, { what: 'both updates' });
  await following;
  assert.deepEqual(updated.map((c) => c.key).sort(), [MAX - 1n, MAX]); // Number() made them one key
  assert.ok(updated.every((c) => c.row.id === c.key && c.row.version === 1));
});

test('near-cache: filled on read, updated by an event, dropped on delete', async () => {
  const client = new CacheClient(`127.0.0.1:${port}`, { nearCache: { [ITEMS]: 100 } });
  const near = client.nearCache;
  try {
    await eventually(() => near.connected, { what: 'near-cache stream up' });
    assert.equal((await client.get(ITEMS, 1)).version, 0); // miss: from the sidecar
    assert.equal((await client.get(ITEMS, 1n)).version, 0); // hit, whatever the key's type
    assert.equal((await client.get(ITEMS, '1')).version, 0);
    assert.deepEqual([near.stats.fills, near.stats.hits], [1, 2]);
    (await client.get(ITEMS, 1)).version = 999; // callers get their own copy
    assert.equal((await client.get(ITEMS, 1)).version, 0);

    await db.query('UPDATE items SET version = 5 WHERE id = 1');
    await caughtUp(near);
    const hits = near.stats.hits;
    assert.equal((await client.get(ITEMS, 1)).version, 5); // from the near-cache, updated by the event
    assert.equal(near.stats.hits, hits + 1);

    assert.equal((await client.get(ITEMS, 2)).version, 0);
    await db.query('DELETE FROM items WHERE id = 2');
    await caughtUp(near);
    const misses = near.stats.misses;
    assert.equal(await client.get(ITEMS, 2), null); // dropped: asked the sidecar again
    assert.equal(near.stats.misses, misses + 1);
    assert.equal(await client.get(ITEMS, 2), null); // "no such row" is cached too
    assert.equal(near.stats.misses, misses + 1);
    await db.query('INSERT INTO items VALUES (2, 7, 0, 0)');
    await caughtUp(near);
    assert.equal((await client.get(ITEMS, 2)).version, 7);

    assert.deepEqual((await client.batchGet(ITEMS, [1, 2, 3, 9999])).map((r) => r && r.version), [5, 7, 0, null]);
    assert.equal((await client.get(ITEMS, 1, { consistency: 'strong' })).version, 5);
  } finally {
    client.close();
  }
});

test('near-cache and watch: a reset (the LISTEN backend killed) empties it; no stale row after', async () => {
  const client = new CacheClient(`127.0.0.1:${port}`, { nearCache: [ITEMS] });
  const near = client.nearCache;
  const seen = [];
  const watcher = new CacheClient(`127.0.0.1:${port}`);
  const following = (async () => {
    for await (const item of watcher.watch([ITEMS])) seen.push(item);
  })();
  try {
    await eventually(() => near.connected, { what: 'near-cache stream up' });
    assert.equal((await client.get(ITEMS, 4)).version, 0);
    assert.equal(near.size, 1);
    const flushes = near.stats.flushes;
    const { rows } = await db.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'cache-sidecar-listener'");
    assert.equal(rows.length, 1);
    await db.query('UPDATE items SET version = 8 WHERE id = 4'); // possibly never notified: the rebuild reads it
    await eventually(() => near.stats.flushes > flushes && near.connected, { what: 'reset reached the near-cache' });
    await eventually(async () => (await client.get(ITEMS, 4)).version === 8, { what: 'the new row' });
    await eventually(() => seen.some((item) => item.type === 'reset'), { what: 'the reset passed to the watcher' });
  } finally {
    client.close();
    watcher.close();
    await following;
  }
});

test('watch resumes through a cut connection: no reset, no gap, no duplicate', async () => {
  const proxy = await startProxy(port);
  const watcher = new CacheClient(proxy.target);
  const seen = [];
  let failure = null;
  const following = (async () => {
    for await (const item of watcher.watch([ITEMS], { initialState: true })) seen.push(item);
  })().catch((error) => {
    failure = error;
  });
  try {
    await eventually(() => seen.some((item) => item.type === 'initialStateDone'), { what: 'initial state' });
    await db.query('UPDATE items SET version = 11 WHERE id = 5');
    const updated = (key) => seen.some((i) => i.type === 'changes' && i.changes.some((c) => c.operation === 'update' && c.key === key));
    await eventually(() => updated(5n), { what: 'first update' });
    proxy.block();
    await db.query('UPDATE items SET version = 12 WHERE id = 6'); // committed while the stream is cut
    await db.query('UPDATE items SET version = 13 WHERE id = 7');
    await cache.sync();
    proxy.unblock();
    await eventually(() => updated(7n) || failure, {
      what: 'the updates made while cut',
    });
    assert.equal(failure, null);
    assert.ok(proxy.connections() >= 2, `the stream reconnected: ${proxy.connections()} ${JSON.stringify(seen.map((i) => i.type))}`);
    assert.ok(!seen.some((item) => item.type === 'reset'));
    const live = seen.slice(seen.findIndex((item) => item.type === 'initialStateDone') + 1).filter((i) => i.type === 'changes');
    const numbers = live.map((i) => BigInt(i.revision.number));
    numbers.forEach((n, i) => i > 0 && assert.equal(n, numbers[i - 1] + 1n, `consecutive revisions: ${numbers}`));
    assert.deepEqual(live.flatMap((i) => i.changes.map((c) => [c.key, c.row.version])), [[5n, 11], [6n, 12], [7n, 13]]);
  } finally {
    watcher.close();
    await following;
    await proxy.close();
  }
});

test('a daemon restart: the near-cache empties, reads fail rather than go stale, then resync; watch yields a reset', async () => {
  const client = new CacheClient(`127.0.0.1:${port}`, { nearCache: [ITEMS], timeoutMs: 2000 });
  const near = client.nearCache;
  const seen = [];
  const watcher = new CacheClient(`127.0.0.1:${port}`);
  const following = (async () => {
    for await (const item of watcher.watch([ITEMS])) seen.push(item);
  })();
  try {
    await eventually(() => near.connected, { what: 'near-cache stream up' });
    await eventually(async () => (await client.get(ITEMS, 9)).version === 0 && near.size === 1, { what: 'filled' });
    assert.equal(await daemon.stop(), 0);
    daemon = null;
    await eventually(() => !near.connected, { what: 'stream loss noticed' });
    assert.equal(near.size, 0); // flushed: nothing stale is served while deaf
    await db.query('UPDATE items SET version = 3 WHERE id = 9');
    await assert.rejects(client.get(ITEMS, 9), (error) => error.code === 'UNAVAILABLE'); // not the old row
    daemon = await serve();
    await eventually(() => near.connected, { what: 'stream back' });
    await eventually(async () => (await client.get(ITEMS, 9)).version === 3, { what: 'the row after the restart' });
    await db.query('UPDATE items SET version = 4 WHERE id = 9');
    await caughtUp(near);
    assert.equal((await client.get(ITEMS, 9)).version, 4);
    await eventually(() => seen.some((item) => item.type === 'reset' && /^resync: /.test(item.reason)), {
      what: 'the watcher told to resync (its revision is of the old epoch)',
    });
  } finally {
    client.close();
    watcher.close();
    await following;
  }
});
