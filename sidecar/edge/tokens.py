"""Bearer tokens: the server's token file, a client's token file, and matching a
presented token against the server's set in constant time.

The server's file (``server.auth_token_file``) holds one token a line; blank
lines and lines starting with ``#`` are ignored. A token is read-only unless its
line says ``admin <token>``: only admin tokens may call ``Invalidate``. A
client's file (``upstream.token_file``, ``--token-file``) holds its one token.

Tokens are RFC 6750 ``b64token``s (letters, digits, ``-._~+/``, trailing
``=``) of at least ``MIN_LENGTH`` characters: ``openssl rand -hex 32`` makes
one. Messages name line numbers, never a token. Plain Python: no grpc here.

At start the server's file must be entirely good (``parse_token_set``: a bad
line is a configuration error). When it is re-read (``reread_token_set``) it
fails closed: a bad line is skipped (and logged), so a leaked token whose line
was overwritten with a mistyped one is revoked all the same; a file with no
good token left raises, and the server then refuses every call (``auth.py``).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from sidecar.edge.filewatch import FileProblem

log = logging.getLogger(__name__)

MIN_LENGTH = 16
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
ADMIN = "admin"


class Role(Enum):
    READ = "read-only"
    ADMIN = "admin"


@dataclass(frozen=True)
class TokenSet:
    """The server's tokens, kept as SHA-256 digests: a comparison's time depends on
    neither the presented token nor how much of it matches."""

    digests: tuple[tuple[bytes, Role], ...]
    skipped: tuple[str, ...] = ()  # why each bad line was left out (re-reads only; never a token)

    def role(self, presented: str) -> Role | None:
        """The presented token's role, or None when it is none of ours. Every digest is
        compared, whichever matches (constant time in the token's content)."""
        digest = hashlib.sha256(presented.encode("utf-8", errors="replace")).digest()
        found: Role | None = None
        for known, role in self.digests:
            if hmac.compare_digest(known, digest):
                found = role
        return found

    def __len__(self) -> int:
        return len(self.digests)


def _check_token(token: str, line: int) -> None:
    if not _TOKEN.fullmatch(token):
        raise FileProblem(
            f"line {line}: a token may hold only letters, digits and -._~+/ (with trailing =), "
            "e.g. from 'openssl rand -hex 32'"
        )
    if len(token) < MIN_LENGTH:
        raise FileProblem(f"line {line}: the token is shorter than {MIN_LENGTH} characters (too easy to guess)")


def _lines(content: bytes) -> list[tuple[int, str]]:
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise FileProblem("is not UTF-8 text") from None
    return [
        (number, line.strip())
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.strip().startswith("#")
    ]


def _server_line(number: int, raw: bytes) -> tuple[bytes, Role] | None:
    """One line of the server's file: its token's digest and role, None for a blank line or
    a comment; ``FileProblem`` naming the line when it is bad."""
    try:
        line = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise FileProblem(f"line {number}: is not UTF-8 text") from None
    if not line or line.startswith("#"):
        return None
    words = line.split()
    if len(words) == 1:
        token, role = words[0], Role.READ
    elif len(words) == 2 and words[0] == ADMIN:
        token, role = words[1], Role.ADMIN
    else:
        raise FileProblem(f"line {number}: expected '<token>' or 'admin <token>'")
    _check_token(token, number)
    return hashlib.sha256(token.encode()).digest(), role


def read_token_set(content: bytes) -> TokenSet:
    """The server's token file, every good line of it: a bad line is left out (its reason
    in ``skipped``), never a reason to keep tokens the file no longer holds."""
    digests: list[tuple[bytes, Role]] = []
    skipped: list[str] = []
    for number, raw in enumerate(content.splitlines(), start=1):
        try:
            entry = _server_line(number, raw)
        except FileProblem as problem:
            skipped.append(str(problem))
            continue
        if entry is not None:
            digests.append(entry)
    return TokenSet(tuple(digests), tuple(skipped))


def parse_token_set(content: bytes) -> TokenSet:
    """The server's token file at start: ``<token>`` (read-only) or ``admin <token>`` a
    line; any bad line, or no token at all, is a ``FileProblem``."""
    tokens = read_token_set(content)
    if tokens.skipped:
        raise FileProblem(tokens.skipped[0])
    if not tokens:
        raise FileProblem("holds no token: every call would be refused")
    return tokens


def parse_client_token(content: bytes) -> str:
    """A client's token file: its one token (blank lines and # comments aside)."""
    lines = _lines(content)
    if not lines:
        raise FileProblem("holds no token")
    if len(lines) > 1:
        raise FileProblem(f"holds more than one line (line {lines[1][0]}); a client sends one token")
    number, token = lines[0]
    if token.split()[0] == ADMIN and len(token.split()) == 2:
        raise FileProblem(
            f"line {number}: a client's file holds the token alone ('admin' marks belong in the server's)"
        )
    _check_token(token, number)
    return token


def token_set_from_files(_paths: Sequence[str], contents: Sequence[bytes]) -> TokenSet:
    return parse_token_set(contents[0])


def reread_token_set(paths: Sequence[str], contents: Sequence[bytes]) -> TokenSet:
    """The server's token file when it changed: its good lines (each bad one logged);
    ``FileProblem`` when none is left (then every call is refused)."""
    tokens = read_token_set(contents[0])
    for reason in tokens.skipped:
        log.error(
            "%s: %s; that line is skipped (its token, if it had one, is refused)",
            paths[0],
            reason,
            extra={"event": "token_line_skipped"},
        )
    if not tokens:
        raise FileProblem("holds no valid token")
    return tokens


REFUSE_ALL = TokenSet(())  # what a missing, unreadable or tokenless file grants


def client_token_from_files(_paths: Sequence[str], contents: Sequence[bytes]) -> str:
    return parse_client_token(contents[0])


def bearer(metadata_value: str) -> str | None:
    """The token of an ``authorization: Bearer <token>`` value (the scheme is case-insensitive)."""
    scheme, _, token = metadata_value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
