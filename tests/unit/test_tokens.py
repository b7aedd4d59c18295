"""Token files: the server's (read-only and admin tokens, comments) and a client's."""

from __future__ import annotations

import pytest

from sidecar.edge.filewatch import FileProblem
from sidecar.edge.tokens import Role, bearer, parse_client_token, parse_token_set, read_token_set

ADMIN = "A" * 20
READER = "r-" + "x" * 30


def test_the_server_file_marks_admin_tokens_and_ignores_comments_and_blank_lines():
    tokens = parse_token_set(f"# hub tokens\n\n  admin {ADMIN}  \n{READER}\n   # indented comment\n".encode())
    assert len(tokens) == 2
    assert tokens.role(ADMIN) is Role.ADMIN
    assert tokens.role(READER) is Role.READ
    assert tokens.role(READER[:-1]) is None and tokens.role(READER + "x") is None and tokens.role("") is None


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"", "no token"),
        (b"# only a comment\n", "no token"),
        (f"superuser {READER}\n".encode(), "line 1: expected"),
        (f"{READER}\nadmin short\n".encode(), "line 2: the token is shorter"),
        (f"{READER}\n\n{READER[:-3]}\u00e9\u00e9\u00e9\n".encode(), "line 3: a token may hold only"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_a_bad_server_file_names_the_line_and_never_the_token(content, words):
    with pytest.raises(FileProblem) as problem:
        parse_token_set(content)
    assert words in str(problem.value)
    assert READER not in str(problem.value) and "short" not in str(problem.value).replace("shorter", "")


def test_a_client_file_holds_one_token():
    assert parse_client_token(f"# the hub's token\n{READER}\n".encode()) == READER
    for content, words in (
        (b"\n", "no token"),
        (f"{READER}\n{READER}\n".encode(), "more than one line"),
        (f"admin {READER}\n".encode(), "holds the token alone"),
    ):
        with pytest.raises(FileProblem) as problem:
            parse_client_token(content)
        assert words in str(problem.value)


def test_the_bearer_scheme():
    assert bearer(f"Bearer {READER}") == READER
    assert bearer(f"bearer  {READER} ") == READER
    assert bearer(f"Basic {READER}") is None
    assert bearer("Bearer ") is None


def test_a_reread_skips_each_bad_line_and_keeps_the_good_ones():
    content = (
        f"admin {ADMIN}\nshort\n{READER[:-2]}\xe9\n".encode() + b"\xff\xfe\n" + f"root {READER}\n{READER}\n".encode()
    )
    tokens = read_token_set(content)
    assert tokens.role(ADMIN) is Role.ADMIN and tokens.role(READER) is Role.READ and len(tokens) == 2
    assert [reason.split(":")[0] for reason in tokens.skipped] == ["line 2", "line 3", "line 4", "line 5"]
    assert all(READER not in reason and ADMIN not in reason for reason in tokens.skipped)
    assert len(read_token_set(b"# nothing left\n\n")) == 0  # (the server then refuses every call)
