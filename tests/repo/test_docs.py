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


def test_every_flag_in_the_settings_table_exists():
    import contextlib
    import io
    import re

    from sidecar.cli import build_parser

    table = [line for line in README.splitlines() if line.startswith("| `")]
    flags = {flag for line in table for flag in re.findall(r"`(--[a-z-]+)", line.split("|")[3])}
    assert "--metrics-listen" in flags and "--health-listen" in flags
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown), contextlib.suppress(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    missing = [flag for flag in sorted(flags) if flag not in shown.getvalue()]
    assert not missing, f"the README lists flags that 'serve' does not take: {missing}"


def test_the_settings_table_says_what_the_declarations_say():
    """Each setting's row: its environment variable, its flag (or none), its default."""
    rows = {line.split("|")[1].strip(): line.split("|")[2:5] for line in README.splitlines() if line.startswith("| `")}
    wrong = []
    for s in SETTINGS:
        env, flag, default = (cell.strip() for cell in rows[f"`{s.key}`"])
        shown = f"`{s.shown_default}`" if s.default not in (None, "", ()) else s.shown_default or "none"
        if not env.startswith(f"`{s.env}`"):
            wrong.append(f"{s.key}: environment {env!r}, declared {s.env}")
        if (flag.split()[0] if flag else None) != (f"`{s.flag}`" if s.flag else None):
            wrong.append(f"{s.key}: flag {flag!r}, declared {s.flag}")
        if default != shown:
            wrong.append(f"{s.key}: default {default!r}, declared {shown}")
    assert not wrong, "README.md's settings table disagrees with sidecar/config/settings.py:\n" + "\n".join(wrong)
