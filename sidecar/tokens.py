"""Bearer tokens: the server's token file, a client's token file, and matching a
presented token against the server's set in constant time.

The server's file (``server.auth_token_file``) holds one token a line; blank
lines and lines starting with ``#`` are ignored. A token is read-only unless its
line says ``admin <token>``: only admin tokens may call ``Invalidate``. A
client's file (``upstream.token_file``, ``--token-file``) holds its one token.

Tokens are RFC 6750 ``b64token``s (letters, digits, ``-._~+/``, trailing
``=``) of at least ``MIN_LENGTH`` characters: ``openssl rand -hex 32`` makes
one. Messages name line numbers, never a token. Plain Python: no grpc here.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from sidecar.filewatch import FileProblem

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


def parse_token_set(content: bytes) -> TokenSet:
    """The server's token file: ``<token>`` (read-only) or ``admin <token>`` a line."""
    digests: list[tuple[bytes, Role]] = []
    for number, line in _lines(content):
        words = line.split()
        if len(words) == 1:
            token, role = words[0], Role.READ
        elif len(words) == 2 and words[0] == ADMIN:
            token, role = words[1], Role.ADMIN
        else:
            raise FileProblem(f"line {number}: expected '<token>' or 'admin <token>'")
        _check_token(token, number)
        digests.append((hashlib.sha256(token.encode()).digest(), role))
    if not digests:
        raise FileProblem("holds no token: every call would be refused")
    return TokenSet(tuple(digests))


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


def client_token_from_files(_paths: Sequence[str], contents: Sequence[bytes]) -> str:
    return parse_client_token(contents[0])


def bearer(metadata_value: str) -> str | None:
    """The token of an ``authorization: Bearer <token>`` value (the scheme is case-insensitive)."""
    scheme, _, token = metadata_value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
