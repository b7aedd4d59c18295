from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Consistency(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONSISTENCY_UNSPECIFIED: _ClassVar[Consistency]
    EVENTUAL: _ClassVar[Consistency]
    STRONG: _ClassVar[Consistency]

class Operation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPERATION_UNSPECIFIED: _ClassVar[Operation]
    INSERT: _ClassVar[Operation]
    UPDATE: _ClassVar[Operation]
    DELETE: _ClassVar[Operation]
    TRUNCATE: _ClassVar[Operation]
    TABLE_CHANGED: _ClassVar[Operation]
    INVALIDATE: _ClassVar[Operation]
    SNAPSHOT: _ClassVar[Operation]

class TableMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TABLE_MODE_UNSPECIFIED: _ClassVar[TableMode]
    FULL: _ClassVar[TableMode]
    LAZY: _ClassVar[TableMode]
CONSISTENCY_UNSPECIFIED: Consistency
EVENTUAL: Consistency
STRONG: Consistency
OPERATION_UNSPECIFIED: Operation
INSERT: Operation
UPDATE: Operation
DELETE: Operation
TRUNCATE: Operation
TABLE_CHANGED: Operation
INVALIDATE: Operation
SNAPSHOT: Operation
TABLE_MODE_UNSPECIFIED: TableMode
FULL: TableMode
LAZY: TableMode

class Revision(_message.Message):
    __slots__ = ("epoch", "number")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    epoch: str
    number: int
    def __init__(self, epoch: _Optional[str] = ..., number: _Optional[int] = ...) -> None: ...

class ReadOptions(_message.Message):
    __slots__ = ("consistency", "min_revision", "allow_stale")
    CONSISTENCY_FIELD_NUMBER: _ClassVar[int]
    MIN_REVISION_FIELD_NUMBER: _ClassVar[int]
    ALLOW_STALE_FIELD_NUMBER: _ClassVar[int]
    consistency: Consistency
    min_revision: Revision
    allow_stale: bool
    def __init__(self, consistency: _Optional[_Union[Consistency, str]] = ..., min_revision: _Optional[_Union[Revision, _Mapping]] = ..., allow_stale: _Optional[bool] = ...) -> None: ...

class KeyPart(_message.Message):
    __slots__ = ("int_value", "string_value", "bool_value", "double_value", "bytes_value")
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    DOUBLE_VALUE_FIELD_NUMBER: _ClassVar[int]
    BYTES_VALUE_FIELD_NUMBER: _ClassVar[int]
    int_value: int
    string_value: str
    bool_value: bool
    double_value: float
    bytes_value: bytes
    def __init__(self, int_value: _Optional[int] = ..., string_value: _Optional[str] = ..., bool_value: _Optional[bool] = ..., double_value: _Optional[float] = ..., bytes_value: _Optional[bytes] = ...) -> None: ...

class Key(_message.Message):
    __slots__ = ("parts",)
    PARTS_FIELD_NUMBER: _ClassVar[int]
    parts: _containers.RepeatedCompositeFieldContainer[KeyPart]
    def __init__(self, parts: _Optional[_Iterable[_Union[KeyPart, _Mapping]]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("table", "key", "options")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    table: str
    key: Key
    options: ReadOptions
    def __init__(self, table: _Optional[str] = ..., key: _Optional[_Union[Key, _Mapping]] = ..., options: _Optional[_Union[ReadOptions, _Mapping]] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("found", "row", "revision")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    found: bool
    row: bytes
    revision: Revision
    def __init__(self, found: _Optional[bool] = ..., row: _Optional[bytes] = ..., revision: _Optional[_Union[Revision, _Mapping]] = ...) -> None: ...

class BatchGetRequest(_message.Message):
    __slots__ = ("table", "keys", "options", "int_keys", "string_keys")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    INT_KEYS_FIELD_NUMBER: _ClassVar[int]
    STRING_KEYS_FIELD_NUMBER: _ClassVar[int]
    table: str
    keys: _containers.RepeatedCompositeFieldContainer[Key]
    options: ReadOptions
    int_keys: _containers.RepeatedScalarFieldContainer[int]
    string_keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, table: _Optional[str] = ..., keys: _Optional[_Iterable[_Union[Key, _Mapping]]] = ..., options: _Optional[_Union[ReadOptions, _Mapping]] = ..., int_keys: _Optional[_Iterable[int]] = ..., string_keys: _Optional[_Iterable[str]] = ...) -> None: ...

class RowResult(_message.Message):
    __slots__ = ("found", "row")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    found: bool
    row: bytes
    def __init__(self, found: _Optional[bool] = ..., row: _Optional[bytes] = ...) -> None: ...

class BatchGetResponse(_message.Message):
    __slots__ = ("rows", "revision")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[RowResult]
    revision: Revision
    def __init__(self, rows: _Optional[_Iterable[_Union[RowResult, _Mapping]]] = ..., revision: _Optional[_Union[Revision, _Mapping]] = ...) -> None: ...

class InvalidateRequest(_message.Message):
    __slots__ = ("table", "keys", "all_rows", "refresh")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    ALL_ROWS_FIELD_NUMBER: _ClassVar[int]
    REFRESH_FIELD_NUMBER: _ClassVar[int]
    table: str
    keys: _containers.RepeatedCompositeFieldContainer[Key]
    all_rows: bool
    refresh: bool
    def __init__(self, table: _Optional[str] = ..., keys: _Optional[_Iterable[_Union[Key, _Mapping]]] = ..., all_rows: _Optional[bool] = ..., refresh: _Optional[bool] = ...) -> None: ...

class InvalidateResponse(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: Revision
    def __init__(self, revision: _Optional[_Union[Revision, _Mapping]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("tables", "keys", "operations", "start_revision", "initial_state", "progress_interval_ms", "accept_batches")
    TABLES_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    OPERATIONS_FIELD_NUMBER: _ClassVar[int]
    START_REVISION_FIELD_NUMBER: _ClassVar[int]
    INITIAL_STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_BATCHES_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedScalarFieldContainer[str]
    keys: _containers.RepeatedCompositeFieldContainer[Key]
    operations: _containers.RepeatedScalarFieldContainer[Operation]
    start_revision: Revision
    initial_state: bool
    progress_interval_ms: int
    accept_batches: bool
    def __init__(self, tables: _Optional[_Iterable[str]] = ..., keys: _Optional[_Iterable[_Union[Key, _Mapping]]] = ..., operations: _Optional[_Iterable[_Union[Operation, str]]] = ..., start_revision: _Optional[_Union[Revision, _Mapping]] = ..., initial_state: _Optional[bool] = ..., progress_interval_ms: _Optional[int] = ..., accept_batches: _Optional[bool] = ...) -> None: ...

class ChangeEvent(_message.Message):
    __slots__ = ("table", "operation", "key", "old_key", "row", "has_row", "ahead")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    OLD_KEY_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    HAS_ROW_FIELD_NUMBER: _ClassVar[int]
    AHEAD_FIELD_NUMBER: _ClassVar[int]
    table: str
    operation: Operation
    key: Key
    old_key: Key
    row: bytes
    has_row: bool
    ahead: bool
    def __init__(self, table: _Optional[str] = ..., operation: _Optional[_Union[Operation, str]] = ..., key: _Optional[_Union[Key, _Mapping]] = ..., old_key: _Optional[_Union[Key, _Mapping]] = ..., row: _Optional[bytes] = ..., has_row: _Optional[bool] = ..., ahead: _Optional[bool] = ...) -> None: ...

class ChangeBatch(_message.Message):
    __slots__ = ("revision", "events", "xid")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    XID_FIELD_NUMBER: _ClassVar[int]
    revision: Revision
    events: _containers.RepeatedCompositeFieldContainer[ChangeEvent]
    xid: int
    def __init__(self, revision: _Optional[_Union[Revision, _Mapping]] = ..., events: _Optional[_Iterable[_Union[ChangeEvent, _Mapping]]] = ..., xid: _Optional[int] = ...) -> None: ...

class Reset(_message.Message):
    __slots__ = ("revision", "reason")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    revision: Revision
    reason: str
    def __init__(self, revision: _Optional[_Union[Revision, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: Revision
    def __init__(self, revision: _Optional[_Union[Revision, _Mapping]] = ...) -> None: ...

class InitialStateDone(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: Revision
    def __init__(self, revision: _Optional[_Union[Revision, _Mapping]] = ...) -> None: ...

class ChangeBatches(_message.Message):
    __slots__ = ("batches",)
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    batches: _containers.RepeatedCompositeFieldContainer[ChangeBatch]
    def __init__(self, batches: _Optional[_Iterable[_Union[ChangeBatch, _Mapping]]] = ...) -> None: ...

class WatchResponse(_message.Message):
    __slots__ = ("changes", "reset", "progress", "initial_state_done", "batches")
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    INITIAL_STATE_DONE_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    changes: ChangeBatch
    reset: Reset
    progress: Progress
    initial_state_done: InitialStateDone
    batches: ChangeBatches
    def __init__(self, changes: _Optional[_Union[ChangeBatch, _Mapping]] = ..., reset: _Optional[_Union[Reset, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., initial_state_done: _Optional[_Union[InitialStateDone, _Mapping]] = ..., batches: _Optional[_Union[ChangeBatches, _Mapping]] = ...) -> None: ...

class SyncRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SyncResponse(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: Revision
    def __init__(self, revision: _Optional[_Union[Revision, _Mapping]] = ...) -> None: ...

class ListTablesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Column(_message.Message):
    __slots__ = ("name", "type", "type_name", "enum")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    TYPE_NAME_FIELD_NUMBER: _ClassVar[int]
    ENUM_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    type_name: str
    enum: bool
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., type_name: _Optional[str] = ..., enum: _Optional[bool] = ...) -> None: ...

class TableInfo(_message.Message):
    __slots__ = ("name", "key_columns", "mode", "row_count", "loaded", "revision", "max_rows", "bytes", "indexes", "problem", "load", "indexed_columns", "definition")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KEY_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    ROW_COUNT_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    INDEXES_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    INDEXED_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    DEFINITION_FIELD_NUMBER: _ClassVar[int]
    name: str
    key_columns: _containers.RepeatedCompositeFieldContainer[Column]
    mode: TableMode
    row_count: int
    loaded: bool
    revision: Revision
    max_rows: int
    bytes: int
    indexes: _containers.RepeatedCompositeFieldContainer[IndexInfo]
    problem: str
    load: LoadProgress
    indexed_columns: _containers.RepeatedCompositeFieldContainer[Column]
    definition: str
    def __init__(self, name: _Optional[str] = ..., key_columns: _Optional[_Iterable[_Union[Column, _Mapping]]] = ..., mode: _Optional[_Union[TableMode, str]] = ..., row_count: _Optional[int] = ..., loaded: _Optional[bool] = ..., revision: _Optional[_Union[Revision, _Mapping]] = ..., max_rows: _Optional[int] = ..., bytes: _Optional[int] = ..., indexes: _Optional[_Iterable[_Union[IndexInfo, _Mapping]]] = ..., problem: _Optional[str] = ..., load: _Optional[_Union[LoadProgress, _Mapping]] = ..., indexed_columns: _Optional[_Iterable[_Union[Column, _Mapping]]] = ..., definition: _Optional[str] = ...) -> None: ...

class LoadProgress(_message.Message):
    __slots__ = ("running", "rows", "expected_rows", "seconds", "rows_per_second", "eta_seconds", "completed")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_ROWS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    ROWS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    running: bool
    rows: int
    expected_rows: int
    seconds: float
    rows_per_second: float
    eta_seconds: float
    completed: int
    def __init__(self, running: _Optional[bool] = ..., rows: _Optional[int] = ..., expected_rows: _Optional[int] = ..., seconds: _Optional[float] = ..., rows_per_second: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., completed: _Optional[int] = ...) -> None: ...

class IndexInfo(_message.Message):
    __slots__ = ("name", "columns", "unique", "range")
    NAME_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    UNIQUE_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    name: str
    columns: _containers.RepeatedScalarFieldContainer[str]
    unique: bool
    range: bool
    def __init__(self, name: _Optional[str] = ..., columns: _Optional[_Iterable[str]] = ..., unique: _Optional[bool] = ..., range: _Optional[bool] = ...) -> None: ...

class ListTablesResponse(_message.Message):
    __slots__ = ("tables", "revision", "upstream", "standby")
    TABLES_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    STANDBY_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedCompositeFieldContainer[TableInfo]
    revision: Revision
    upstream: UpstreamInfo
    standby: StandbyInfo
    def __init__(self, tables: _Optional[_Iterable[_Union[TableInfo, _Mapping]]] = ..., revision: _Optional[_Union[Revision, _Mapping]] = ..., upstream: _Optional[_Union[UpstreamInfo, _Mapping]] = ..., standby: _Optional[_Union[StandbyInfo, _Mapping]] = ...) -> None: ...

class StandbyInfo(_message.Message):
    __slots__ = ("replay_lag_bytes", "replay_lag_seconds", "receiving")
    REPLAY_LAG_BYTES_FIELD_NUMBER: _ClassVar[int]
    REPLAY_LAG_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RECEIVING_FIELD_NUMBER: _ClassVar[int]
    replay_lag_bytes: int
    replay_lag_seconds: float
    receiving: bool
    def __init__(self, replay_lag_bytes: _Optional[int] = ..., replay_lag_seconds: _Optional[float] = ..., receiving: _Optional[bool] = ...) -> None: ...

class UpstreamInfo(_message.Message):
    __slots__ = ("target", "following", "upstream_revision", "behind_revisions", "behind_seconds")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    FOLLOWING_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_REVISION_FIELD_NUMBER: _ClassVar[int]
    BEHIND_REVISIONS_FIELD_NUMBER: _ClassVar[int]
    BEHIND_SECONDS_FIELD_NUMBER: _ClassVar[int]
    target: str
    following: bool
    upstream_revision: Revision
    behind_revisions: int
    behind_seconds: float
    def __init__(self, target: _Optional[str] = ..., following: _Optional[bool] = ..., upstream_revision: _Optional[_Union[Revision, _Mapping]] = ..., behind_revisions: _Optional[int] = ..., behind_seconds: _Optional[float] = ...) -> None: ...

class Range(_message.Message):
    __slots__ = ("lower", "upper", "lower_exclusive", "upper_exclusive")
    LOWER_FIELD_NUMBER: _ClassVar[int]
    UPPER_FIELD_NUMBER: _ClassVar[int]
    LOWER_EXCLUSIVE_FIELD_NUMBER: _ClassVar[int]
    UPPER_EXCLUSIVE_FIELD_NUMBER: _ClassVar[int]
    lower: KeyPart
    upper: KeyPart
    lower_exclusive: bool
    upper_exclusive: bool
    def __init__(self, lower: _Optional[_Union[KeyPart, _Mapping]] = ..., upper: _Optional[_Union[KeyPart, _Mapping]] = ..., lower_exclusive: _Optional[bool] = ..., upper_exclusive: _Optional[bool] = ...) -> None: ...

class QueryRequest(_message.Message):
    __slots__ = ("table", "index", "values", "range", "limit", "descending", "options")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    DESCENDING_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    table: str
    index: str
    values: _containers.RepeatedCompositeFieldContainer[Key]
    range: Range
    limit: int
    descending: bool
    options: ReadOptions
    def __init__(self, table: _Optional[str] = ..., index: _Optional[str] = ..., values: _Optional[_Iterable[_Union[Key, _Mapping]]] = ..., range: _Optional[_Union[Range, _Mapping]] = ..., limit: _Optional[int] = ..., descending: _Optional[bool] = ..., options: _Optional[_Union[ReadOptions, _Mapping]] = ...) -> None: ...

class QueryResponse(_message.Message):
    __slots__ = ("rows", "revision", "truncated")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[RowResult]
    revision: Revision
    truncated: bool
    def __init__(self, rows: _Optional[_Iterable[_Union[RowResult, _Mapping]]] = ..., revision: _Optional[_Union[Revision, _Mapping]] = ..., truncated: _Optional[bool] = ...) -> None: ...
