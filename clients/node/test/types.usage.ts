// The public API as clients/node/README.md documents it, written against the hand-written
// src/index.d.ts: `npm run lint` type-checks it (tsc --noEmit, strict), so a declaration that
// drifts from the documented use fails ./dev lint. It is never run.
import {
  CacheClient,
  CacheSidecarError,
  fromKey,
  parseExact,
  toKey,
  type Change,
  type Key,
  type ReadOptions,
  type Revision,
  type WatchItem,
} from '../src/index';

async function readme(): Promise<void> {
  const cache = new CacheClient('127.0.0.1:50051');
  const patron: Record<string, unknown> | null = await cache.get('public.patron', 1);
  await cache.get('public.order_line', [7, 2]);
  await cache.get('public.items', 9223372036854775807n);
  await cache.get('public.items', '9223372036854775807');
  const rows: Array<Record<string, unknown> | null> = await cache.batchGet('public.patron', [1, 2, 3]);
  await cache.get('public.patron', 1, { consistency: 'strong' });
  const { rows: found, truncated, revision } = await cache.query('public.patron', 'by_dish', { values: ['curry'] });
  await cache.query('public.patron', 'by_name', { lower: 'B', limit: 10, descending: true });
  const invalidated: Revision = await cache.invalidate('public.patron', [1], { refresh: true });
  await cache.invalidate('public.patron');
  const synced: Revision = await cache.sync();
  const options: ReadOptions = { minRevision: synced, allowStale: true, timeoutMs: 100 };
  await cache.get('public.patron', 1, options);
  for await (const item of cache.watch(['public.patron'], { initialState: true })) {
    if (item.type === 'changes') for (const change of item.changes) console.log(change.operation, change.key);
    else if (item.type === 'reset') console.log(item.reason, item.revision?.number);
    else console.log(item.revision.epoch);
  }
  for (const table of await cache.listTables({ timeoutMs: 1000 })) {
    const keys: string[] = table.keyColumns.map((c) => `${c.name} ${c.type}`);
    console.log(table.name, table.mode, table.rowCount + 1, table.loaded, table.problem, keys, table.indexes[0]?.range);
  }
  console.log(patron, rows, found.length, truncated, revision?.epoch, invalidated.number, cache.lastRevision);
  cache.close();
}

async function options(): Promise<void> {
  const exact = new CacheClient('unix:///run/cache-sidecar/grpc.sock', { decode: 'exact', timeoutMs: 2000 });
  const custom = new CacheClient(undefined, { decodeRow: (bytes: Buffer) => bytes.toString() });
  const near = new CacheClient('127.0.0.1:50051', { nearCache: { 'public.patron': 10000 } });
  const named = new CacheClient('127.0.0.1:50051', { nearCache: ['public.patron'] });
  const stats = near.nearCache?.stats;
  const hits: number | undefined = stats?.hits;
  const connected: boolean | undefined = named.nearCache?.connected;
  console.log(hits, connected, near.nearCache?.size, near.nearCache?.position?.number, near.nearCache?.tables);
  try {
    await exact.get('public.patron', 1);
  } catch (error) {
    if (error instanceof CacheSidecarError && error.code === 'NOT_FOUND') console.log(error.details, error.message);
  }
  for await (const item of custom.watch(undefined, { keys: [1, [2, 'a']], operations: ['insert'], resume: false })) {
    const changes: Change[] = item.type === 'changes' ? item.changes : [];
    console.log(changes.map((c) => [c.table, c.oldKey, c.row, c.hasRow]));
    break;
  }
  for (const client of [exact, custom, near, named]) client.close();
}

function helpers(): void {
  const key: Key = [1, 2n, 'x', true, Buffer.from('b'), new Date()];
  const wire = toKey(key);
  console.log(fromKey(wire), fromKey(null), parseExact('{"big": 9223372036854775807}'), parseExact(Buffer.from('1')));
  const item: WatchItem = { type: 'progress', revision: { epoch: 'e', number: '1' } };
  console.log(item);
}

async function misuse(cache: CacheClient): Promise<void> {
  // @ts-expect-error consistency is 'eventual' or 'strong'
  await cache.get('public.patron', 1, { consistency: 'linearizable' });
  // @ts-expect-error a revision's number is a decimal string (a uint64)
  await cache.get('public.patron', 1, { minRevision: { epoch: 'e', number: 1 } });
  // @ts-expect-error decode is 'json' or 'exact'
  new CacheClient('127.0.0.1:50051', { decode: 'bigint' });
  // @ts-expect-error a key part is no plain object
  await cache.get('public.patron', { id: 1 });
  // @ts-expect-error the table comes first
  await cache.batchGet([1, 2]);
}

export { readme, options, helpers, misuse };
