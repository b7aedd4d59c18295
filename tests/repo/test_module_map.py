"""The README's module map (its "Development" section) names every module of the daemon,
and only modules that exist: a module added without a line there fails this test."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "sidecar"


def _module_map() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Development\n") :]
    return section[section.index("```\n") + 4 : section.index("\n```", section.index("```\n") + 4)]


def _entries() -> set[str]:
    """The paths the map lists under sidecar/, relative to it ("hub.py", "api/")."""
    lines = _module_map().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("sidecar/"))
    entries = set()
    for line in lines[start + 1 :]:
        if not line.startswith("  "):
            break  # (the next top-level folder)
        match = re.match(r"  (\S+\.py|\S+/)\s", line + " ")
        if match:
            entries.add(match.group(1))
    return entries


def _modules() -> set[str]:
    """Every module of the daemon, relative to sidecar/; generated code as its folder."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("api/"):
            found.add("api/")
        elif path.name != "__init__.py":
            found.add(relative)
    return found


def test_the_module_map_lists_every_module() -> None:
    missing = sorted(_modules() - _entries())
    assert not missing, f"add these modules to the README's module map (Development): {missing}"


def test_the_module_map_lists_only_modules_that_exist() -> None:
    stale = sorted(_entries() - _modules())
    assert not stale, f"the README's module map lists modules that do not exist: {stale}"
