"""docs/architecture.md stays true to the package: its module map names every module and only modules that
exist; modules and functions stay readable at once; only run/state.py changes a run's state."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

from cloudmask.run.state import RunState

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "cloudmask"
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 450, 80


def package_modules() -> set[str]:
    """Every module of the package as a path relative to it (``run/session.py``), packages' __init__ aside."""
    return {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
            if p.name not in ("__init__.py", "__main__.py")}


def mapped_modules(text: str) -> set[str]:
    """The modules the module map's rows name in their module column."""
    section = text.split("## Module map", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|") for line in section.splitlines() if line.startswith("|")]
    return {m for row in rows[2:] for m in re.findall(r"`([\w/]+\.py)`", row[2])}


def test_the_module_map_names_every_module_and_only_modules_that_exist():
    mapped = mapped_modules((REPO / "docs" / "architecture.md").read_text())
    modules = package_modules()
    assert modules - mapped == set(), "modules missing from docs/architecture.md's module map"
    assert mapped - modules == set(), "docs/architecture.md maps modules that do not exist"


def test_the_map_check_sees_a_missing_and_an_invented_module():
    table = ("## Module map\n\n| stage | module | owns |\n|---|---|---|\n| run | `run/session.py` | x |\n"
             "| | `run/nowhere.py`, `cli/main.py` | y |\n\n## Next\n| a | `run/modes.py` | z |\n")
    assert mapped_modules(table) == {"run/session.py", "run/nowhere.py", "cli/main.py"}


def test_modules_and_functions_are_short_enough_to_read_at_once():
    long_modules, long_functions = [], []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        name = path.relative_to(PACKAGE).as_posix()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}:{node.lineno} {node.name}: {lines} lines")
    assert long_modules == [] and long_functions == []


def state_writes(tree: ast.AST) -> list[int]:
    """Lines that assign to a RunState field through a name ending in ``state`` (``state.x = ...``,
    ``self.state.x += ...``), or mutate one of its list/dict fields in place."""
    fields = {f.name for f in dataclasses.fields(RunState)}
    out = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for t in targets:
            if isinstance(t, ast.Subscript):
                t = t.value
            if isinstance(t, ast.Attribute) and t.attr in fields and ast.unparse(t.value).endswith("state"):
                out.append(node.lineno)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in ("append", "extend", "update", "setdefault", "pop", "clear"):
            owner = node.func.value
            if isinstance(owner, ast.Attribute) and owner.attr in fields and ast.unparse(owner.value).endswith("state"):
                out.append(node.lineno)
    return out


def test_only_the_state_module_changes_a_runs_state():
    writers = {p.relative_to(PACKAGE).as_posix(): lines for p in PACKAGE.rglob("*.py")
               if (lines := state_writes(ast.parse(p.read_text())))}
    assert set(writers) <= {"run/state.py"}, writers


def test_the_state_check_sees_every_kind_of_write():
    code = ("self.state.epochs_done = 3\nstate.fit_s += 1.0\nstate.staging.append(1)\n"
            "run.state.worker_reports[0] = 2\nstate.commit()\nx = state.latest\ncfg.phase = 1\n")
    assert sorted(state_writes(ast.parse(code))) == [1, 2, 3, 4]
