// Type declarations for cache-sidecar-client (see index.js).

export interface Revision {
  epoch: string;
  /** uint64 as a decimal string */
  number: string;
}

export interface ReadOptions {
  consistency?: 'eventual' | 'strong';
  minRevision?: Revision;
  allowStale?: boolean;
  timeoutMs?: number;
}

/**
 * A key part as sent: an integer Number must be a safe integer (beyond 2^53,
 * give a BigInt or a string: a RangeError otherwise); strings are coerced by
 * the sidecar to the column's type.
 */
export type KeyPart = number | bigint | string | boolean | Buffer | Uint8Array | Date;
export type Key = KeyPart | KeyPart[];
/** A key part as received in events: integers (any width) as BigInt. */
export type ReceivedKeyPart = bigint | string | boolean | number | Buffer;

export interface Change {
  table: string;
  operation: 'insert' | 'update' | 'delete' | 'truncate' | 'table_changed' | 'invalidate' | 'snapshot';
  key: ReceivedKeyPart | ReceivedKeyPart[] | null;
  oldKey: ReceivedKeyPart | ReceivedKeyPart[] | null;
  row: Record<string, unknown> | null;
  hasRow: boolean;
  /** The row may be newer than the batch's other rows of the same source rows (a relation's row
   * read ahead of the sidecar's change stream): drop what you hold of the key and read it. */
  ahead: boolean;
  /** The decoder could not read the row (`row` is null): the stream goes on; `error` says why. */
  undecodable?: true;
  error?: string;
}

export type WatchItem =
  | { type: 'changes'; revision: Revision; xid: number; changes: Change[] }
  /** discard what you derived from the stream; revision null when the client resynced ('resync: ...') */
  | { type: 'reset'; revision: Revision | null; reason: string }
  | { type: 'progress'; revision: Revision }
  | { type: 'initialStateDone'; revision: Revision };

export interface WatchOptions {
  keys?: Key[];
  operations?: string[];
  startRevision?: Revision;
  initialState?: boolean;
  progressIntervalMs?: number;
  /** default true: reconnect and resume after UNAVAILABLE and the like; false: throw */
  resume?: boolean;
}

export interface QueryOptions extends ReadOptions {
  /** Equality: index values (arrays for a several-column index). */
  values?: Key[];
  /** Range (range indexes): bounds, included unless *Exclusive; unset = unbounded. */
  lower?: KeyPart;
  upper?: KeyPart;
  lowerExclusive?: boolean;
  upperExclusive?: boolean;
  /** 0 = the server's maximum */
  limit?: number;
  descending?: boolean;
}

export interface QueryResult {
  rows: Array<Record<string, unknown>>;
  /** more rows matched than the limit */
  truncated: boolean;
  revision: Revision | null;
}

export interface IndexInfo {
  name: string;
  columns: string[];
  unique: boolean;
  range: boolean;
}

export class CacheSidecarError extends Error {
  /** gRPC status name, e.g. 'NOT_FOUND', 'INVALID_ARGUMENT', 'UNAVAILABLE' */
  code: string;
  details: string;
}

/** A row the decoder could not read; only that read fails (get, batchGet, query). */
export class UndecodableRowError extends Error {
  table: string;
  key: unknown;
  cause: unknown;
}

export interface NearCacheStats {
  hits: number;
  misses: number;
  fills: number;
  staleFillsDropped: number;
  evictions: number;
  flushes: number;
  batches: number;
}

/** Rows kept in the process, coherent through Watch (see README). */
export interface NearCache {
  readonly tables: string[];
  /** its stream is up: only then does it answer */
  readonly connected: boolean;
  /** the revision its stream has applied */
  readonly position: Revision | null;
  /** rows held, over all tables */
  readonly size: number;
  readonly stats: NearCacheStats;
}

export interface ClientOptions {
  /** deadline of every call, default 5000 */
  timeoutMs?: number;
  credentials?: unknown;
  /** 'json' (default): JSON.parse; 'exact': parseExact */
  decode?: 'json' | 'exact';
  /** your own row parser (wins over `decode`) */
  decodeRow?: (bytes: Buffer) => unknown;
  /** tables to keep near: { 'public.patron': maxRows } or names (10000 rows each) */
  nearCache?: Record<string, number> | string[];
  /** the sidecar's shared-memory store directory (--shared-memory DIR): get/batchGet of its
   * tables read it directly while it is fresh (needs koffi and liblmdb.so.0; docs/shared-memory.md) */
  sharedMemory?: string;
}

export class SharedMemory {
  constructor(directory: string, options?: { boundMs?: number });
  /** reads answered from the store, and reads it could not answer (they went over gRPC) */
  reads: number;
  refused: number;
  /** why a read of `table` would go over gRPC now (null: the store answers it) */
  refusalOf(table: string, allowStale?: boolean): string | null;
  close(): void;
}

export class CacheClient {
  constructor(target?: string, options?: ClientOptions);
  lastRevision: Revision | null;
  readonly nearCache: NearCache | null;
  readonly sharedMemory: SharedMemory | null;
  get(table: string, key: Key, options?: ReadOptions): Promise<Record<string, unknown> | null>;
  batchGet(table: string, keys: Key[], options?: ReadOptions): Promise<Array<Record<string, unknown> | null>>;
  invalidate(table: string, keys?: Key[] | null, options?: { refresh?: boolean; timeoutMs?: number }): Promise<Revision>;
  sync(options?: { timeoutMs?: number }): Promise<Revision>;
  query(table: string, index: string, options?: QueryOptions): Promise<QueryResult>;
  listTables(
    options?: { timeoutMs?: number },
  ): Promise<Array<{
    name: string;
    keyColumns: Array<{ name: string; type: string }>;
    mode: string;
    rowCount: number;
    loaded: boolean;
    indexes: IndexInfo[];
    problem: string;
  }>>;
  watch(tables?: string[], options?: WatchOptions): AsyncGenerator<WatchItem>;
  /** ends the near-cache's stream and every watch */
  close(): void;
}

export function toKey(key: Key): { parts: object[] };
export function fromKey(key: { parts: object[] } | null): ReceivedKeyPart | ReceivedKeyPart[] | null;
/**
 * A row parsed exactly: integers within ±Number.MAX_SAFE_INTEGER as numbers,
 * beyond as BigInt; numbers with a fraction or an exponent as their source
 * text (strings); everything else as JSON.parse. Any nesting depth.
 */
export function parseExact(bytes: Buffer | Uint8Array | string): any;
