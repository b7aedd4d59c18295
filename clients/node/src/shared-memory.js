'use strict';
// Reading the sidecar's shared-memory store directly (docs/shared-memory.md).
//
// new CacheClient(target, { sharedMemory: DIR }) answers get and batchGet of
// the store's tables from the LMDB environment the sidecar writes in DIR while
// the store says it is fresh; anything else goes over gRPC. It calls the stock
// LMDB C library (liblmdb.so.0: apt-get install liblmdb0) through koffi (an
// optional dependency), loaded only when a directory is given. The npm package
// 'lmdb' cannot be used: its modified LMDB does not share a stock environment
// (docs/shared-memory.md).
//
// The decisions (parseState, refusal, reached, encodeKey) are plain functions
// of the bytes read, tested without a store; SharedMemory adds the I/O.

const path = require('node:path');

const LAYOUT = 1;
const SOURCE_UP = 1;
const SERVED = 1;
const MAX_KEY = 511; // bytes: longer keys are not in the store (LMDB's limit): ask gRPC for them
const FRESH_BOUND_MS = 1000; // an older heartbeat means the sidecar died or hangs
const POLL_MS = 1; // between looks at the store's revision while a read waits for one
const REOPEN_AFTER_MS = 1000;
const READER_MAP_SIZE = 2 ** 40; // bytes of address space a reader maps (the store's files grow within it)
const WAIT = Symbol('wait'); // the store is fresh but behind the revision asked for
const RANGES = {
  h: [-(2n ** 15n), 2n ** 15n - 1n],
  i: [-(2n ** 31n), 2n ** 31n - 1n],
  l: [-(2n ** 63n), 2n ** 63n - 1n],
  o: [0n, 2n ** 32n - 1n],
};

// RANGES as Numbers, for the safe integers a key usually is (a BigInt key takes encodeKey's path)
const SAFE_RANGES = Object.fromEntries(Object.entries(RANGES).map(([kind, [low, high]]) => [kind, [Number(low), Number(high)]]));

function parseState(data) {
  if (!data || data.length < 24 || data.readUInt32LE(0) !== LAYOUT) return null;
  return {
    sourceUp: (data.readUInt32LE(4) & SOURCE_UP) !== 0,
    heartbeatUs: data.readBigInt64LE(8),
    revision: data.readBigUInt64LE(16),
    epoch: data.subarray(24).toString('utf8'),
  };
}

function parseTable(data) {
  if (!data || data.length < 16 || data.readUInt32LE(0) !== LAYOUT) return null;
  return {
    served: (data.readUInt32LE(4) & SERVED) !== 0,
    rows: data.readBigUInt64LE(8),
    kinds: data.subarray(16).toString('ascii'),
  };
}

/** Why the store may not answer a read of this table now (null: it may). */
function refusal(state, table, nowUs, allowStale, boundMs = FRESH_BOUND_MS) {
  if (state === null) return 'no store (or another layout)';
  if (table === null) return 'the table is not in the store';
  if (!table.served) return 'the table is not served from the store now';
  if (allowStale) return null;
  if (!state.sourceUp) return "the sidecar's change source is down";
  if (nowUs - state.heartbeatUs > BigInt(boundMs) * 1000n) return 'the heartbeat is old (the sidecar died or hangs)';
  return null;
}

/** true: the store holds (epoch, number); false: not yet; null: another epoch (ask the sidecar). */
function reached(state, epoch, number) {
  if (state.epoch !== epoch) return null;
  return state.revision >= BigInt(number);
}

function lengthPrefixed(tag, bytes) {
  const out = Buffer.allocUnsafe(5 + bytes.length);
  out[0] = tag;
  out.writeUInt32BE(bytes.length, 1);
  bytes.copy(out, 5);
  return out;
}

/** One key part as the store's keys hold it; null when the store cannot look it up as given. */
function encodePart(kind, value) {
  if (kind in RANGES) {
    let big;
    if (typeof value === 'bigint') big = value;
    else if (typeof value === 'number' && Number.isSafeInteger(value)) big = BigInt(value);
    else return null;
    const [low, high] = RANGES[kind];
    if (big < low || big > high) return null;
    const out = Buffer.allocUnsafe(9);
    out[0] = 0x01;
    out.writeBigInt64BE(big, 1);
    return out;
  }
  if (kind === 's' || kind === 'p') {
    if (typeof value !== 'string' || value.includes('\0') || !value.isWellFormed()) return null;
    return lengthPrefixed(0x02, Buffer.from(kind === 'p' ? value.replace(/ +$/, '') : value, 'utf8'));
  }
  if (kind === 'u') {
    if (typeof value !== 'string') return null;
    // (the canonical form, hyphens optional; any other spelling goes to the sidecar)
    if (!/^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$/.test(value)) return null;
    return Buffer.concat([Buffer.from([0x03]), Buffer.from(value.replace(/-/g, ''), 'hex')]);
  }
  if (kind === 'b') return typeof value === 'boolean' ? Buffer.from([0x04, value ? 1 : 0]) : null;
  if (kind === 'x') return Buffer.isBuffer(value) ? lengthPrefixed(0x05, value) : null;
  return null;
}

/** A key (a scalar, or an array for a composite key) as the store's key bytes, or null. */
function encodeKey(kinds, key) {
  const parts = Array.isArray(key) ? key : [key];
  if (parts.length !== kinds.length) return null;
  const encoded = [];
  for (let i = 0; i < parts.length; i++) {
    const part = encodePart(kinds[i], parts[i]);
    if (part === null) return null;
    encoded.push(part);
  }
  return encoded.length === 1 ? encoded[0] : Buffer.concat(encoded);
}

// ---------------------------------------------------------------- LMDB through its C library

const MDB_RDONLY = 0x20000;
const MDB_NOTLS = 0x200000;
const MDB_NOTFOUND = -30798;
let lmdb = null; // the bound functions, made on first use

function bind() {
  if (lmdb !== null) return lmdb;
  const koffi = require('koffi'); // (the optional dependency: only when a directory is given)
  const lib = koffi.load(process.env.CACHE_SIDECAR_LIBLMDB || 'liblmdb.so.0');
  const libc = koffi.load('libc.so.6');
  lmdb = {
    koffi,
    envCreate: lib.func('int mdb_env_create(_Out_ void **env)'),
    setMaxDbs: lib.func('int mdb_env_set_maxdbs(void *env, unsigned int dbs)'),
    setMapSize: lib.func('int mdb_env_set_mapsize(void *env, size_t size)'),
    envOpen: lib.func('int mdb_env_open(void *env, const char *path, unsigned int flags, int mode)'),
    envClose: lib.func('void mdb_env_close(void *env)'),
    txnBegin: lib.func('int mdb_txn_begin(void *env, void *parent, unsigned int flags, _Out_ void **txn)'),
    txnCommit: lib.func('int mdb_txn_commit(void *txn)'),
    txnAbort: lib.func('void mdb_txn_abort(void *txn)'),
    txnReset: lib.func('void mdb_txn_reset(void *txn)'),
    txnRenew: lib.func('int mdb_txn_renew(void *txn)'),
    dbiOpen: lib.func('int mdb_dbi_open(void *txn, const char *name, unsigned int flags, _Out_ unsigned int *dbi)'),
    // Both MDB_vals as raw memory (size_t mv_size, void *mv_data: 16 bytes each on 64-bit):
    // koffi marshals no object per call, and the row is copied out with one memcpy. This is
    // most of a read's cost otherwise (7 µs a Get with struct objects and a view per value, 2 now).
    get: lib.func('int mdb_get(void *txn, unsigned int dbi, void *key, void *data)'),
    memcpy: libc.func('void *memcpy(void *dest, void *src, size_t n)'),
    strerror: lib.func('const char *mdb_strerror(int err)'),
  };
  if (koffi.sizeof('void *') !== 8 || koffi.sizeof('size_t') !== 8) throw new Error('the shared-memory reader needs a 64-bit platform');
  return lmdb;
}

// The key of a look-up is written into memory of our own whose address the key's MDB_val
// holds; LMDB writes the value's MDB_val. (One reader at a time: JavaScript runs one thread.)
let keyMemory = null; // { address, bytes: a Buffer over it }
const keyVal = Buffer.alloc(16);
const dataVal = Buffer.alloc(16);

function keyRoom(size) {
  if (keyMemory === null || keyMemory.bytes.length < size) {
    const length = Math.max(512, size * 2);
    const address = lmdb.koffi.alloc('uint8_t', length);
    if (keyMemory !== null) lmdb.koffi.free(keyMemory.address);
    keyMemory = { address, bytes: Buffer.from(lmdb.koffi.view(address, length)) };
    keyVal.writeBigUInt64LE(lmdb.koffi.address(address), 8);
  }
  return keyMemory.bytes;
}

/** The value of `size` key bytes (written by the caller into keyRoom) in `dbi`: a Buffer of its
 * own (LMDB's bytes live only as long as the transaction), or null. */
function lookUp(txn, dbi, size) {
  keyVal.writeUInt32LE(size, 0);
  keyVal.writeUInt32LE(0, 4);
  const rc = lmdb.get(txn, dbi, keyVal, dataVal);
  if (rc === MDB_NOTFOUND) return null;
  check(rc, 'mdb_get');
  const length = dataVal.readUInt32LE(0) + dataVal.readUInt32LE(4) * 2 ** 32;
  const out = Buffer.allocUnsafe(length);
  if (length > 0) lmdb.memcpy(out, dataVal.readBigUInt64LE(8), length);
  return out;
}

/** As lookUp, for a key given as a Buffer. */
function lookUpKey(txn, dbi, key) {
  key.copy(keyRoom(key.length), 0);
  return lookUp(txn, dbi, key.length);
}

/** As lookUp, for an integer key part (tag 0x01, 8 bytes big-endian) of a safe integer. */
function lookUpInt(txn, dbi, value) {
  const room = keyRoom(9);
  room[0] = 0x01;
  const high = Math.floor(value / 2 ** 32);
  room.writeInt32BE(high, 1);
  room.writeUInt32BE(value - high * 2 ** 32, 5);
  return lookUp(txn, dbi, 9);
}

function check(rc, what) {
  if (rc !== 0) throw new Error(`${what}: ${lmdb.strerror(rc)}`);
}

// LMDB allows one open environment per file per process: every SharedMemory of
// one directory shares one, closed with the last of them.
const OPEN = new Map(); // real path -> { env, meta, txn, dbis, users }

function acquire(directory) {
  const real = path.resolve(directory);
  let held = OPEN.get(real);
  if (!held) {
    const l = bind();
    const out = [null];
    check(l.envCreate(out), 'mdb_env_create');
    const env = out[0];
    try {
      check(l.setMaxDbs(env, 1024), 'mdb_env_set_maxdbs');
      // Address space only, and at least the sidecar's map size (shared_memory.map_size):
      // with LMDB's default, reads fail with MDB_MAP_RESIZED once the store grows past it.
      check(l.setMapSize(env, READER_MAP_SIZE), 'mdb_env_set_mapsize');
      check(l.envOpen(env, real, MDB_RDONLY | MDB_NOTLS, 0o660), `open ${real}`);
      const txn = [null];
      check(l.txnBegin(env, null, MDB_RDONLY, txn), 'mdb_txn_begin');
      const dbi = [0];
      const rc = l.dbiOpen(txn[0], 'meta', 0, dbi);
      if (rc !== 0) l.txnAbort(txn[0]);
      check(rc, 'open meta');
      check(l.txnCommit(txn[0]), 'mdb_txn_commit'); // (committed: the handle outlives it)
      const read = [null];
      check(l.txnBegin(env, null, MDB_RDONLY, read), 'mdb_txn_begin');
      l.txnReset(read[0]);
      held = { env, meta: dbi[0], txn: read[0], dbis: new Map(), users: 0 };
    } catch (error) {
      l.envClose(env);
      throw error;
    }
    OPEN.set(real, held);
  }
  held.users += 1;
  return held;
}

function release(directory) {
  const real = path.resolve(directory);
  const held = OPEN.get(real);
  if (!held) return;
  held.users -= 1;
  if (held.users === 0) {
    OPEN.delete(real);
    lmdb.txnAbort(held.txn);
    lmdb.envClose(held.env);
  }
}

class SharedMemory {
  constructor(directory, { boundMs = FRESH_BOUND_MS } = {}) {
    bind(); // (fails now, with the reason, if koffi or liblmdb is missing)
    this.directory = directory;
    this.boundMs = boundMs;
    this._held = null;
    this._nextOpen = 0;
    this.reads = 0; // reads answered from the store
    this.refused = 0; // reads the store could not answer (they went over gRPC)
    this._recordKeys = new Map(); // table -> its record's key
    this.errors = 0; // reads that failed in LMDB (they went over gRPC); the last one: lastError
    this.lastError = null;
  }

  _open() {
    if (this._held !== null) return this._held;
    if (Date.now() < this._nextOpen) return null;
    this._nextOpen = Date.now() + REOPEN_AFTER_MS;
    try {
      this._held = acquire(this.directory);
    } catch {
      return null; // (not there yet)
    }
    return this._held;
  }

  _dbi(held, table) {
    let dbi = held.dbis.get(table);
    if (dbi === undefined) {
      const txn = [null];
      check(lmdb.txnBegin(held.env, null, MDB_RDONLY, txn), 'mdb_txn_begin');
      const out = [0];
      const rc = lmdb.dbiOpen(txn[0], `rows:${table}`, 0, out);
      if (rc !== 0) {
        lmdb.txnAbort(txn[0]);
        return null;
      }
      check(lmdb.txnCommit(txn[0]), 'mdb_txn_commit');
      dbi = out[0];
      held.dbis.set(table, dbi);
    }
    return dbi;
  }

  _records(held, table) {
    const txn = held.txn;
    let recordKey = this._recordKeys.get(table);
    if (recordKey === undefined) {
      recordKey = Buffer.from(`table:${table}`);
      this._recordKeys.set(table, recordKey);
    }
    return [parseState(lookUpKey(txn, held.meta, STATE_KEY)), parseTable(lookUpKey(txn, held.meta, recordKey))];
  }

  /** { rows, epoch, revision }; WAIT (fresh, but not yet at `target`); or null: ask over gRPC
   * (an LMDB error too: counted in `errors`, the read goes over gRPC). */
  read(table, keys, target, allowStale) {
    try {
      return this._read(table, keys, target, allowStale);
    } catch (error) {
      this.errors += 1;
      this.lastError = error;
      return null;
    }
  }

  _read(table, keys, target, allowStale) {
    const held = this._open();
    if (held === null) return null;
    const dbi = this._dbi(held, table);
    if (dbi === null) {
      this.refused += 1;
      return null;
    }
    const txn = held.txn;
    check(lmdb.txnRenew(txn), 'mdb_txn_renew');
    try {
      const [state, info] = this._records(held, table);
      if (refusal(state, info, BigInt(Date.now()) * 1000n, allowStale, this.boundMs) !== null) {
        this.refused += 1;
        return null;
      }
      if (target) {
        const at = reached(state, target.epoch, target.number);
        if (at === null) {
          this.refused += 1;
          return null;
        }
        if (!at) return WAIT;
      }
      const rows = [];
      const kinds = info.kinds;
      const integer = kinds.length === 1 && kinds in RANGES;
      for (const key of keys) {
        if (integer && Number.isSafeInteger(key) && key >= SAFE_RANGES[kinds][0] && key <= SAFE_RANGES[kinds][1]) {
          rows.push(lookUpInt(txn, dbi, key));
          continue;
        }
        const encoded = encodeKey(kinds, key);
        if (encoded === null || encoded.length > MAX_KEY) {
          this.refused += 1;
          return null;
        }
        rows.push(lookUpKey(txn, dbi, encoded));
      }
      this.reads += 1;
      return { rows, epoch: state.epoch, revision: state.revision.toString() };
    } finally {
      lmdb.txnReset(txn);
    }
  }

  /** Why a read of `table` would go over gRPC now (null: the store answers it). */
  refusalOf(table, allowStale = false) {
    const held = this._open();
    if (held === null) return `no store in ${this.directory}`;
    check(lmdb.txnRenew(held.txn), 'mdb_txn_renew');
    try {
      const [state, info] = this._records(held, table);
      return refusal(state, info, BigInt(Date.now()) * 1000n, allowStale, this.boundMs);
    } finally {
      lmdb.txnReset(held.txn);
    }
  }

  close() {
    if (this._held !== null) {
      this._held = null;
      release(this.directory);
    }
  }
}

const STATE_KEY = Buffer.from('state');

module.exports = { SharedMemory, WAIT, POLL_MS, FRESH_BOUND_MS, parseState, parseTable, refusal, reached, encodeKey };
