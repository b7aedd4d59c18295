"""The near-cache: rows kept in the application process, coherent through Watch.

Opt-in per table, bounded (LRU), filled on read and updated or dropped by the
change stream. It only answers while its stream is connected: on a reset, on
a stream it cannot resume, and on disconnect it empties itself and reads go
to the sidecar until the stream is back.

Ordering rules (the sidecar's, applied here):

* every entry remembers the revision it is valid at; a change is applied to
  an entry only if its batch is newer, so a row filled from a fresher read is
  never overwritten by an older batch still in flight;
* a fill that was in flight when a change to its key (or a flush) arrived is
  not stored: the value it read may predate that change;
* a row marked ``ahead`` (newer than the batch's other rows) drops the key: the
  sidecar answers it once the rows it is newer than are brought up to it;
* misses ask the sidecar with ``min_revision`` = the stream's position, so a
  read never returns a value older than one the near-cache already served;
* a key is held only in the form the change stream names it (an int for an
  integer column, a str for a text one...): the sidecar coerces ``"2"`` to the
  row 2, but an entry held under ``"2"`` would never be updated by the events for
  2. Keys in another form, and key columns whose form the client cannot tell
  (uuid, numeric, timestamps), are read from the sidecar every time.

Thread-safe (the blocking client applies changes from a background thread).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cache_sidecar_client._convert import Revision
from cache_sidecar_client.watch import ChangeBatch

DEFAULT_MAX_ROWS = 10_000

# The Python type a key part has in the change stream, by the column's SQL type
# (as ListTables names it); "bpchar": a str without trailing blanks (the sidecar
# strips them from char(n) keys).
_STREAM_FORMS: dict[str, Any] = {
    "smallint": int,
    "integer": int,
    "bigint": int,
    "oid": int,
    "text": str,
    "name": str,
    "boolean": bool,
    "bytea": bytes,
}


def stream_form(sql_type: str) -> Any:
    """The Python type of this column's key parts in change events (None: not known here)."""
    if sql_type in _STREAM_FORMS:
        return _STREAM_FORMS[sql_type]
    if sql_type.startswith("character varying"):
        return str
    if sql_type.startswith("character"):
        return "bpchar"
    return None


def _in_form(part: Any, form: Any) -> bool:
    if form == "bpchar":
        return type(part) is str and not part.endswith(" ")
    return form is not None and type(part) is form


@dataclass
class NearCacheStats:
    hits: int = 0
    misses: int = 0
    fills: int = 0
    stale_fills_dropped: int = 0
    evictions: int = 0
    flushes: int = 0
    batches: int = 0


@dataclass(frozen=True, slots=True)
class FillTicket:
    generation: int


def near_cache_tables(spec: Mapping[str, int] | Iterable[str] | None) -> dict[str, int]:
    """``{"public.patron": 10000}`` or ``["public.patron"]`` (default bound)."""
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        return {name: int(limit) for name, limit in spec.items()}
    return dict.fromkeys(spec, DEFAULT_MAX_ROWS)


class NearCache:
    def __init__(self, tables: Mapping[str, int]) -> None:
        self._lock = threading.Lock()
        self.limits = dict(tables)
        self._entries: dict[str, collections.OrderedDict[Any, tuple[Any, int]]] = {
            name: collections.OrderedDict() for name in tables
        }
        self.connected = False
        self.position: Revision | None = None  # the last batch (or mark) applied from the stream
        self._generation = 0  # bumped whenever entries are flushed
        self._inflight: collections.Counter[tuple[str, Any]] = collections.Counter()
        self._dirty: set[tuple[str, Any]] = set()
        self._forms: dict[str, tuple[Any, ...]] = {}  # table -> each key column's stream form
        self.stats = NearCacheStats()

    def learn(self, table: str, key_types: Iterable[str]) -> None:
        """The SQL types of ``table``'s key columns (from ListTables)."""
        with self._lock:
            self._forms[table] = tuple(stream_form(t) for t in key_types)

    def holds(self, table: str, key: Any) -> bool:
        """Whether ``key`` is in the form the change stream uses for this table (only such keys are held)."""
        forms = self._forms.get(table)
        if forms is None:
            return False
        parts = key if isinstance(key, tuple) else (key,)
        return len(parts) == len(forms) and all(_in_form(p, f) for p, f in zip(parts, forms, strict=True))

    @property
    def tables(self) -> list[str]:
        return list(self.limits)

    def serves(self, table: str) -> bool:
        return self.connected and table in self._entries

    # ------------------------------------------------------------ reads

    def lookup(self, table: str, key: Any) -> tuple[bool, Any]:
        with self._lock:
            entries = self._entries[table]
            entry = entries.get(key)
            if entry is None:
                self.stats.misses += 1
                return False, None
            entries.move_to_end(key)
            self.stats.hits += 1
            return True, entry[0]

    def begin_fill(self, table: str, key: Any) -> FillTicket:
        with self._lock:
            self._inflight[(table, key)] += 1
            return FillTicket(self._generation)

    def end_fill(self, table: str, key: Any, ticket: FillTicket, row: Any, revision: Revision | None) -> None:
        """Store what a read brought back, unless a change or flush overtook it."""
        with self._lock:
            slot = (table, key)
            self._inflight[slot] -= 1
            overtaken = slot in self._dirty
            if self._inflight[slot] <= 0:
                del self._inflight[slot]
                self._dirty.discard(slot)
            position = self.position
            if (
                overtaken
                or ticket.generation != self._generation
                or not self.connected
                or row is None
                or revision is None
                or (position is not None and revision.epoch != position.epoch)
            ):
                self.stats.stale_fills_dropped += overtaken or ticket.generation != self._generation
                return
            entries = self._entries[table]
            entries[key] = (row, revision.number)
            entries.move_to_end(key)
            self.stats.fills += 1
            while len(entries) > self.limits[table]:
                entries.popitem(last=False)
                self.stats.evictions += 1

    # ------------------------------------------------------------ the stream

    def connect(self) -> None:
        with self._lock:
            self.connected = True

    def disconnect(self) -> None:
        """No changes arrive any more: what is held may go stale."""
        with self._lock:
            self.connected = False
            self._flush()

    def reset(self, revision: Revision | None) -> None:
        with self._lock:
            self._flush()
            self.position = revision

    def mark(self, revision: Revision) -> None:
        with self._lock:
            self.position = revision

    def apply(self, batch: ChangeBatch) -> None:
        with self._lock:
            number = batch.revision.number
            for change in batch.changes:
                entries = self._entries.get(change.table)
                if entries is None:
                    continue
                if change.key is None:  # truncate / whole-table change
                    entries.clear()
                    self._generation += 1
                    self.stats.flushes += 1
                    continue
                for key in (change.key, change.old_key):
                    if key is None:
                        continue
                    if (change.table, key) in self._inflight:
                        self._dirty.add((change.table, key))
                    entry = entries.get(key)
                    if entry is None or entry[1] >= number:
                        continue  # not held, or held from a newer read
                    if change.has_row and key == change.key and not change.undecodable and not change.ahead:
                        entries[key] = (change.row, number)
                    else:
                        del entries[key]
            self.position = batch.revision
            self.stats.batches += 1

    def _flush(self) -> None:
        for entries in self._entries.values():
            entries.clear()
        self._generation += 1
        self.stats.flushes += 1

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._entries.values())
