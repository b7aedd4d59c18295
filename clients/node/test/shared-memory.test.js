'use strict';
// The shared-memory reader: its byte rules (the spec's key vectors, the
// freshness rule) without a store, then against a real daemon started with
// --shared-memory on a PostgreSQL of the test's own.

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { Client: PgClient } = require('pg');
const { CacheClient } = require('../src/index.js');
const shm = require('../src/shared-memory.js');
const { freePort, eventually, startPostgres, startDaemon } = require('./support.js');

// docs/shared-memory.md's vectors (tests/unit/test_shared_memory.py checks the same bytes)
const U = '12345678-1234-5678-1234-567812345678';
const VECTORS = [
  [1, 'l', '010000000000000001'],
  [-2, 'i', '01fffffffffffffffe'],
  ['é', 's', '0200000002c3a9'],
  ['ab  ', 'p', '02000000026162'],
  [U, 'u', `03${U.replace(/-/g, '')}`],
  [true, 'b', '0401'],
  [Buffer.from([0, 255]), 'x', '050000000200ff'],
  [[7, 'a'], 'hs', '010000000000000007020000000161'],
];

test('keys encode as the spec says', () => {
  for (const [key, kinds, hex] of VECTORS) assert.equal(shm.encodeKey(kinds, key).toString('hex'), hex, `${kinds} ${key}`);
  assert.equal(shm.encodeKey('l', 9223372036854775807n).toString('hex'), '017fffffffffffffff');
  assert.equal(shm.encodeKey('i', 2 ** 31), null); // out of int4's range: the sidecar names the problem
  assert.equal(shm.encodeKey('l', '5'), null); // the sidecar coerces strings
  assert.equal(shm.encodeKey('l', 1.5), null);
  assert.equal(shm.encodeKey('s', 'a\0b'), null);
  assert.equal(shm.encodeKey('u', 'not a uuid'), null);
  assert.equal(shm.encodeKey('ls', 1), null);
});

test('the reader serves only while the store is fresh', () => {
  const now = 10_000_000_000n;
  const state = (sourceUp, heartbeatUs) => ({ sourceUp, heartbeatUs, revision: 5n, epoch: 'e.1' });
  const served = { served: true, rows: 1n, kinds: 'l' };
  assert.equal(shm.refusal(state(true, now - 100_000n), served, now, false), null);
  assert.match(shm.refusal(state(false, now), served, now, false), /source is down/);
  assert.match(shm.refusal(state(true, now - 1_500_000n), served, now, false), /heartbeat is old/);
  assert.match(shm.refusal(state(true, now), { ...served, served: false }, now, false), /not served/);
  assert.match(shm.refusal(null, served, now, false), /no store/);
  assert.equal(shm.refusal(state(false, 0n), served, now, true), null); // allowStale
  assert.equal(shm.reached(state(true, now), 'e.1', '5'), true);
  assert.equal(shm.reached(state(true, now), 'e.1', '6'), false);
  assert.equal(shm.reached(state(true, now), 'e.0', '1'), null); // another epoch: ask the sidecar
  const record = Buffer.alloc(24 + 3);
  record.writeUInt32LE(1, 0);
  record.writeUInt32LE(1, 4);
  record.writeBigInt64LE(123n, 8);
  record.writeBigUInt64LE(45n, 16);
  record.write('e.1', 24);
  assert.deepEqual(shm.parseState(record), { sourceUp: true, heartbeatUs: 123n, revision: 45n, epoch: 'e.1' });
  record.writeUInt32LE(2, 0);
  assert.equal(shm.parseState(record), null); // another layout
});

// ---------------------------------------------------------------- against a daemon

const ITEMS = 'public.shm_items';
const BIG = 'public.shm_big'; // more than LMDB's default map size (1 MiB) of rows
const NAMES = 'public.shm_names'; // text keys, some too long for LMDB (over 511 bytes encoded)
const ACCOUNTS = 'public.shm_accounts'; // two rows whose sum every transaction keeps
let postgres;
let db;
let port;
let store;
let daemon;

before(async () => {
  postgres = await startPostgres();
  db = new PgClient({ host: postgres.socketDir, user: 'postgres', database: 'postgres' });
  await db.connect();
  await db.query(`
    CREATE TABLE shm_items (id bigint PRIMARY KEY, name text, doc jsonb);
    INSERT INTO shm_items SELECT g, 'item ' || g, '{"k": [1, 2]}' FROM generate_series(1, 30) g;
    INSERT INTO shm_items VALUES (-7, 'negative', NULL), (1099511627776, 'past 32 bits', NULL), (-1099511627777, 'below', NULL);
    CREATE TABLE shm_big (id int PRIMARY KEY, padding text);
    INSERT INTO shm_big SELECT g, repeat('x', 100) FROM generate_series(1, 30000) g;
    CREATE TABLE shm_names (name text PRIMARY KEY, v int);
    INSERT INTO shm_names VALUES ('short', 1), ('é', 2), (repeat('m', 506), 3), (repeat('n', 507), 4), (repeat('o', 2000), 5);
    CREATE TABLE shm_accounts (id int PRIMARY KEY, v int);
    INSERT INTO shm_accounts VALUES (1, 500), (2, 500)`);
  port = await freePort();
  store = fs.mkdtempSync(path.join(os.tmpdir(), 'node-shm-'));
  daemon = await runDaemon();
});

/** A daemon keeping the test's tables in `store` (a new one takes the store over). */
async function runDaemon() {
  const probe = new CacheClient(`127.0.0.1:${port}`, { timeoutMs: 1000 });
  try {
    return await startDaemon(
      ['--dsn', postgres.dsn, '--table', ITEMS, '--table', BIG, '--table', NAMES, '--table', ACCOUNTS, '--install-triggers', '--listen', `127.0.0.1:${port}`, '--shared-memory', store],
      async () => (await probe.listTables()).every((t) => t.loaded),
    );
  } finally {
    probe.close();
  }
}

after(async () => {
  if (daemon) await daemon.stop();
  if (db) await db.end();
  if (postgres) await postgres.stop();
  if (store) fs.rmSync(store, { recursive: true, force: true });
});

async function sameAsGrpc(keys, table = ITEMS) {
  const local = new CacheClient(`127.0.0.1:${port}`, { sharedMemory: store });
  const remote = new CacheClient(`127.0.0.1:${port}`);
  try {
    await eventually(() => local.sharedMemory.refusalOf(table) === null, { what: 'the store serves the table' });
    const reads = local.sharedMemory.reads;
    assert.deepEqual(await local.batchGet(table, keys, { consistency: 'strong' }), await remote.batchGet(table, keys, { consistency: 'strong' }));
    for (const key of keys) assert.deepEqual(await local.get(table, key), await remote.get(table, key), `${table} ${key}`);
    assert.equal(local.sharedMemory.reads, reads + 1 + keys.length);
  } finally {
    local.close();
    remote.close();
  }
}

test('rows through the store equal rows over gRPC, after changes', async () => {
  const keys = [1, 2, 3, 5n, 31, 100, -7, -8, 1099511627776, -1099511627777, 1099511627777, -1099511627777n];
  await sameAsGrpc(keys);
  await db.query(`UPDATE shm_items SET name = 'changed' WHERE id IN (1, 2)`);
  await db.query(`DELETE FROM shm_items WHERE id = 3`);
  await db.query(`INSERT INTO shm_items VALUES (31, 'new', NULL)`);
  await db.query(`UPDATE shm_items SET id = 100 WHERE id = 5`);
  await sameAsGrpc(keys);
});

test('text keys through the store; keys too long for LMDB over gRPC', async () => {
  await sameAsGrpc(['short', 'é', 'm'.repeat(506), 'm'.repeat(505), 'absent'], NAMES); // (506: 511 bytes encoded)
  const local = new CacheClient(`127.0.0.1:${port}`, { sharedMemory: store });
  const remote = new CacheClient(`127.0.0.1:${port}`);
  try {
    for (const [key, v] of [['n'.repeat(507), 4], ['o'.repeat(2000), 5]]) {
      const refused = local.sharedMemory.refused;
      assert.equal((await local.get(NAMES, key)).v, v);
      assert.deepEqual(await local.get(NAMES, key), await remote.get(NAMES, key));
      assert.equal(local.sharedMemory.refused, refused + 2);
    }
    assert.equal(local.sharedMemory.errors, 0, String(local.sharedMemory.lastError));
  } finally {
    local.close();
    remote.close();
  }
});

test('a store bigger than LMDB\'s default map size is read', async () => {
  const local = new CacheClient(`127.0.0.1:${port}`, { sharedMemory: store });
  const remote = new CacheClient(`127.0.0.1:${port}`);
  try {
    await remote.sync();
    await eventually(() => local.sharedMemory.refusalOf(BIG) === null, { what: 'the store serves the big table' });
    const keys = [1, 15000, 30000, 30001];
    assert.deepEqual(await local.batchGet(BIG, keys), await remote.batchGet(BIG, keys));
    assert.equal(local.sharedMemory.reads, 1, String(local.sharedMemory.lastError));
  } finally {
    local.close();
    remote.close();
  }
});

test('a strong read through the store sees the commit before it', async () => {
  const cache = new CacheClient(`127.0.0.1:${port}`, { sharedMemory: store });
  try {
    await eventually(() => cache.sharedMemory.refusalOf(ITEMS) === null, { what: 'the store serves the table' });
    for (let version = 0; version < 10; version++) {
      await db.query(`UPDATE shm_items SET name = $1 WHERE id = 7`, [`v${version}`]);
      assert.equal((await cache.get(ITEMS, 7, { consistency: 'strong' })).name, `v${version}`);
    }
    assert.equal(cache.sharedMemory.reads, 10);
  } finally {
    cache.close();
  }
});

// In another process: read rows 1 and 2 in one store read, again and again, until stdin
// closes; then print every distinct sum seen, the reads the store answered, and how many
// distinct revisions they were at.
const SUM_READER = `
const shm = require(${JSON.stringify(path.join(__dirname, '..', 'src', 'shared-memory.js'))});
const [store, table] = process.argv.slice(1);
const reader = new shm.SharedMemory(store);
const sums = new Set();
const revisions = new Set();
let reads = 0;
let open = true;
process.stdin.on('end', () => { open = false; });
process.stdin.resume();
function spin() {
  const until = Date.now() + 20;
  while (Date.now() < until) {
    const answer = reader.read(table, [1, 2], null, false);
    if (answer && answer !== shm.WAIT && answer.rows.every((row) => row !== null)) {
      if (reads === 0) process.stdout.write('ready\\n');
      reads += 1;
      revisions.add(answer.revision);
      sums.add(answer.rows.reduce((sum, row) => sum + JSON.parse(row).v, 0));
    }
  }
  if (open) setImmediate(spin);
  else process.stdout.write(JSON.stringify({ sums: [...sums], reads, revisions: revisions.size }) + '\\n');
}
spin();
`;

test('readers in other processes never see half a transaction', async () => {
  const { spawn } = require('node:child_process');
  const readers = [0, 1].map(() => {
    const child = spawn(process.execPath, ['-e', SUM_READER, store, ACCOUNTS], { stdio: ['pipe', 'pipe', 'inherit'] });
    let out = '';
    child.stdout.on('data', (chunk) => {
      out += chunk;
    });
    const done = new Promise((resolve) => child.once('exit', resolve));
    return { child, done, out: () => out };
  });
  try {
    for (const reader of readers) await eventually(() => reader.out().startsWith('ready'), { what: 'a reader reading' });
    for (let step = 0; step < 200; step++) {
      const amount = (step % 7) + 1;
      await db.query('BEGIN');
      await db.query('UPDATE shm_accounts SET v = v - $1 WHERE id = 1', [amount]);
      await db.query('UPDATE shm_accounts SET v = v + $1 WHERE id = 2', [amount]);
      await db.query('COMMIT');
    }
    const cache = new CacheClient(`127.0.0.1:${port}`);
    try {
      await cache.sync();
    } finally {
      cache.close();
    }
  } finally {
    for (const reader of readers) reader.child.stdin.end();
  }
  for (const reader of readers) {
    await reader.done;
    const seen = JSON.parse(reader.out().trim().split('\n').pop());
    assert.ok(seen.reads > 0 && seen.revisions > 10, `the reader read while the writes went on: ${JSON.stringify(seen)}`);
    assert.deepEqual(seen.sums, [1000]);
  }
});

test('a stopped daemon is not trusted: reads go over gRPC', async () => {
  const reader = new shm.SharedMemory(store);
  try {
    await eventually(() => reader.refusalOf(ITEMS) === null, { what: 'the store serves the table' });
    await daemon.stop();
    daemon = null;
    assert.match(reader.refusalOf(ITEMS), /source is down/);
    assert.equal(reader.read(ITEMS, [1], null, false), null);
    assert.notEqual(reader.read(ITEMS, [1], null, true), null); // allowStale still may
  } finally {
    reader.close();
  }
});

test('a killed daemon is not trusted once its heartbeat is older than the bound', async () => {
  daemon = await runDaemon(); // (the one before was stopped)
  const reader = new shm.SharedMemory(store);
  try {
    await eventually(() => reader.refusalOf(ITEMS) === null, { what: 'the store serves the table' });
    assert.notEqual(reader.read(ITEMS, [1], null, false), null);
    const killed = Date.now();
    await daemon.kill(); // (SIGKILL: the store says nothing more; its heartbeat ages)
    daemon = null;
    await eventually(() => /heartbeat is old/.test(reader.refusalOf(ITEMS) || ''), {
      timeoutMs: shm.FRESH_BOUND_MS + 5000,
      what: 'the heartbeat judged old',
    });
    assert.ok(Date.now() - killed <= shm.FRESH_BOUND_MS + 1000, `refused ${Date.now() - killed} ms after the kill`);
    assert.equal(reader.read(ITEMS, [1], null, false), null);
    assert.notEqual(reader.read(ITEMS, [1], null, true), null); // allowStale still may
  } finally {
    reader.close();
  }
});
