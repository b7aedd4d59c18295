"""The README documents every setting (the settings table cannot drift silently)."""

from __future__ import annotations

from pathlib import Path

from sidecar.config import SETTINGS, TABLES_ENV

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_in_the_readme():
    missing = [s.key for s in SETTINGS if f"`{s.key}`" not in README or f"`{s.env}`" not in README]
    assert not missing, f"document these settings in README.md: {missing}"
    assert TABLES_ENV in README


def test_readme_commands_are_what_ci_runs():
    ci = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    assert "./dev test" in ci and "./dev test" in README and "./dev run" in README
