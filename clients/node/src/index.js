'use strict';
// Node.js client for cache-sidecar: a small wrapper over @grpc/grpc-js that
// loads the API from proto/ at run time.
//
//   const { CacheClient } = require('cache-sidecar-client');
//   const cache = new CacheClient('127.0.0.1:50051');
//   const patron = await cache.get('public.patron', 1);   // object or null
//   for await (const item of cache.watch(['public.patron'])) { ... }
//
// Rows are JSON objects. Integers beyond 2^53 lose precision in JSON.parse:
// pass { decodeRow } to parse them your way. Revisions are { epoch, number }
// with `number` a decimal string (it is a uint64).

const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

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

function keyPart(value) {
  if (typeof value === 'boolean') return { boolValue: value };
  if (typeof value === 'bigint') return { stringValue: value.toString() };
  if (typeof value === 'number') return Number.isInteger(value) ? { intValue: value } : { doubleValue: value };
  if (typeof value === 'string') return { stringValue: value };
  if (Buffer.isBuffer(value) || value instanceof Uint8Array) return { bytesValue: Buffer.from(value) };
  if (value instanceof Date) return { stringValue: value.toISOString() };
  throw new TypeError(`cannot send ${typeof value} as a key part`);
}

/** A scalar for a one-column key, an array for a composite key. */
function toKey(key) {
  return { parts: (Array.isArray(key) ? key : [key]).map(keyPart) };
}

function fromKey(key) {
  if (!key) return null;
  const values = key.parts.map((part) => {
    const value = part[part.kind];
    return part.kind === 'intValue' ? Number(value) : value;
  });
  return values.length === 1 ? values[0] : values;
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
   * @param {{timeoutMs?: number, credentials?: object, decodeRow?: (bytes: Buffer) => any}} options
   */
  constructor(target = '127.0.0.1:50051', { timeoutMs = 5000, credentials, decodeRow } = {}) {
    this.target = target;
    this.timeoutMs = timeoutMs;
    this.decodeRow = decodeRow || ((bytes) => JSON.parse(bytes.toString('utf8')));
    this.stub = new api.Cache(target, credentials || grpc.credentials.createInsecure());
    this.lastRevision = null;
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

  _row(result) {
    return result.found ? this.decodeRow(result.row) : null;
  }

  /** One row by primary key, or null. options: { consistency: 'strong', minRevision, allowStale, timeoutMs } */
  async get(table, key, options = {}) {
    const reply = await this._unary('Get', { table, key: toKey(key), options: readOptions(options) }, options.timeoutMs);
    return this._row(reply);
  }

  /** Rows in the order of `keys` (null where there is none). */
  async batchGet(table, keys, options = {}) {
    const request = { table, options: readOptions(options) };
    if (keys.length && keys.every((k) => Number.isInteger(k))) request.intKeys = keys;
    else if (keys.length && keys.every((k) => typeof k === 'string')) request.stringKeys = keys;
    else request.keys = keys.map(toKey);
    const reply = await this._unary('BatchGet', request, options.timeoutMs);
    return reply.rows.map((row) => this._row(row));
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
    return { rows: reply.rows.map((row) => this._row(row)), truncated: reply.truncated, revision: reply.revision };
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
   *   { type: 'changes', revision, xid, changes: [{ table, operation, key, oldKey, row, hasRow }] }
   *   { type: 'reset', revision, reason }   discard what you derived from the stream
   *   { type: 'progress', revision }
   *   { type: 'initialStateDone', revision }
   * Stop with `break` (the call is cancelled). To resume after an error, watch
   * again with { startRevision: lastRevisionYouProcessed }.
   */
  async *watch(tables = [], { keys, operations, startRevision, initialState = false, progressIntervalMs = 0 } = {}) {
    const call = this.stub.Watch({
      tables,
      keys: (keys || []).map(toKey),
      operations: (operations || []).map((op) => op.toUpperCase()),
      startRevision: startRevision || null,
      initialState,
      progressIntervalMs,
    });
    try {
      for await (const message of call) {
        yield this._event(message);
      }
    } catch (error) {
      if (error.code === grpc.status.CANCELLED) return;
      throw new CacheSidecarError(error);
    } finally {
      call.cancel();
    }
  }

  _event(message) {
    switch (message.kind) {
      case 'changes':
        return {
          type: 'changes',
          revision: message.changes.revision,
          xid: Number(message.changes.xid),
          changes: message.changes.events.map((e) => ({
            table: e.table,
            operation: e.operation.toLowerCase(),
            key: fromKey(e.key),
            oldKey: fromKey(e.oldKey),
            row: e.hasRow ? this.decodeRow(e.row) : null,
            hasRow: e.hasRow,
          })),
        };
      case 'reset':
        return { type: 'reset', revision: message.reset.revision, reason: message.reset.reason };
      case 'progress':
        return { type: 'progress', revision: message.progress.revision };
      default:
        return { type: 'initialStateDone', revision: message.initialStateDone.revision };
    }
  }

  close() {
    this.stub.close();
  }
}

module.exports = { CacheClient, CacheSidecarError, toKey };
