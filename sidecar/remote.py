"""The command line's client side: ``get``, ``query``, ``watch``, ``tables`` and
``health`` against a running sidecar, over gRPC, printed for a terminal or a script.

Rows go out byte for byte as served; each command returns its exit status
(0 done, 1 not found, not serving, or the call failed)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from sidecar.api.v1 import cache_pb2 as pb
from sidecar.api.v1 import cache_pb2_grpc as pb_grpc
from sidecar.errors import ConfigError
from sidecar.fleet.channels import UpstreamSecurity, explain, sync_channel

# The command line's names for the settings of a channel (its error messages name them).
FLAG_NAMES = {"ca": "--tls-ca-file", "cert": "--tls-cert-file", "key": "--tls-key-file", "token": "--token-file"}


def _call(target: str, work: Callable[[Any], int], security: UpstreamSecurity | None = None) -> int:
    """``work(channel)``'s status, or 1 with the cause printed when a call fails (2: a bad
    TLS or token file)."""
    security = security or UpstreamSecurity(keys=dict(FLAG_NAMES))
    try:
        channel = sync_channel(target, security)
    except ConfigError as exc:
        print(f"cache-sidecar: error: {exc.key}: {exc.problem}", file=sys.stderr)
        return 2
    with channel:
        try:
            return work(channel)
        except grpc.RpcError as exc:
            print(f"cache-sidecar: {explain(exc, target, security)}", file=sys.stderr)
            return 1


def _options(strong: bool) -> Any:
    return pb.ReadOptions(consistency=pb.STRONG if strong else pb.EVENTUAL)


def health(target: str, service: str, security: UpstreamSecurity | None = None) -> int:
    """Print grpc.health.v1's status of ``service``; 0 when SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    def work(channel: Any) -> int:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
        return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1

    return _call(target, work, security)


def tables(target: str, security: UpstreamSecurity | None = None) -> int:
    """One line per cached table, its indexes and problem under it, then the revision."""

    def work(channel: Any) -> int:
        listing = pb_grpc.CacheStub(channel).ListTables(pb.ListTablesRequest(), timeout=10)
        for t in listing.tables:
            keys = ", ".join(f"{c.name} {c.type}" for c in t.key_columns)
            mode = pb.TableMode.Name(t.mode).lower()
            print(f"{t.name}\t{mode}\trows={t.row_count}\tloaded={t.loaded}\tkey=({keys})")
            for i in t.indexes:
                kind = "range" if i.range else "unique" if i.unique else "equality"
                print(f"  index {i.name} ({', '.join(i.columns)}) {kind}")
            if t.problem:
                print(f"  NOT SERVED from memory: {t.problem}")
        print(f"revision {listing.revision.epoch}/{listing.revision.number}")
        if listing.HasField("upstream"):
            up = listing.upstream
            state = "following" if up.following else "NOT following (reads go to the upstream)"
            print(f"upstream {up.target}: {state}, behind {up.behind_revisions} revision(s), {up.behind_seconds:.1f}s")
        if listing.HasField("standby"):
            lag = listing.standby
            receiving = "receiving" if lag.receiving else "NOT receiving from its primary"
            print(
                f"database: a standby, {receiving}, behind by {lag.replay_lag_bytes} bytes of WAL, "
                f"{lag.replay_lag_seconds:.1f}s"
            )
        return 0

    return _call(target, work, security)


def get(
    target: str,
    table: str,
    key: Sequence[str],
    *,
    strong: bool,
    pretty: bool,
    security: UpstreamSecurity | None = None,
) -> int:
    """Print the row with this key (one string per key column); 1 when there is none."""

    def work(channel: Any) -> int:
        request = pb.GetRequest(
            table=table, key=pb.Key(parts=[pb.KeyPart(string_value=part) for part in key]), options=_options(strong)
        )
        reply = pb_grpc.CacheStub(channel).Get(request, timeout=10)
        if not reply.found:
            print("not found", file=sys.stderr)
            return 1
        write_row(reply.row, pretty)
        return 0

    return _call(target, work, security)


def query(
    target: str,
    table: str,
    index: str,
    *,
    values: Sequence[str],
    lower: str | None,
    upper: str | None,
    limit: int,
    descending: bool,
    strong: bool,
    pretty: bool,
    security: UpstreamSecurity | None = None,
) -> int:
    """Print the rows whose index columns equal one of ``values`` (a value's columns
    comma-separated), or, without values, those between ``lower`` and ``upper``."""
    request = pb.QueryRequest(
        table=table, index=index, limit=max(limit, 0), descending=descending, options=_options(strong)
    )
    if values:
        for value in values:
            request.values.add(parts=[pb.KeyPart(string_value=part) for part in value.split(",")])
    else:
        request.range.SetInParent()
        if lower is not None:
            request.range.lower.string_value = lower
        if upper is not None:
            request.range.upper.string_value = upper

    def work(channel: Any) -> int:
        reply = pb_grpc.CacheStub(channel).Query(request, timeout=10)
        for row in reply.rows:
            write_row(row.row, pretty)
        if reply.truncated:
            print(f"(more rows matched; showing {len(reply.rows)})", file=sys.stderr)
        return 0

    return _call(target, work, security)


# A stream that ended with one of these is resumed from the last revision seen.
RESUMABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,  # the sidecar restarted, shut down, or the network broke
        grpc.StatusCode.RESOURCE_EXHAUSTED,  # fell behind (a slow terminal)
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,  # a connection reset mid-stream
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,  # a call that reached a sidecar while it was shutting down
    }
)
WATCH_PROGRESS_MS = 1000  # so that the revision to resume from stays current on a quiet stream
RETRY_MIN_DELAY, RETRY_MAX_DELAY = 0.2, 5.0


class _WatchState:
    """Where a ``watch`` is: the revision to resume from, and whether the initial state is done."""

    def __init__(self, start: pb.Revision | None, initial_state: bool) -> None:
        self.revision = start
        self.initial_state = initial_state  # asked for: sent again after every reset
        self.initial_pending = initial_state

    def request(self, table: str, keys: Sequence[pb.Key]) -> pb.WatchRequest:
        request = pb.WatchRequest(
            tables=[table],
            keys=keys,
            initial_state=self.initial_pending,
            progress_interval_ms=WATCH_PROGRESS_MS,
            accept_batches=True,
        )
        if self.revision is not None and not self.initial_pending:
            request.start_revision.CopyFrom(self.revision)
        return request

    def seen(self, revision: pb.Revision) -> None:
        if revision.epoch:
            self.revision = pb.Revision(epoch=revision.epoch, number=revision.number)


def watch(
    target: str,
    table: str,
    *,
    keys: Sequence[str],
    start: str | None,
    initial_state: bool,
    security: UpstreamSecurity | None = None,
) -> int:
    """Print one JSON line per change of ``table`` (rows byte for byte as served), resuming by
    itself after a restart or a broken connection, until interrupted (Ctrl-C, SIGTERM: 0)."""
    import signal
    import time

    try:
        start_revision = parse_revision(start) if start is not None else None
    except ValueError as exc:
        print(f"cache-sidecar: error: --from: {exc}", file=sys.stderr)
        return 2
    key_messages = [pb.Key(parts=[pb.KeyPart(string_value=part) for part in key.split(",")]) for key in keys]
    state = _WatchState(start_revision, initial_state)

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)

    def work(channel: Any) -> int:
        stub = pb_grpc.CacheStub(channel)
        delay = RETRY_MIN_DELAY
        while True:
            call = stub.Watch(state.request(table, key_messages))
            received = False
            try:
                for response in call:
                    received = True
                    delay = RETRY_MIN_DELAY
                    _print_watch_response(response, state)
                return 0  # (the sidecar ended the stream without an error: nothing more will come)
            except grpc.RpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.OUT_OF_RANGE and state.revision is not None and received is False:
                    if start_revision is not None and state.revision == start_revision:
                        raise  # the revision the user gave is gone: say so, do not skip changes silently
                    # The history no longer reaches back to where the stream broke: start again.
                    _print_line({"reset": {"revision": None, "reason": exc.details() or "history lost"}})
                    state.revision, state.initial_pending = None, state.initial_state
                elif code not in RESUMABLE or (code == grpc.StatusCode.RESOURCE_EXHAUSTED and not received):
                    raise
                elif state.initial_pending and received:
                    # Broken within the initial state: it is sent again in full.
                    _print_line({"reset": {"revision": None, "reason": "stream lost during the initial state"}})
                print(
                    f"cache-sidecar: watch: {explain(exc, target, security)}; resuming in {delay:.1f}s",
                    file=sys.stderr,
                    flush=True,
                )
                time.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_DELAY)
            finally:
                call.cancel()

    try:
        return _call(target, work, security)
    except KeyboardInterrupt:
        return 0


def parse_revision(text: str) -> pb.Revision:
    """``EPOCH/NUMBER``, as ``tables`` and ``watch`` print revisions."""
    epoch, slash, number = text.rpartition("/")
    if not slash or not epoch or not number.isdigit():
        raise ValueError(f"{text!r} is not a revision (EPOCH/NUMBER, as 'cache-sidecar tables' prints it)")
    return pb.Revision(epoch=epoch, number=int(number))


def _revision_text(revision: pb.Revision) -> str:
    return f"{revision.epoch}/{revision.number}"


def _print_watch_response(response: pb.WatchResponse, state: _WatchState) -> None:
    kind = response.WhichOneof("kind")
    if kind == "changes":
        batches = [response.changes]
    elif kind == "batches":
        batches = list(response.batches.batches)
    elif kind == "reset":
        state.seen(response.reset.revision)
        state.initial_pending = state.initial_state  # (the snapshot comes again, then changes)
        _print_line({"reset": {"revision": _revision_text(response.reset.revision), "reason": response.reset.reason}})
        return
    elif kind == "initial_state_done":
        state.seen(response.initial_state_done.revision)
        state.initial_pending = False
        _print_line({"initial_state_done": _revision_text(response.initial_state_done.revision)})
        return
    else:  # progress: nothing to print, a newer revision to resume from
        state.seen(response.progress.revision)
        return
    for batch in batches:
        for event in batch.events:
            write_event(batch, event)
        if not state.initial_pending:
            state.seen(batch.revision)


def write_event(batch: pb.ChangeBatch, event: pb.ChangeEvent) -> None:
    """One change as a JSON line; its row, when it carries one, byte for byte as served."""
    import json

    fields: dict[str, Any] = {
        "revision": _revision_text(batch.revision),
        "table": event.table,
        "op": pb.Operation.Name(event.operation).lower(),
    }
    if event.HasField("key"):
        fields["key"] = [_part_value(part) for part in event.key.parts]
    if event.HasField("old_key"):
        fields["old_key"] = [_part_value(part) for part in event.old_key.parts]
    if batch.xid:
        fields["xid"] = batch.xid
    head = json.dumps(fields, ensure_ascii=False).encode()[:-1]  # (without its closing brace)
    row = bytes(event.row) if event.has_row else b"null"
    sys.stdout.flush()
    sys.stdout.buffer.write(head + b', "row": ' + row + b"}\n")
    sys.stdout.flush()  # a line as it comes: a watch is read live, or piped to another tool


def _part_value(part: pb.KeyPart) -> Any:
    kind = part.WhichOneof("kind")
    value = getattr(part, kind) if kind is not None else None
    return value.hex() if isinstance(value, bytes) else value


def _print_line(document: dict[str, Any]) -> None:
    import json

    print(json.dumps(document, ensure_ascii=False), flush=True)


def write_row(row: bytes, pretty: bool) -> None:
    """A row exactly as served: decoding and re-encoding the JSON would round numerics
    to floats, drop trailing zeros and escape non-ASCII text, so bytes go out as they came
    (``--pretty`` changes whitespace only)."""
    sys.stdout.flush()  # anything printed before goes first
    sys.stdout.buffer.write((reindent(row) if pretty else row) + b"\n")


def reindent(document: bytes, indent: int = 2) -> bytes:
    """``document`` (JSON) with one member or element a line: only whitespace outside
    strings changes; strings, numbers and literals are copied byte for byte."""
    out = bytearray()
    depth = 0
    i, n = 0, len(document)
    while i < n:
        c = document[i : i + 1]
        if c == b'"':
            end = i + 1
            while end < n and document[end : end + 1] != b'"':
                end += 2 if document[end : end + 1] == b"\\" else 1
            out += document[i : end + 1]
            i = end + 1
            continue
        if c in b"{[":
            closing = b"}" if c == b"{" else b"]"
            j = i + 1
            while j < n and document[j] in b" \t\r\n":
                j += 1
            if document[j : j + 1] == closing:  # empty: {} or []
                out += c + closing
                i = j + 1
                continue
            depth += 1
            out += c + b"\n" + b" " * (indent * depth)
        elif c in b"}]":
            depth -= 1
            out += b"\n" + b" " * (indent * depth) + c
        elif c == b",":
            out += b",\n" + b" " * (indent * depth)
        elif c == b":":
            out += b": "
        elif c not in b" \t\r\n":
            out += c
        i += 1
    return bytes(out)
