"""The house's layering: core/ is the ground floor, the entry points (personabot/) are on top.

Each part may import only the parts below it; nothing imports the old top-level names (`core`,
`training`, ...) that the installed distribution no longer has.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PARTS = ("core", "training", "workers", "bot", "ui", "api")
# What each folder may import from the project (besides itself).
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "training": {"core"},
    "workers": {"core", "training"},
    "bot": {"core", "workers"},
    "ui": {"core", "training", "workers"},
    "api": {"core", "training", "workers"},
    "personabot": set(PARTS),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def _project_part(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] in PARTS:
        return "old:" + parts[0]
    if parts[0] == "personabot":
        return parts[1] if len(parts) > 1 and parts[1] in PARTS else "personabot"
    return None


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_each_part_imports_only_the_parts_below_it(folder: str) -> None:
    problems = []
    for path in sorted((REPO / folder).rglob("*.py")):
        for line, module in _imports(path):
            part = _project_part(module)
            if part is None or part == folder:
                continue
            if part.startswith("old:"):
                problems.append(f"{path.relative_to(REPO)}:{line}: imports {module}; use personabot.{module}")
            elif part not in ALLOWED[folder]:
                problems.append(f"{path.relative_to(REPO)}:{line}: {folder} must not import {module}")
    assert not problems, "\n".join(problems)


def test_tests_and_benches_use_the_namespace() -> None:
    problems = []
    for folder in ("tests", "bench"):
        for path in sorted((REPO / folder).rglob("*.py")):
            problems += [f"{path.relative_to(REPO)}:{line}: imports {module}"
                         for line, module in _imports(path) if (_project_part(module) or "").startswith("old:")]
    assert not problems, "\n".join(problems)
