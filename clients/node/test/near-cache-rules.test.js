'use strict';
// The near-cache's rules without a server (as tests/unit/test_near_cache.py for
// Python's): ordering by revision, fills overtaken by changes, flushes, bounds, keys.

const { test } = require('node:test');
const assert = require('node:assert/strict');
const { NearCache, ABSENT } = require('../src/near-cache.js');

const T = 'public.items';

function near(limit = 100, keyColumns = [{ name: 'id', type: 'bigint' }]) {
  const cache = new NearCache(new Map([[T, limit]]));
  cache.learnKeys([{ name: T, keyColumns }]);
  cache.connect();
  cache.mark({ epoch: 'e', number: '10' });
  return cache;
}

const rev = (number, epoch = 'e') => ({ epoch, number: String(number) });
const batch = (number, ...changes) => ({ revision: rev(number), changes });
const update = (key, version) => ({ table: T, key: BigInt(key), oldKey: null, row: version === null ? null : { id: key, version }, hasRow: version !== null });

function fill(cache, key, version, revision) {
  const slot = cache.slot(T, key);
  const ticket = cache.beginFill(T, slot);
  cache.endFill(T, slot, ticket, { id: key, version }, rev(revision));
}

const held = (cache, key) => {
  const hit = cache.lookup(T, cache.slot(T, key));
  return hit && hit.row;
};

test('filled on read, then changes apply in revision order', () => {
  const cache = near();
  assert.equal(held(cache, 1), null);
  fill(cache, 1, 5, 12);
  assert.deepEqual(held(cache, 1), { id: 1, version: 5 });
  cache.apply(batch(11, update(1, 4))); // older than the fill: ignored
  assert.equal(held(cache, 1).version, 5);
  cache.apply(batch(13, update(1, 6)));
  assert.equal(held(cache, 1).version, 6);
  cache.apply(batch(14, update(1, null))); // no row now: dropped
  assert.equal(held(cache, 1), null);
  assert.deepEqual(cache.position, rev(14));
  assert.deepEqual([cache.stats.hits, cache.stats.misses], [3, 2]);
});

test('a row marked ahead drops the key rather than being served', () => {
  const cache = near();
  fill(cache, 1, 5, 12);
  cache.apply(batch(13, { ...update(1, 6), ahead: true }));
  assert.equal(held(cache, 1), null);
});

test('changes do not insert keys nobody read', () => {
  const cache = near();
  cache.apply(batch(11, update(7, 1)));
  assert.equal(cache.size, 0);
});

test('a fill overtaken by a change of its key is not stored', () => {
  const cache = near();
  const slot = cache.slot(T, 1);
  const ticket = cache.beginFill(T, slot);
  cache.apply(batch(11, update(1, 9))); // arrives while the read is in flight
  cache.endFill(T, slot, ticket, { id: 1, version: 8 }, rev(10));
  assert.equal(cache.size, 0);
  assert.equal(cache.stats.staleFillsDropped, 1);
});

test('a fill overtaken by a flush or a disconnect is not stored', () => {
  const cache = near();
  let ticket = cache.beginFill(T, '1');
  cache.apply(batch(11, { table: T, key: null, oldKey: null, row: null, hasRow: false })); // truncate
  cache.endFill(T, '1', ticket, { id: 1 }, rev(11));
  assert.equal(cache.size, 0);
  ticket = cache.beginFill(T, '2');
  cache.disconnect();
  cache.endFill(T, '2', ticket, { id: 2 }, rev(11));
  assert.equal(cache.size, 0);
  assert.equal(cache.slot(T, 2), null); // not connected: reads go to the sidecar
});

test('a reset and a disconnect empty it; fills from another epoch are not stored', () => {
  const cache = near();
  fill(cache, 1, 1, 11);
  cache.reset(rev(1, 'e2'));
  assert.equal(cache.size, 0);
  assert.deepEqual(cache.position, rev(1, 'e2'));
  fill(cache, 2, 1, 99); // revision of epoch 'e'
  assert.equal(cache.size, 0);
});

test('"no such row" is held too, and an insert replaces it', () => {
  const cache = near();
  const ticket = cache.beginFill(T, '3');
  cache.endFill(T, '3', ticket, ABSENT, rev(11));
  assert.equal(held(cache, 3), ABSENT);
  cache.apply(batch(12, update(3, 1)));
  assert.deepEqual(held(cache, 3), { id: 3, version: 1 });
});

test('LRU bound, and a key that moved', () => {
  const cache = near(2);
  fill(cache, 1, 1, 11);
  fill(cache, 2, 1, 11);
  held(cache, 1);
  fill(cache, 3, 1, 11); // evicts 2, the least recently used
  assert.equal(held(cache, 2), null);
  assert.ok(held(cache, 1));
  assert.equal(cache.stats.evictions, 1);
  fill(cache, 4, 1, 11);
  cache.apply(batch(12, { table: T, key: 40n, oldKey: 4n, row: { id: 40 }, hasRow: true })); // key 4 moved to 40
  assert.equal(held(cache, 4), null);
});

test('a key read as 7, 7n or "7" is the entry an event for 7n updates', () => {
  const cache = near();
  assert.equal(cache.slot(T, 7), cache.slot(T, 7n));
  assert.equal(cache.slot(T, '7'), cache.slot(T, 7n));
  for (const unsure of ['07', ' 7', '7.0', 7.5, true]) assert.equal(cache.slot(T, unsure), null, String(unsure));
  const uuid = near(10, [{ name: 'id', type: 'uuid' }]);
  assert.equal(uuid.slot(T, 'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11'), 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11');
  assert.equal(uuid.slot(T, '{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}'), null);
  const composite = near(10, [{ name: 'a', type: 'integer' }, { name: 'b', type: 'text' }]);
  assert.equal(composite.slot(T, [1, 'x']), composite.slot(T, [1n, 'x']));
  assert.equal(composite.slot(T, 1), null);
  const other = near(10, [{ name: 'at', type: 'timestamp with time zone' }]);
  assert.equal(other.slot(T, '2024-01-01'), null); // its text form is the sidecar's to choose: not near-cached
});
