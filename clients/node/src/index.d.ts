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

export type KeyPart = number | bigint | string | boolean | Buffer | Uint8Array | Date;
export type Key = KeyPart | KeyPart[];

export interface Change {
  table: string;
  operation: 'insert' | 'update' | 'delete' | 'truncate' | 'table_changed' | 'invalidate' | 'snapshot';
  key: KeyPart | KeyPart[] | null;
  oldKey: KeyPart | KeyPart[] | null;
  row: Record<string, unknown> | null;
  hasRow: boolean;
}

export type WatchItem =
  | { type: 'changes'; revision: Revision; xid: number; changes: Change[] }
  | { type: 'reset'; revision: Revision; reason: string }
  | { type: 'progress'; revision: Revision }
  | { type: 'initialStateDone'; revision: Revision };

export interface WatchOptions {
  keys?: Key[];
  operations?: string[];
  startRevision?: Revision;
  initialState?: boolean;
  progressIntervalMs?: number;
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

export class CacheClient {
  constructor(
    target?: string,
    options?: { timeoutMs?: number; credentials?: unknown; decodeRow?: (bytes: Buffer) => unknown },
  );
  lastRevision: Revision | null;
  get(table: string, key: Key, options?: ReadOptions): Promise<Record<string, unknown> | null>;
  batchGet(table: string, keys: Key[], options?: ReadOptions): Promise<Array<Record<string, unknown> | null>>;
  invalidate(table: string, keys?: Key[] | null, options?: { refresh?: boolean; timeoutMs?: number }): Promise<Revision>;
  sync(options?: { timeoutMs?: number }): Promise<Revision>;
  query(table: string, index: string, options?: QueryOptions): Promise<QueryResult>;
  listTables(
    options?: { timeoutMs?: number },
  ): Promise<Array<{ name: string; mode: string; rowCount: number; loaded: boolean; indexes: IndexInfo[]; problem: string }>>;
  watch(tables?: string[], options?: WatchOptions): AsyncGenerator<WatchItem>;
  close(): void;
}

export function toKey(key: Key): { parts: object[] };
