"""The first minutes, through the real console script: a DSN that cannot parse
exits 2 at once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(sys.executable).with_name("cache-sidecar")
EXE = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "sidecar"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "CACHE_SIDECAR_"))}
    env.update(extra)
    return env


def test_a_dsn_that_cannot_parse_exits_2_at_once():
    started = time.monotonic()
    out = subprocess.run(
        [*EXE, "serve", "--dsn", "postgres//app:hunter2@db", "--table", "x"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert time.monotonic() - started < 30
    assert "config database.dsn" in out.stderr and "postgresql://" in out.stderr
    assert "hunter2" not in out.stderr and "retrying" not in out.stderr
    unknown = subprocess.run(
        [*EXE, "serve", "--dsn", "host=db dbnme=shop", "--table", "x"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert unknown.returncode == 2 and "did you mean dbname?" in unknown.stderr
