'use strict';
// Near-cache hit vs a sidecar Get vs a direct PostgreSQL query, in one run:
//
//   npm run bench      (in clients/node; SIDECAR_PYTHON: the Python with cache-sidecar, default ../../.venv)
//
// Starts its own PostgreSQL (pgserver) and daemon, like the tests. Point reads
// of one row by primary key, one at a time (latency, not throughput), over
// loopback TCP for gRPC and the Unix socket for PostgreSQL.

const { Client: PgClient } = require('pg');
const { CacheClient } = require('../src/index.js');
const { freePort, eventually, startPostgres, startDaemon } = require('../test/support.js');

const ROWS = 1000;

async function measure(count, read) {
  for (let i = 0; i < Math.min(count, 500); i++) await read(i % ROWS); // warm up
  const took = new Float64Array(count);
  for (let i = 0; i < count; i++) {
    const start = process.hrtime.bigint();
    await read(i % ROWS);
    took[i] = Number(process.hrtime.bigint() - start) / 1000; // µs
  }
  took.sort();
  const at = (q) => took[Math.min(count - 1, Math.floor(q * count))];
  return { count, p50: at(0.5), p99: at(0.99), mean: took.reduce((a, b) => a + b, 0) / count };
}

async function main() {
  const postgres = await startPostgres();
  const db = new PgClient({ host: postgres.socketDir, user: 'postgres', database: 'postgres' });
  await db.connect();
  await db.query(`CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, price numeric, tags text[]);
                  INSERT INTO items SELECT g, 'item ' || g, g * 1.25, ARRAY['a', 'b'] FROM generate_series(1, ${ROWS}) g`);
  const port = await freePort();
  const target = `127.0.0.1:${port}`;
  const probe = new CacheClient(target, { timeoutMs: 1000 });
  const daemon = await startDaemon(
    ['--dsn', postgres.dsn, '--table', 'public.items', '--install-triggers', '--listen', target],
    async () => (await probe.listTables()).every((t) => t.loaded),
  );
  probe.close();
  const plain = new CacheClient(target);
  const near = new CacheClient(target, { nearCache: { 'public.items': ROWS } });
  try {
    await eventually(() => near.nearCache.connected, { what: 'near-cache stream up' });
    for (let id = 1; id <= ROWS; id++) await near.get('public.items', id); // fill
    const results = [
      ['near-cache hit', await measure(200000, (i) => near.get('public.items', i + 1))],
      ['sidecar Get (gRPC)', await measure(5000, (i) => plain.get('public.items', i + 1))],
      [
        'PostgreSQL query (pg)',
        await measure(5000, (i) =>
          db.query({ name: 'one', text: 'SELECT row_to_json(t) FROM items t WHERE id = $1', values: [i + 1] }),
        ),
      ],
    ];
    const { hits, misses } = near.nearCache.stats;
    if (misses > ROWS) throw new Error(`the near-cache missed ${misses} times: not measuring hits`);
    const base = results[0][1].mean;
    const cell = (value, width) => value.padStart(width);
    console.log(`Node ${process.version}, ${ROWS} rows, one read at a time; latency in µs (near-cache hits: ${hits})\n`);
    console.log(`${'read'.padEnd(24)}${cell('reads', 8)}${cell('p50', 10)}${cell('p99', 10)}${cell('mean', 10)}${cell('× near', 10)}`);
    for (const [name, r] of results) {
      const f = (x) => x.toFixed(x < 10 ? 2 : 1);
      console.log(`${name.padEnd(24)}${cell(String(r.count), 8)}${cell(f(r.p50), 10)}${cell(f(r.p99), 10)}${cell(f(r.mean), 10)}${cell(`${Math.round(r.mean / base)}×`, 10)}`);
    }
  } finally {
    near.close();
    plain.close();
    await daemon.stop();
    await db.end();
    await postgres.stop();
  }
}

main().catch((error) => {
  console.error(error);
  process.exitCode = 1;
});
