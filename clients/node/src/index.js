'use strict';
// Node.js client for cache-sidecar: a small wrapper over @grpc/grpc-js that
// loads the API from proto/ at run time.
//
//   const { CacheClient } = require('cache-sidecar-client');
//   const cache = new CacheClient('127.0.0.1:50051');
//   const patron = await cache.get('public.patron', 1);   // object or null
//   for await (const item of cache.watch(['public.patron'])) { ... }
//
// Rows are JSON objects, parsed with JSON.parse (integers beyond 2^53 lose
// precision) unless { decode: 'exact' } (see exact-json.js) or your own
// { decodeRow }. Integer key parts come back as BigInt. Revisions are
// { epoch, number } with `number` a decimal string (it is a uint64).
// watch() resumes by itself (decisions in resume.js); { nearCache } keeps
// rows in the process, coherent through a watch of its own (near-cache.js).

const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const { parseExact } = require('./exact-json.js');
const { keyPart, toKey, fromKey, batchKeys } = require('./keys.js');
const { NearCache, nearCacheTables, qualified, ABSENT } = require('./near-cache.js');
const { Resumer, resumable } = require('./resume.js');
const { SharedMemory, WAIT, POLL_MS } = require('./shared-memory.js');

const PROTO_FILE = 'cachesidecar/v1/cache.proto';
const PROTO_ROOTS = [
  path.join(__dirname, '..', 'proto'), // a published package carries a copy
  path.join(__dirname, '..', '..', '..', 'proto'), // the repository
];

function loadApi() {
  const root = PROTO_ROOTS.find((dir) => fs.existsSync(path.join(dir, PROTO_FILE)));
  if (!root) throw new Error(`cannot find ${PROTO_FILE} under ${PROTO_ROOTS.join(' or ')}`);
  const definition = protoLoader.loadSync(PROTO_FILE, {
    includeDirs: [root],
    keepCase: false,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).cachesidecar.v1;
}

const api = loadApi();

const CONNECTED = Symbol('connected'); // internal: a watch stream is established
const DISCONNECTED = Symbol('disconnected'); // internal: it broke (it will be resumed)
const NEAR_CACHE_PROGRESS_MS = 5000; // position marks while the near-cached tables are quiet

/** An error from the sidecar; `code` is the gRPC status name (e.g. 'NOT_FOUND'). */
class CacheSidecarError extends Error {
  constructor(error) {
    const code = Object.keys(grpc.status).find((name) => grpc.status[name] === error.code) || 'UNKNOWN';
    super(`${code}: ${error.details || error.message}`);
    this.name = 'CacheSidecarError';
    this.code = code;
    this.details = error.details;
    this.metadata = error.metadata;
  }
}

/**
 * A row the decoder could not read (the message names its table, its key and the
 * decoder's error, `cause`). Only that read fails: other rows, the near-cache and a
 * watch stream go on (in a stream the change comes with `undecodable: true`).
 */
class UndecodableRowError extends Error {
  constructor(table, key, cause) {
    super(`a row of ${table} (key ${describeKey(key)}) could not be decoded: ${cause && cause.message ? cause.message : cause}`);
    this.name = 'UndecodableRowError';
    this.table = table;
    this.key = key;
    this.cause = cause;
  }
}

function describeKey(key) {
  try {
    return JSON.stringify(key, (_, v) => (typeof v === 'bigint' ? v.toString() : v)) ?? String(key);
  } catch {
    return String(key);
  }
}

function readOptions({ consistency = 'eventual', minRevision, allowStale = false } = {}) {
  return {
    consistency: consistency === 'strong' ? 'STRONG' : 'EVENTUAL',
    minRevision: minRevision || null,
    allowStale,
  };
}

class CacheClient {
  /**
   * @param {string} target 'host:port' or 'unix:///path/to/socket'
   * @param {{timeoutMs?: number, credentials?: object, decode?: 'json' | 'exact',
   *          decodeRow?: (bytes: Buffer) => any, nearCache?: Record<string, number> | string[],
   *          sharedMemory?: string}} options
   */
  constructor(
    target = '127.0.0.1:50051',
    { timeoutMs = 5000, credentials, decode = 'json', decodeRow, nearCache, sharedMemory } = {},
  ) {
    if (decode !== 'json' && decode !== 'exact') throw new TypeError(`decode must be 'json' or 'exact', not ${decode}`);
    this.target = target;
    this.timeoutMs = timeoutMs;
    this.decodeRow = decodeRow || (decode === 'exact' ? parseExact : (bytes) => JSON.parse(bytes.toString('utf8')));
    this.stub = new api.Cache(target, credentials || grpc.credentials.createInsecure());
    this.lastRevision = null;
    this.closed = false;
    this._calls = new Set(); // open Watch calls, cancelled by close()
    this._sleepers = new Set(); // backoff waits, cut short by close()
    const tables = nearCacheTables(nearCache);
    /** The near-cache (its `stats` count hits and misses), if configured. */
    this.nearCache = tables.size ? new NearCache(tables) : null;
    this._follower = this.nearCache ? this._follow() : null;
    /** Reads of the sidecar's shared-memory store in this directory (docs/shared-memory.md), if given. */
    this.sharedMemory = sharedMemory ? new SharedMemory(sharedMemory) : null;
  }

  /** Rows read from the shared-memory store, or null: ask over gRPC. A STRONG read is one
   * Sync, then a wait until the store holds its revision, then the read. */
  async _fromStore(table, keys, options) {
    const store = this.sharedMemory;
    const name = qualified(table);
    const allowStale = Boolean(options.allowStale);
    let target = options.minRevision || null;
    if (options.consistency === 'strong') {
      if (store.refusalOf(name, allowStale) !== null) return null; // (no barrier of our own then)
      target = await this.sync({ timeoutMs: options.timeoutMs });
    }
    const deadline = Date.now() + (options.timeoutMs ?? this.timeoutMs);
    let answer;
    while ((answer = store.read(name, keys, target, allowStale)) === WAIT) {
      if (Date.now() >= deadline) return null;
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    }
    if (answer === null) return null;
    this.lastRevision = { epoch: answer.epoch, number: answer.revision };
    return answer.rows.map((row) => (row === null ? null : this.decodeRow(row)));
  }

  _unary(method, request, timeoutMs) {
    const deadline = new Date(Date.now() + (timeoutMs ?? this.timeoutMs));
    return new Promise((resolve, reject) => {
      this.stub[method](request, { deadline }, (error, reply) => {
        if (error) reject(new CacheSidecarError(error));
        else {
          if (reply.revision) this.lastRevision = reply.revision;
          resolve(reply);
        }
      });
    });
  }

  /** The decoded row (null if not found); UndecodableRowError if the decoder throws. */
  _row(result, table, key) {
    if (!result.found) return null;
    try {
      return this.decodeRow(result.row);
    } catch (error) {
      throw new UndecodableRowError(qualified(table), key, error);
    }
  }

  /** The near-cache if it may answer this read (it never answers minRevision or allowStale reads). */
  _near(table, options) {
    const near = this.nearCache;
    if (near === null || !near.connected || !near.limits.has(qualified(table))) return null;
    return options.minRevision || options.allowStale ? null : near;
  }

  /** Reads of near-cached tables never go behind what its stream has applied. */
  _readOptions(table, options) {
    const near = this.nearCache;
    if (!options.minRevision && near !== null && near.limits.has(qualified(table)) && near.position) {
      return readOptions({ ...options, minRevision: near.position });
    }
    return readOptions(options);
  }

  /** One row by primary key, or null. options: { consistency: 'strong', minRevision, allowStale, timeoutMs } */
  async get(table, key, options = {}) {
    if (this.sharedMemory !== null) {
      const stored = await this._fromStore(table, [key], options);
      if (stored !== null) return stored[0];
    }
    const near = this._near(table, options);
    const name = qualified(table);
    const slot = near === null ? null : near.slot(name, key);
    if (slot !== null && options.consistency !== 'strong') {
      const hit = near.lookup(name, slot);
      if (hit !== null) return copy(hit.row);
    }
    const ticket = slot === null ? null : near.beginFill(name, slot);
    let reply;
    try {
      reply = await this._unary('Get', { table, key: toKey(key), options: this._readOptions(table, options) }, options.timeoutMs);
    } catch (error) {
      if (ticket !== null) near.endFill(name, slot, ticket, null, null);
      throw error;
    }
    let row;
    try {
      row = this._row(reply, table, key);
    } catch (error) {
      if (ticket !== null) near.endFill(name, slot, ticket, null, null); // (released: later reads fill the key)
      throw error;
    }
    if (ticket === null) return row;
    near.endFill(name, slot, ticket, row === null ? ABSENT : row, reply.revision);
    return copy(row);
  }

  /** Rows in the order of `keys` (null where there is none). */
  async batchGet(table, keys, options = {}) {
    if (this.sharedMemory !== null) {
      const stored = await this._fromStore(table, keys, options);
      if (stored !== null) return stored;
    }
    const near = this._near(table, options);
    const name = qualified(table);
    const results = new Array(keys.length).fill(null);
    let missing = keys.map((_, i) => i);
    const slots = near === null ? [] : keys.map((key) => near.slot(name, key));
    if (near !== null && options.consistency !== 'strong') {
      missing = [];
      keys.forEach((key, i) => {
        const hit = slots[i] === null ? null : near.lookup(name, slots[i]);
        if (hit !== null) results[i] = copy(hit.row);
        else missing.push(i);
      });
    }
    if (!missing.length) return results;
    const tickets = missing.map((i) => (near === null || slots[i] === null ? null : near.beginFill(name, slots[i])));
    const wanted = missing.map((i) => keys[i]);
    let reply;
    try {
      const request = { table, options: this._readOptions(table, options), ...batchKeys(wanted) };
      reply = await this._unary('BatchGet', request, options.timeoutMs);
    } catch (error) {
      missing.forEach((i, n) => tickets[n] !== null && near.endFill(name, slots[i], tickets[n], null, null));
      throw error;
    }
    let failed = null;
    missing.forEach((i, n) => {
      let row;
      try {
        row = this._row(reply.rows[n], table, keys[i]);
      } catch (error) {
        failed = failed || error;
        if (tickets[n] !== null) near.endFill(name, slots[i], tickets[n], null, null); // (released, not filled)
        return;
      }
      if (tickets[n] === null) {
        results[i] = row;
      } else {
        near.endFill(name, slots[i], tickets[n], row === null ? ABSENT : row, reply.revision);
        results[i] = copy(row);
      }
    });
    if (failed !== null) throw failed; // (every ticket ended first: the other rows are near-cached)
    return results;
  }

  /**
   * Rows by a secondary index declared in the sidecar's config: with `values`
   * (scalars, or arrays for a several-column index) those whose index columns
   * equal one of them, in primary-key order; otherwise (range indexes) those
   * between `lower` and `upper` (unset: unbounded), in index order.
   * Resolves to { rows, truncated, revision }; `truncated`: more than `limit` matched.
   * options: { values, lower, upper, lowerExclusive, upperExclusive, limit, descending,
   *            consistency, minRevision, allowStale, timeoutMs }
   */
  async query(table, index, options = {}) {
    const { values, lower, upper, lowerExclusive = false, upperExclusive = false, limit = 0, descending = false } = options;
    const request = { table, index, limit, descending, options: readOptions(options) };
    if (values !== undefined && values !== null) {
      if (lower !== undefined || upper !== undefined) throw new TypeError('give values or lower/upper, not both');
      if (!values.length) return { rows: [], truncated: false, revision: this.lastRevision };
      request.values = values.map(toKey);
    } else {
      request.range = { lowerExclusive, upperExclusive };
      if (lower !== undefined && lower !== null) request.range.lower = keyPart(lower);
      if (upper !== undefined && upper !== null) request.range.upper = keyPart(upper);
    }
    const reply = await this._unary('Query', request, options.timeoutMs);
    return { rows: reply.rows.map((row) => this._row(row, table, null)), truncated: reply.truncated, revision: reply.revision };
  }

  /** Drop cached rows (the whole table when `keys` is null); `refresh` refetches now. */
  async invalidate(table, keys = null, { refresh = false, timeoutMs } = {}) {
    const request = keys === null ? { table, allRows: true, refresh } : { table, keys: keys.map(toKey), refresh };
    return (await this._unary('Invalidate', request, timeoutMs)).revision;
  }

  /** Read barrier: resolves once every commit before the call is in the cache. */
  async sync({ timeoutMs } = {}) {
    return (await this._unary('Sync', {}, timeoutMs)).revision;
  }

  async listTables({ timeoutMs } = {}) {
    const reply = await this._unary('ListTables', {}, timeoutMs);
    return reply.tables.map((t) => ({
      name: t.name,
      keyColumns: t.keyColumns,
      mode: t.mode.toLowerCase(),
      rowCount: Number(t.rowCount),
      loaded: t.loaded,
      indexes: t.indexes.map((i) => ({ name: i.name, columns: i.columns, unique: i.unique, range: i.range })),
      problem: t.problem || '', // set while the table is not served from memory, saying why
    }));
  }

  /**
   * Changes as an async iterator of
   *   { type: 'changes', revision, xid, changes: [{ table, operation, key, oldKey, row, hasRow, ahead }] }
   *   { type: 'reset', revision, reason }   discard what you derived from the stream
   *   { type: 'progress', revision }
   *   { type: 'initialStateDone', revision }
   * Stop with `break` (the call is cancelled). When the connection drops (or the
   * sidecar ends a subscriber that fell behind), it reconnects with backoff and
   * resumes after the last revision it delivered: no gap, no duplicate. When
   * that cannot be done (the revision is gone from the sidecar's history, or
   * the initial state was cut), it yields a reset (revision null, reason
   * 'resync: ...') and starts over, with the initial state again if asked.
   * A row too large to send (FAILED_PRECONDITION) is thrown, never resumed.
   * { resume: false }: throw CacheSidecarError on any error instead.
   */
  async *watch(tables = [], options = {}) {
    for await (const item of this._stream(watchRequest(tables, options), options.resume ?? true)) {
      if (typeof item !== 'symbol') yield item;
    }
  }

  /** Watch items, with CONNECTED and DISCONNECTED marks around each established stream. */
  async *_stream(request, resume) {
    const resumer = new Resumer(request);
    while (!this.closed) {
      const call = this.stub.Watch(resumer.nextRequest());
      this._calls.add(call);
      let connected = false;
      let failure = null;
      try {
        for await (const part of streamOf(call)) {
          if (part.metadata !== undefined) {
            if (!connected && part.metadata.get('cachesidecar-epoch').length) {
              connected = true;
              resumer.established(part.metadata);
              yield CONNECTED;
            }
            continue;
          }
          for (const item of this._events(part.message)) {
            if (resumer.duplicate(item)) continue;
            resumer.seen(item);
            yield item;
          }
        }
      } catch (error) {
        failure = error;
      } finally {
        call.cancel();
        this._calls.delete(call);
      }
      if (this.closed) return;
      if (failure !== null) {
        if (typeof failure.code !== 'number') throw failure; // not the call's: e.g. decodeRow threw
        if (resume && failure.code === grpc.status.OUT_OF_RANGE) {
          if (connected) yield DISCONNECTED;
          yield resumer.outOfRange(failure.details);
          await this._sleep(resumer.delayMs());
          continue;
        }
        if (!resume || !resumable(failure.code, connected)) throw new CacheSidecarError(failure);
      }
      if (!resume) return;
      if (connected) yield DISCONNECTED;
      const reset = resumer.interrupted();
      if (reset !== null) yield reset;
      await this._sleep(resumer.delayMs());
    }
  }

  /** The near-cache's own stream: it connects the near-cache, feeds it, and empties it when cut. */
  async _follow() {
    const near = this.nearCache;
    const request = watchRequest(near.tables, { progressIntervalMs: NEAR_CACHE_PROGRESS_MS });
    while (!this.closed) {
      try {
        for await (const item of this._stream(request, true)) {
          if (item === CONNECTED) {
            near.learnKeys(await this.listTables());
            near.connect();
          } else if (item === DISCONNECTED) {
            near.disconnect();
          } else if (item.type === 'reset') {
            near.reset(item.revision);
          } else if (item.type === 'changes') {
            near.apply(item);
          } else {
            near.mark(item.revision);
          }
        }
      } catch {
        // e.g. a table this sidecar does not cache: retry; meanwhile reads go to the sidecar
      }
      near.disconnect();
      await this._sleep(1000);
    }
  }

  _sleep(ms) {
    return new Promise((resolve) => {
      const wake = () => {
        clearTimeout(timer);
        this._sleepers.delete(wake);
        resolve();
      };
      const timer = setTimeout(wake, ms);
      this._sleepers.add(wake);
    });
  }

  /** A stream message's items: several 'changes' for a `batches` message (in order), else one. */
  _events(message) {
    if (message.kind === 'batches') return message.batches.batches.map((batch) => this._changes(batch));
    return [this._event(message)];
  }

  _changes(batch) {
    return {
      type: 'changes',
      revision: batch.revision,
      xid: Number(batch.xid),
      changes: batch.events.map((e) => this._change(e)),
    };
  }

  _change(e) {
    const change = {
      table: e.table,
      operation: e.operation.toLowerCase(),
      key: fromKey(e.key),
      oldKey: fromKey(e.oldKey),
      row: null,
      hasRow: e.hasRow,
      ahead: Boolean(e.ahead), // newer than the batch's other rows of the same source rows: drop the key, read it
    };
    if (!e.hasRow) return change;
    try {
      change.row = this.decodeRow(e.row);
    } catch (error) {
      // one row the decoder cannot read must not end the stream (resuming would meet it again)
      change.undecodable = true;
      change.error = String(error && error.message ? error.message : error).slice(0, 500);
    }
    return change;
  }

  _event(message) {
    switch (message.kind) {
      case 'changes':
        return this._changes(message.changes);
      case 'reset':
        return { type: 'reset', revision: message.reset.revision, reason: message.reset.reason };
      case 'progress':
        return { type: 'progress', revision: message.progress.revision };
      default:
        return { type: 'initialStateDone', revision: message.initialStateDone.revision };
    }
  }

  /** Ends the near-cache's stream and every watch; the process can then exit. */
  close() {
    if (this.sharedMemory !== null) this.sharedMemory.close();
    this.closed = true;
    for (const call of this._calls) call.cancel();
    for (const wake of [...this._sleepers]) wake();
    if (this.nearCache !== null) this.nearCache.disconnect();
    this.stub.close();
  }
}

/** Near-cached rows are shared: callers get their own top-level copy. */
function copy(row) {
  if (row === ABSENT || row === null) return null;
  return typeof row === 'object' && !Array.isArray(row) ? { ...row } : row;
}

function watchRequest(tables, { keys, operations, startRevision, initialState = false, progressIntervalMs = 0 } = {}) {
  return {
    tables,
    keys: (keys || []).map(toKey),
    operations: (operations || []).map((op) => op.toUpperCase()),
    startRevision: startRevision || null,
    initialState,
    progressIntervalMs,
    acceptBatches: true, // _events() reads several batches in one message
  };
}

/**
 * A server stream's headers ({ metadata }) and messages ({ message }), in
 * order, as an async iterator that throws the call's error at its end.
 * grpc-js reports the final status as soon as it arrives, possibly before
 * messages still buffered: the error is held until they are delivered. The
 * call is paused while many are queued, so that a slow consumer slows the
 * stream (and the sidecar notices) instead of filling memory.
 */
function streamOf(call, highWater = 32) {
  const queue = [];
  let wake = null;
  let failure = null;
  let ended = false;
  const push = (item) => {
    queue.push(item);
    if (queue.length >= highWater) call.pause();
    if (wake !== null) {
      const resolve = wake;
      wake = null;
      resolve();
    }
  };
  const end = () => {
    if (!ended) push({ end: true });
    ended = true;
  };
  call.on('metadata', (metadata) => push({ metadata }));
  call.on('data', (message) => push({ message }));
  call.on('error', (error) => {
    failure = error;
  });
  call.on('end', end);
  call.on('close', end);
  return (async function* parts() {
    for (;;) {
      while (!queue.length) await new Promise((resolve) => (wake = resolve));
      const item = queue.shift();
      if (queue.length <= highWater / 2 && call.isPaused()) call.resume();
      if (item.end) {
        if (failure !== null) throw failure;
        return;
      }
      yield item;
    }
  })();
}

module.exports = { CacheClient, CacheSidecarError, UndecodableRowError, toKey, fromKey, parseExact };
