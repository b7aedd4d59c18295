'use strict';
// The near-cache: rows kept in the application process, coherent through
// Watch. No I/O here: the client feeds it reads and stream items. The same
// rules as the Python client's (clients/python/cache_sidecar_client/near.py):
//
// * opt-in per table, bounded (LRU), filled on read, updated or dropped by the
//   change stream; it only answers while its stream is connected: on a reset,
//   on a stream it cannot resume and on disconnect it empties itself, and
//   reads go to the sidecar until the stream is back;
// * every entry remembers the revision it is valid at; a change is applied to
//   an entry only if its batch is newer, so a row filled from a fresher read is
//   never overwritten by an older batch still in flight;
// * a fill that was in flight when a change to its key (or a flush) arrived is
//   not stored: the value it read may predate that change;
// * misses ask the sidecar with minRevision = the stream's position, so a read
//   never returns a value older than one the near-cache already served.
//
// Entries are found by a canonical form of the key, built from the key
// columns' types (ListTables), because a caller may read key 7 as 7, 7n or
// '7' while events carry 7n: all must find the same entry, or an event would
// miss the entry it should update. Tables with a key column of another type
// than these are not near-cached (reads go to the sidecar).

const DEFAULT_MAX_ROWS = 10000;
const ABSENT = Symbol('absent'); // a near-cached "no such row"

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

function columnKind(type) {
  if (type === 'smallint' || type === 'integer' || type === 'bigint') return 'int';
  if (type === 'text' || type.startsWith('character varying')) return 'text';
  if (type === 'boolean') return 'bool';
  if (type === 'uuid') return 'uuid';
  return null;
}

// The part as the sidecar would send it back in an event, or null if unsure.
function canonicalPart(kind, value) {
  switch (kind) {
    case 'int':
      if (typeof value === 'bigint') return value.toString();
      if (Number.isSafeInteger(value)) return String(value);
      if (typeof value === 'string' && /^-?[1-9]\d{0,18}$|^0$/.test(value)) return value;
      return null;
    case 'text':
      return typeof value === 'string' ? value : null;
    case 'bool':
      return typeof value === 'boolean' ? String(value) : null;
    case 'uuid':
      return typeof value === 'string' && UUID.test(value) ? value.toLowerCase() : null;
    default:
      return null;
  }
}

/** `{ 'public.patron': 10000 }` or `['public.patron']` (default bound) -> Map. */
function nearCacheTables(spec) {
  if (!spec) return new Map();
  const entries = Array.isArray(spec) ? spec.map((name) => [name, DEFAULT_MAX_ROWS]) : Object.entries(spec);
  return new Map(entries.map(([name, limit]) => [qualified(name), Number(limit)]));
}

/** Events name tables with their schema: so must the near-cache. */
function qualified(table) {
  return table.includes('.') ? table : `public.${table}`;
}

function newer(number, than) {
  return BigInt(number) > than;
}

class NearCache {
  /** @param {Map<string, number>} limits rows kept per table */
  constructor(limits) {
    this.limits = new Map(limits);
    this.entries = new Map([...this.limits.keys()].map((name) => [name, new Map()]));
    this.kinds = new Map(); // table -> key column kinds; a table without is not served
    this.connected = false;
    this.position = null; // the last batch (or mark) applied from the stream
    this.generation = 0; // bumped whenever entries are flushed
    this.inflight = new Map(); // slot -> fills in flight
    this.dirty = new Set(); // slots changed while a fill was in flight
    this.stats = { hits: 0, misses: 0, fills: 0, staleFillsDropped: 0, evictions: 0, flushes: 0, batches: 0 };
  }

  get tables() {
    return [...this.limits.keys()];
  }

  get size() {
    let total = 0;
    for (const entries of this.entries.values()) total += entries.size;
    return total;
  }

  /** The key columns' types, from ListTables: [{ name, keyColumns: [{ name, type }] }]. */
  learnKeys(tables) {
    this.kinds.clear();
    for (const table of tables) {
      if (!this.limits.has(table.name)) continue;
      const kinds = table.keyColumns.map((column) => columnKind(column.type));
      if (kinds.length && kinds.every((kind) => kind !== null)) this.kinds.set(table.name, kinds);
    }
  }

  /** The canonical key of `key` in `table`, or null when the near-cache cannot answer it. */
  slot(table, key) {
    return this.connected ? this._canonical(table, key) : null;
  }

  _canonical(table, key) {
    const kinds = this.kinds.get(table);
    if (!kinds) return null;
    const parts = Array.isArray(key) ? key : [key];
    if (parts.length !== kinds.length) return null;
    const canonical = parts.map((part, i) => canonicalPart(kinds[i], part));
    if (canonical.some((part) => part === null)) return null;
    return canonical.length === 1 ? canonical[0] : JSON.stringify(canonical);
  }

  // ------------------------------------------------------------ reads

  /** `{ row }` (row may be ABSENT) on a hit, null on a miss. */
  lookup(table, slot) {
    const entries = this.entries.get(table);
    const entry = entries.get(slot);
    if (entry === undefined) {
      this.stats.misses++;
      return null;
    }
    entries.delete(slot); // (re-inserted last: Map order is the LRU order)
    entries.set(slot, entry);
    this.stats.hits++;
    return entry;
  }

  beginFill(table, slot) {
    const id = `${table}\0${slot}`;
    this.inflight.set(id, (this.inflight.get(id) || 0) + 1);
    return { generation: this.generation };
  }

  /** Store what a read brought back (ABSENT: no row), unless a change or flush overtook it. */
  endFill(table, slot, ticket, row, revision) {
    const id = `${table}\0${slot}`;
    const left = this.inflight.get(id) - 1;
    const overtaken = this.dirty.has(id);
    if (left <= 0) {
      this.inflight.delete(id);
      this.dirty.delete(id);
    } else {
      this.inflight.set(id, left);
    }
    const { position } = this;
    const flushed = ticket.generation !== this.generation;
    if (overtaken || flushed || !this.connected || row === null || !revision || (position && revision.epoch !== position.epoch)) {
      if (overtaken || flushed) this.stats.staleFillsDropped++;
      return;
    }
    const entries = this.entries.get(table);
    entries.delete(slot);
    entries.set(slot, { row, number: BigInt(revision.number) });
    this.stats.fills++;
    const limit = this.limits.get(table);
    while (entries.size > limit) {
      entries.delete(entries.keys().next().value);
      this.stats.evictions++;
    }
  }

  // ------------------------------------------------------------ the stream

  connect() {
    this.connected = true;
  }

  /** No changes arrive any more: what is held may go stale. */
  disconnect() {
    this.connected = false;
    this._flush();
  }

  reset(revision) {
    this._flush();
    this.position = revision;
  }

  mark(revision) {
    this.position = revision;
  }

  /** A batch from the stream: { revision, changes: [{ table, key, oldKey, row, hasRow }] }. */
  apply(batch) {
    for (const change of batch.changes) {
      const entries = this.entries.get(change.table);
      if (entries === undefined) continue;
      if (change.key === null) {
        this._flushTable(entries); // truncate / whole-table change
        continue;
      }
      if (!this.kinds.has(change.table)) continue; // never filled
      const newKey = this._canonical(change.table, change.key);
      const oldKey = change.oldKey === null ? null : this._canonical(change.table, change.oldKey);
      if (newKey === null || (change.oldKey !== null && oldKey === null)) {
        this._flushTable(entries); // a key we cannot place: drop the table rather than miss its entry
        continue;
      }
      for (const slot of oldKey === null ? [newKey] : [newKey, oldKey]) {
        const id = `${change.table}\0${slot}`;
        if (this.inflight.has(id)) this.dirty.add(id);
        const entry = entries.get(slot);
        if (entry === undefined || !newer(batch.revision.number, entry.number)) continue; // not held, or from a newer read
        if (change.hasRow && slot === newKey && !change.undecodable && !change.ahead) entries.set(slot, { row: change.row, number: BigInt(batch.revision.number) });
        else entries.delete(slot);
      }
    }
    this.position = batch.revision;
    this.stats.batches++;
  }

  _flushTable(entries) {
    entries.clear();
    this.generation++;
    this.stats.flushes++;
  }

  _flush() {
    for (const entries of this.entries.values()) entries.clear();
    this.generation++;
    this.stats.flushes++;
  }
}

module.exports = { NearCache, nearCacheTables, qualified, ABSENT, DEFAULT_MAX_ROWS };
