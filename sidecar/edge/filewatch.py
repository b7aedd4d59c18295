"""Files re-read when they change, so that certificates and tokens rotate without a restart.

A ``Watched`` value is parsed from one or more files and re-parsed when any of
them changes (device, inode, size or modification time: a Kubernetes Secret's
atomic symlink swap changes the inode, an editor's rewrite the time). The first
parse raises (a bad file at start is a configuration error naming the key and
the file). What a later one that fails does depends on what the file grants:

- certificates (``closed`` not given): the last good value stays and the problem
  is logged, so a half-written file never takes the daemon's TLS away;
- tokens (``closed`` given: a value that grants nothing): a file that is missing,
  unreadable or bad when re-read *revokes*: the value becomes ``closed()`` until a
  good file is back, so deleting or emptying a token file never keeps a revoked
  token alive. (A file that changed while it was read is only looked at again.)

A problem that time may cure (``FileProblem(retry=True)``: a certificate not
valid yet) is looked at again every ``RETRY_INTERVAL`` even if the file stays
the same.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from sidecar.errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")
# Seconds between looks at the files' metadata (one stat each): checking on every
# call would cost a system call per request. A plain variable so that tests can change it.
CHECK_INTERVAL = 1.0
RETRY_INTERVAL = 5.0

Identity = tuple[int, int, int, int]


class FileProblem(Exception):
    """A file's content is not what its setting needs; the message says why (no secrets in it).
    ``index``: which of the watched files (0: the first); ``retry``: the same content may
    do later (a certificate that is not valid yet)."""

    def __init__(self, message: str, index: int = 0, retry: bool = False) -> None:
        super().__init__(message)
        self.index = index
        self.retry = retry


def _identity(path: str) -> Identity:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def read_bytes(key: str, path: str) -> bytes:
    """The file's content, or a ``ConfigError`` naming the key and the file."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError(key, f"file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(key, f"{path} is a directory, not a file") from None
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None


class Watched(Generic[T]):
    """The value ``parse`` makes of the contents of ``files`` (setting key, path), current.

    ``parse`` gets the paths and their contents and raises ``FileProblem`` (or
    ``ConfigError``) when they will not do; ``reread`` (default: ``parse``) does the
    same for every later read. ``closed``: the value that grants nothing, taken when a
    later read fails (see the module's docstring). Safe to call from any thread (grpc
    calls the certificate fetcher on its own)."""

    def __init__(
        self,
        files: Sequence[tuple[str, str]],
        parse: Callable[[Sequence[str], Sequence[bytes]], T],
        what: str,
        interval: float | None = None,
        *,
        reread: Callable[[Sequence[str], Sequence[bytes]], T] | None = None,
        closed: Callable[[], T] | None = None,
        closed_means: str = "it grants nothing until it is fixed",
    ) -> None:
        self.files = tuple(files)
        self._parse = parse
        self._reread = reread or parse
        self._closed = closed
        self._closed_means = closed_means
        self.what = what
        self._interval = interval
        self._lock = threading.Lock()
        self._checked = 0.0
        self._retry_at: float | None = None  # when to parse unchanged files again (a problem time may cure)
        self._problem: str | None = None  # the last complaint (each is logged once, not at every look)
        self.failures = 0  # later reads that failed (each problem counted once, as it is logged)
        self.failing = False  # the last read failed (the value is the last good one, or ``closed()``)
        self._value_is_closed = False
        self._seen: tuple[Identity, ...] | None
        self._seen, self._value = self._load(initial=True)  # type: ignore[misc]

    @property
    def value(self) -> T:
        """The current value, re-read first if a file changed (looked at most every interval)."""
        interval = CHECK_INTERVAL if self._interval is None else self._interval
        now = time.monotonic()
        if now - self._checked >= interval:
            self.refresh(now)
        return self._value

    def refresh(self, now: float | None = None) -> bool:
        """Re-read if a file changed; True when a new value was taken."""
        with self._lock:
            self._checked = time.monotonic() if now is None else now
            try:
                seen = tuple(_identity(path) for _key, path in self.files)
            except OSError as exc:
                problem = "file not found" if isinstance(exc, FileNotFoundError) else exc.strerror
                return self._failed(f"cannot read {exc.filename}: {problem}", None)
            retry = self._retry_at is not None and self._checked >= self._retry_at
            if seen == self._seen and not retry:
                return False
            self._retry_at = None
            loaded = self._load(initial=False)
            if loaded is None:
                return False  # (seen stays as it was: the next look reads the files again)
            if isinstance(loaded, _Failure):
                # Remember what was seen: the same bad content is not re-parsed (and
                # logged) at every look, only once it changes again (or, for a problem
                # time may cure, once RETRY_INTERVAL passed).
                if loaded.retry:
                    self._retry_at = self._checked + RETRY_INTERVAL
                return self._failed(loaded.problem, seen)
            self._seen, self._value = loaded
            self._problem = None
            self.failing = False
            self._value_is_closed = False
        log.info("re-read %s (%s)", self.what, ", ".join(path for _key, path in self.files))
        return True

    def _failed(self, problem: str, seen: tuple[Identity, ...] | None) -> bool:
        """A later read failed (the lock is held): keep the last good value, or take the
        closed one; True when the value changed."""
        self._seen = seen  # (None: nothing was there; whatever appears next is read)
        self.failing = True
        if self._closed is None:
            self._complain(problem, "keeping the previous one")
            return False
        changed = not self._value_is_closed
        self._value = self._closed()
        self._value_is_closed = True
        self._complain(problem, self._closed_means)
        return changed

    def _load(self, initial: bool) -> tuple[tuple[Identity, ...], T] | _Failure | None:
        """The files' identity and value; a ``_Failure`` (later reads); None: they changed
        while being read (a rotation in progress): look again next time."""
        try:
            seen = tuple(_identity(path) for _key, path in self.files)
            contents = [read_bytes(key, path) for key, path in self.files]
            paths = [path for _key, path in self.files]
            value = self._parse(paths, contents) if initial else self._reread(paths, contents)
            # Changed while being read? Then what was parsed may mix two versions: keep
            # the value as it is and look again next time.
            if tuple(_identity(path) for _key, path in self.files) != seen:
                if not initial:
                    return None
                raise FileProblem("changed while being read")
        except OSError as exc:
            if initial:
                key = next((key for key, path in self.files if path == exc.filename), self.files[0][0])
                problem = "file not found" if isinstance(exc, FileNotFoundError) else "cannot read it"
                raise ConfigError(key, f"{problem}: {exc.filename} ({exc.strerror})") from None
            return _Failure(f"cannot read {exc.filename}: {exc.strerror}")
        except FileProblem as exc:
            key, path = self.files[min(exc.index, len(self.files) - 1)]
            if initial:
                raise ConfigError(key, f"{path}: {exc}") from None
            return _Failure(f"{path}: {exc}", exc.retry)
        except ConfigError as exc:
            if initial:
                raise
            return _Failure(str(exc))
        return seen, value

    def _complain(self, problem: str, outcome: str) -> None:
        if problem == self._problem:
            return
        self._problem = problem
        self.failures += 1
        log.error(
            "cannot re-read %s (%s): %s; %s",
            self.what,
            ", ".join(path for _key, path in self.files),
            problem,
            outcome,
            extra={"event": "reload_failed"},
        )


@dataclass(frozen=True)
class _Failure:
    problem: str
    retry: bool = False
