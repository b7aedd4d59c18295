"""Files re-read when they change, so that certificates and tokens rotate without a restart.

A ``Watched`` value is parsed from one or more files and re-parsed when any of
them changes (device, inode, size or modification time: a Kubernetes Secret's
atomic symlink swap changes the inode, an editor's rewrite the time). The first
parse raises (a bad file at start is a configuration error naming the key and
the file); a later one that fails keeps the last good value and logs, so a
half-written file never takes the daemon's credentials away.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from sidecar.errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")
# Seconds between looks at the files' metadata (one stat each): checking on every
# call would cost a system call per request. A plain variable so that tests can change it.
CHECK_INTERVAL = 1.0

Identity = tuple[int, int, int, int]


class FileProblem(Exception):
    """A file's content is not what its setting needs; the message says why (no secrets in it).
    ``index``: which of the watched files (0: the first)."""

    def __init__(self, message: str, index: int = 0) -> None:
        super().__init__(message)
        self.index = index


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
    ``ConfigError``) when they will not do. Safe to call from any thread (grpc calls
    the certificate fetcher on its own)."""

    def __init__(
        self,
        files: Sequence[tuple[str, str]],
        parse: Callable[[Sequence[str], Sequence[bytes]], T],
        what: str,
        interval: float | None = None,
    ) -> None:
        self.files = tuple(files)
        self._parse = parse
        self.what = what
        self._interval = interval
        self._lock = threading.Lock()
        self._checked = 0.0
        self._problem: str | None = None  # the last complaint (each is logged once, not at every look)
        self._seen, self._value = self._load(initial=True)  # type: ignore[misc]

    @property
    def value(self) -> T:
        """The last good value, re-read first if a file changed (looked at most every interval)."""
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
                self._complain(f"cannot stat {exc.filename}: {exc.strerror}")
                return False
            if seen == self._seen:
                return False
            loaded = self._load(initial=False)
            if loaded is None:
                # Remember what was seen: the same bad content is not re-parsed (and
                # logged) at every look, only once it changes again.
                self._seen = seen
                return False
            self._seen, self._value = loaded
            self._problem = None
        log.info("re-read %s (%s)", self.what, ", ".join(path for _key, path in self.files))
        return True

    def _load(self, initial: bool) -> tuple[tuple[Identity, ...], T] | None:
        try:
            seen = tuple(_identity(path) for _key, path in self.files)
            contents = [read_bytes(key, path) for key, path in self.files]
            value = self._parse([path for _key, path in self.files], contents)
            # Changed while being read (a rotation in progress)? Then what was parsed may
            # mix two versions: keep the old value and look again next time.
            if tuple(_identity(path) for _key, path in self.files) != seen:
                raise FileProblem("changed while being read")
        except OSError as exc:
            if initial:
                key = next((key for key, path in self.files if path == exc.filename), self.files[0][0])
                problem = "file not found" if isinstance(exc, FileNotFoundError) else "cannot read it"
                raise ConfigError(key, f"{problem}: {exc.filename} ({exc.strerror})") from None
            self._complain(f"cannot read {exc.filename}: {exc.strerror}")
            return None
        except FileProblem as exc:
            key, path = self.files[min(exc.index, len(self.files) - 1)]
            if initial:
                raise ConfigError(key, f"{path}: {exc}") from None
            self._complain(f"{path}: {exc}")
            return None
        except ConfigError as exc:
            if initial:
                raise
            self._complain(str(exc))
            return None
        return seen, value

    def _complain(self, problem: str) -> None:
        if problem == self._problem:
            return
        self._problem = problem
        log.error(
            "cannot re-read %s (%s): %s; keeping the previous one",
            self.what,
            ", ".join(path for _key, path in self.files),
            problem,
            extra={"event": "reload_failed"},
        )
