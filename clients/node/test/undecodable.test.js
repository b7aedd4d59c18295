'use strict';
// Rows a decoder cannot read, against a real daemon: `decode: 'exact'` reads any nesting
// depth; a row that still cannot be decoded fails only its own read (its near-cache fill
// ticket released) and comes through watch() marked undecodable, the stream going on.

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { Client: PgClient } = require('pg');
const { CacheClient, UndecodableRowError } = require('../src/index.js');
const { freePort, eventually, startPostgres, startDaemon } = require('./support.js');

const DOCS = 'public.docs';
const DEPTH = 5000; // (the recursive parser overflowed the call stack near 3000; PostgreSQL takes this much)
let postgres;
let db;
let port;
let daemon;

/** A decoder that cannot read one kind of row (as a caller's own decoder may not). */
function picky(bytes) {
  const text = bytes.toString('utf8');
  if (text.includes('"poison"')) throw new Error('poisoned row');
  return JSON.parse(text);
}

before(async () => {
  postgres = await startPostgres();
  db = new PgClient({ host: postgres.socketDir, user: 'postgres', database: 'postgres' });
  await db.connect();
  await db.query(`
    CREATE TABLE docs (id int PRIMARY KEY, doc jsonb, tag text);
    INSERT INTO docs VALUES (1, NULL, 'fine'), (2, NULL, 'fine'),
      (3, (repeat('[', ${DEPTH}) || repeat(']', ${DEPTH}))::jsonb, 'deep')`);
  port = await freePort();
  const probe = new CacheClient(`127.0.0.1:${port}`, { timeoutMs: 1000 });
  try {
    daemon = await startDaemon(
      ['--dsn', postgres.dsn, '--table', DOCS, '--install-triggers', '--listen', `127.0.0.1:${port}`],
      async () => (await probe.listTables()).every((t) => t.loaded),
    );
  } finally {
    probe.close();
  }
});

after(async () => {
  if (daemon) assert.equal(await daemon.stop(), 0);
  if (db) await db.end();
  if (postgres) await postgres.stop();
});

test("decode: 'exact' reads a row nested deeper than the call stack", async () => {
  const cache = new CacheClient(`127.0.0.1:${port}`, { decode: 'exact' });
  try {
    let { doc } = await cache.get(DOCS, 3);
    let depth = 0;
    while (doc.length) {
      doc = doc[0];
      depth++;
    }
    assert.equal(depth, DEPTH - 1);
    assert.deepEqual((await cache.batchGet(DOCS, [1, 3])).map((row) => row.id), [1, 3]);
  } finally {
    cache.close();
  }
});

test('an undecodable row fails its read, releases its fill ticket, and the key is near-cached again', async () => {
  const cache = new CacheClient(`127.0.0.1:${port}`, { decodeRow: picky, nearCache: [DOCS] });
  const near = cache.nearCache;
  try {
    await eventually(() => near.connected, { what: 'near-cache stream up' });
    await db.query("UPDATE docs SET tag = 'poison' WHERE id = 1");
    await cache.sync();
    await assert.rejects(cache.get(DOCS, 1), (error) => {
      assert.ok(error instanceof UndecodableRowError, String(error));
      assert.match(error.message, /public\.docs \(key 1\).*poisoned row/);
      assert.equal(error.key, 1);
      return true;
    });
    await assert.rejects(cache.batchGet(DOCS, [2, 1]), UndecodableRowError);
    assert.equal(near.inflight.size, 0); // (no fill ticket left behind)
    await db.query("UPDATE docs SET tag = 'healed' WHERE id = 1");
    await eventually(async () => (await cache.get(DOCS, 1)).tag === 'healed', { what: 'the row read again' });
    const hits = near.stats.hits;
    await eventually(async () => (await cache.get(DOCS, 1)) && near.stats.hits > hits, { what: 'key 1 near-cached' });
  } finally {
    cache.close();
  }
});

test('an undecodable row comes through watch() marked, and the stream goes on', async () => {
  const cache = new CacheClient(`127.0.0.1:${port}`, { decodeRow: picky });
  try {
    const start = await cache.sync();
    const stream = cache.watch([DOCS], { startRevision: start });
    await db.query("UPDATE docs SET tag = 'poison' WHERE id = 2");
    await cache.sync(); // (applied: the next change is a batch of its own)
    await db.query("UPDATE docs SET tag = 'healed' WHERE id = 2");
    const changes = [];
    for await (const item of stream) {
      if (item.type === 'changes') changes.push(...item.changes);
      if (changes.length >= 2) break;
    }
    const [poisoned, healed] = changes;
    assert.equal(poisoned.undecodable, true);
    assert.equal(poisoned.row, null);
    assert.match(poisoned.error, /poisoned row/);
    assert.equal(healed.undecodable, undefined);
    assert.equal(healed.row.tag, 'healed');
  } finally {
    cache.close();
  }
});
