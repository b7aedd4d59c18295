'use strict';
// The Node client against a real daemon: `python -m sidecar serve` with its
// embedded PostgreSQL and demo table (SIDECAR_PYTHON picks the interpreter).

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const { Client: PgClient } = require('pg');
const { CacheClient, CacheSidecarError } = require('../src/index.js');
const { freePort, eventually, PYTHON, REPO } = require('./support.js');

let daemon;
let cache;
let db;

before(async () => {
  const port = await freePort();
  const env = { ...process.env };
  for (const name of Object.keys(env)) if (name.startsWith('PG') || name.startsWith('CACHE_SIDECAR_')) delete env[name];
  daemon = spawn(PYTHON, ['-m', 'sidecar', 'serve', '--listen', `127.0.0.1:${port}`, '--log-level', 'warning'], {
    cwd: REPO,
    env,
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let stderr = '';
  daemon.stderr.on('data', (chunk) => {
    stderr += chunk;
  });
  const dsn = await eventually(() => (stderr.match(/database\s+(\S+)/) || [])[1], { timeoutMs: 60000, what: 'daemon banner' });
  cache = new CacheClient(`127.0.0.1:${port}`);
  await eventually(async () => (await cache.listTables()).every((t) => t.loaded), { what: 'tables loaded' });
  const socketDir = decodeURIComponent(dsn.match(/[?&]host=([^&]+)/)[1]);
  db = new PgClient({ host: socketDir, user: 'postgres', database: 'postgres' });
  await db.connect();
});

after(async () => {
  if (db) await db.end();
  if (cache) cache.close();
  if (daemon) {
    const exited = new Promise((resolve) => daemon.once('exit', resolve));
    daemon.kill('SIGTERM');
    assert.equal(await exited, 0);
  }
});

test('get returns a row, or null when there is none', async () => {
  assert.deepEqual(await cache.get('public.patron', 2), { id: 2, name: 'Grace', fav_dish: 'curry' });
  assert.equal(await cache.get('public.patron', 9999), null);
  assert.equal((await cache.get('patron', '2')).name, 'Grace'); // schema defaults to public; parts are coerced
});

test('batchGet keeps the request order', async () => {
  const rows = await cache.batchGet('public.patron', [3, 9999, 1]);
  assert.deepEqual(rows.map((r) => r && r.id), [3, null, 1]);
});

test('query by a declared index: equality, range, order, limit', async () => {
  const tables = await cache.listTables();
  assert.deepEqual(tables[0].indexes.map((i) => [i.name, i.range]), [['by_dish', false], ['by_name', true]]);
  const dishes = await cache.query('public.patron', 'by_dish', { values: ['stroopwafel', 'herring'] });
  assert.deepEqual(dishes.rows.map((r) => r.id), [3, 5]);
  assert.equal(dishes.truncated, false);
  assert.ok(dishes.revision.epoch);
  const between = await cache.query('public.patron', 'by_name', { lower: 'B', upper: 'Linus', upperExclusive: true });
  assert.deepEqual(between.rows.map((r) => r.name), ['Barbara', 'Edsger', 'Grace']);
  const last = await cache.query('public.patron', 'by_name', { limit: 1, descending: true });
  assert.deepEqual([last.rows.map((r) => r.name), last.truncated], [['Linus'], true]);
  await assert.rejects(
    cache.query('public.patron', 'nope', { values: ['x'] }),
    (error) => error.code === 'NOT_FOUND' && /no index 'nope'/.test(error.message),
  );
});

test('errors carry the gRPC status', async () => {
  await assert.rejects(cache.get('public.nope', 1), (error) => error instanceof CacheSidecarError && error.code === 'NOT_FOUND');
  await assert.rejects(cache.get('public.patron', 'abc'), (error) => error.code === 'INVALID_ARGUMENT' && /not an integer/.test(error.message));
});

test('a committed change is visible, and strong reads need no waiting', async () => {
  await db.query("UPDATE patron SET fav_dish = 'gnocchi' WHERE id = 4");
  assert.equal((await cache.get('public.patron', 4, { consistency: 'strong' })).fav_dish, 'gnocchi');
  const revision = await cache.sync();
  assert.ok(revision.epoch && BigInt(revision.number) > 0n);
});

test('invalidate with refresh', async () => {
  const revision = await cache.invalidate('public.patron', [5], { refresh: true });
  assert.ok(revision.epoch);
  assert.equal((await cache.get('public.patron', 5)).name, 'Edsger');
});

test('watch yields change batches as an async iterator', async () => {
  const seen = [];
  const following = (async () => {
    for await (const item of cache.watch(['public.patron'], { initialState: true })) {
      seen.push(item);
      if (item.type === 'changes' && item.changes.some((c) => c.operation === 'update')) break;
    }
  })();
  await eventually(() => seen.some((item) => item.type === 'initialStateDone'), { what: 'initial state' });
  assert.ok(seen.filter((i) => i.type === 'changes').flatMap((i) => i.changes).some((c) => c.operation === 'snapshot' && c.key === 1n));
  await db.query("UPDATE patron SET name = 'Ada L.' WHERE id = 1");
  await following;
  const update = seen.at(-1).changes.find((c) => c.operation === 'update');
  assert.equal(update.key, 1n); // integer key parts are BigInt
  assert.equal(update.row.name, 'Ada L.');
});

test('a watch that is behind gets several batches in one message and yields them one by one, in order', async () => {
  const start = await cache.sync();
  for (let i = 0; i < 20; i += 1) await db.query('UPDATE patron SET fav_dish = $1 WHERE id = 2', [`dish ${i}`]);
  await cache.sync();
  const behind = new CacheClient(cache.target);
  const kinds = [];
  const events = behind._events.bind(behind);
  behind._events = (message) => {
    kinds.push(message.kind);
    return events(message);
  };
  const seen = [];
  try {
    for await (const item of behind.watch(['public.patron'], { startRevision: start })) {
      seen.push(item);
      if (seen.length === 20) break;
    }
  } finally {
    behind.close();
  }
  assert.ok(kinds.includes('batches'), `message kinds: ${kinds}`);
  assert.deepEqual(
    seen.map((item) => BigInt(item.revision.number) - BigInt(start.number)),
    Array.from({ length: 20 }, (_, i) => BigInt(i + 1)),
  );
  assert.ok(seen.every((item) => item.changes[0].key === 2n));
  // (a batch carries the row held when it was published: possibly newer, never older)
  assert.equal(seen.at(-1).changes[0].row.fav_dish, 'dish 19');
});
