'use strict';
// The Node reader of the shared-memory store, in a fresh process, against a running
// daemon and its store (tests/benchmarks/shared_memory.py runs it beside the Python
// figures):
//
//   node bench/shared-memory.js TARGET STORE_DIR TABLE ROWS READS
//
// Prints one JSON line: { name: [p50 µs, p99 µs] } for Get through the store on keys
// this process never read before (first touch), the same keys again, BatchGet(100)
// through the store, and Get over gRPC. Every read is awaited, as an application does.

const { CacheClient } = require('../src/index.js');

function stats(samples) {
  const sorted = Float64Array.from(samples).sort();
  return [sorted[Math.floor(sorted.length / 2)], sorted[Math.floor(0.99 * sorted.length)]];
}

async function timed(items, read) {
  const took = [];
  for (const item of items) {
    const start = process.hrtime.bigint();
    await read(item);
    took.push(Number(process.hrtime.bigint() - start) / 1000);
  }
  return took;
}

function distinct(count, rows, seed) {
  // (a small LCG: the same keys every run; a partial Fisher-Yates over 1..rows)
  let state = seed;
  const random = () => {
    state = (state * 1103515245 + 12345) % 2147483648;
    return state / 2147483648;
  };
  const picked = new Map();
  const keys = [];
  for (let i = 0; i < Math.min(count, rows); i++) {
    const j = i + Math.floor(random() * (rows - i));
    const at = picked.get(j) ?? j;
    picked.set(j, picked.get(i) ?? i);
    keys.push(at + 1);
  }
  return keys;
}

async function main() {
  const [target, store, table, rowsArg, readsArg] = process.argv.slice(2);
  const rows = Number(rowsArg);
  const reads = Number(readsArg);
  const local = new CacheClient(target, { sharedMemory: store });
  const remote = new CacheClient(target);
  try {
    if (local.sharedMemory.refusalOf(table) !== null) throw new Error(`the store does not serve ${table}`);
    await remote.get(table, 1); // (the channel connected)
    const keys = distinct(reads + 100 * Math.max(10, Math.floor(reads / 100)), rows, 13);
    const gets = keys.slice(0, reads);
    const batches = [];
    for (let i = reads; i + 100 <= keys.length; i += 100) batches.push(keys.slice(i, i + 100));
    const out = {};
    out['Get, store (first touch)'] = stats(await timed(gets, (key) => local.get(table, key)));
    out['Get, store (touched before)'] = stats(await timed(gets, (key) => local.get(table, key)));
    out['BatchGet(100), store'] = stats(await timed(batches, (batch) => local.batchGet(table, batch)));
    if (local.sharedMemory.reads !== 2 * gets.length + batches.length) {
      throw new Error(`the store answered ${local.sharedMemory.reads} reads, not all: ${local.sharedMemory.lastError}`);
    }
    out['Get, gRPC'] = stats(await timed(gets.slice(0, Math.max(100, Math.floor(reads / 10))), (key) => remote.get(table, key)));
    console.log(JSON.stringify(out));
  } finally {
    local.close();
    remote.close();
  }
}

main().catch((error) => {
  console.error(error);
  process.exitCode = 1;
});
