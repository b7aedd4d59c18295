'use strict';
// watch() resumption against a scripted stub (no server): which statuses are
// resumed, from where, and what the caller is told.

const { test } = require('node:test');
const assert = require('node:assert/strict');
const { EventEmitter } = require('node:events');
const grpc = require('@grpc/grpc-js');
const { CacheClient } = require('../src/index.js');
const { Resumer } = require('../src/resume.js');

class FakeCall extends EventEmitter {
  constructor(script) {
    super();
    this.paused = false;
    setImmediate(() => this.play(script));
  }

  play(script) {
    for (const step of script) {
      if (step.revision) {
        const metadata = new grpc.Metadata();
        metadata.set('cachesidecar-epoch', step.revision.epoch);
        metadata.set('cachesidecar-revision', `${step.revision.epoch}/${step.revision.number}`);
        this.emit('metadata', metadata);
      } else if (step.code !== undefined) {
        // as grpc-js: the error at once, the end once the buffer is drained
        this.emit('error', Object.assign(new Error(step.details), { code: step.code, details: step.details }));
        setImmediate(() => this.emit('end'));
        return;
      } else {
        this.emit('data', step);
      }
    }
  }

  pause() {
    this.paused = true;
  }

  resume() {
    this.paused = false;
  }

  isPaused() {
    return this.paused;
  }

  cancel() {}
}

function client(...scripts) {
  const cache = new CacheClient('127.0.0.1:1');
  cache.requests = [];
  cache.stub = {
    close() {},
    Watch(request) {
      cache.requests.push(request);
      return new FakeCall(scripts.shift() || [{ code: grpc.status.UNAVAILABLE, details: 'no more scripts' }]);
    },
  };
  return cache;
}

const changes = (number) => ({
  kind: 'changes',
  changes: {
    revision: { epoch: 'e', number: String(number) },
    xid: '1',
    events: [{ table: 'public.t', operation: 'UPDATE', key: { parts: [{ kind: 'intValue', intValue: String(number) }] }, oldKey: null, row: Buffer.from('{}'), hasRow: true }],
  },
});
const headers = (number) => ({ revision: { epoch: 'e', number: String(number) } });
const failing = (code, details = 'cut') => ({ code, details });

async function take(iterator, count) {
  const items = [];
  for await (const item of iterator) {
    items.push(item);
    if (items.length === count) break;
  }
  return items;
}

test('a cut stream resumes after the last revision delivered, skipping a repeated batch', async () => {
  const cache = client(
    [headers(4), changes(5), changes(6), failing(grpc.status.UNAVAILABLE)],
    [headers(6), changes(6), changes(7)],
  );
  const items = await take(cache.watch(['public.t']), 3);
  assert.deepEqual(items.map((i) => i.revision.number), ['5', '6', '7']);
  assert.deepEqual(cache.requests[1].startRevision, { epoch: 'e', number: '6' });
  assert.equal(cache.requests[1].initialState, false);
  cache.close();
});

test('a stream that fell behind (RESOURCE_EXHAUSTED once established) resumes; before the headers it is thrown', async () => {
  const behind = client([headers(1), changes(2), failing(grpc.status.RESOURCE_EXHAUSTED)], [headers(2), changes(3)]);
  assert.deepEqual((await take(behind.watch(), 2)).map((i) => i.revision.number), ['2', '3']);
  behind.close();
  const tooLarge = client([failing(grpc.status.RESOURCE_EXHAUSTED, 'request too large')]);
  await assert.rejects(take(tooLarge.watch(), 1), (error) => error.code === 'RESOURCE_EXHAUSTED');
  assert.equal(tooLarge.requests.length, 1);
});

test('FAILED_PRECONDITION (a row too large to send) is thrown, never resumed', async () => {
  const cache = client([headers(1), changes(2), failing(grpc.status.FAILED_PRECONDITION, 'row too large')], [changes(3)]);
  const seen = [];
  await assert.rejects(
    (async () => {
      for await (const item of cache.watch()) seen.push(item);
    })(),
    (error) => error.code === 'FAILED_PRECONDITION' && /row too large/.test(error.message),
  );
  assert.equal(seen.length, 1); // the batch before the error is delivered first
  assert.equal(cache.requests.length, 1);
});

test('OUT_OF_RANGE: a reset, then the stream starts over from now', async () => {
  const cache = client([failing(grpc.status.OUT_OF_RANGE, 'revision e/3 is gone')], [headers(9), changes(10)]);
  const items = await take(cache.watch([], { startRevision: { epoch: 'e', number: '3' } }), 2);
  assert.deepEqual(items[0], { type: 'reset', revision: null, reason: 'resync: revision e/3 is gone' });
  assert.equal(items[1].revision.number, '10');
  assert.equal(cache.requests[1].startRevision, null);
  cache.close();
});

test('a cut in the initial state: a reset, then the initial state again', async () => {
  const snapshot = (number) => ({ ...changes(number), changes: { ...changes(number).changes, revision: { epoch: 'e', number: '5' } } });
  const cache = client(
    [headers(5), snapshot(1), failing(grpc.status.UNAVAILABLE)],
    [headers(5), snapshot(1), { kind: 'initialStateDone', initialStateDone: { revision: { epoch: 'e', number: '5' } } }],
  );
  const items = await take(cache.watch([], { initialState: true }), 4);
  assert.deepEqual(items.map((i) => i.type), ['changes', 'reset', 'changes', 'initialStateDone']);
  assert.equal(items[1].reason, 'resync: the initial state was interrupted');
  assert.equal(cache.requests[1].initialState, true);
  assert.equal(cache.requests[1].startRevision, null);
  cache.close();
});

test('{ resume: false } throws the first error', async () => {
  const cache = client([headers(1), failing(grpc.status.UNAVAILABLE)]);
  await assert.rejects(take(cache.watch([], { resume: false }), 1), (error) => error.code === 'UNAVAILABLE');
});

test('a stream cut before any message resumes from the revision in its headers', () => {
  const resumer = new Resumer({ tables: [], initialState: false, startRevision: null });
  const metadata = new grpc.Metadata();
  metadata.set('cachesidecar-revision', 'ep/och/42');
  resumer.established(metadata);
  assert.deepEqual(resumer.nextRequest().startRevision, { epoch: 'ep/och', number: '42' });
});
