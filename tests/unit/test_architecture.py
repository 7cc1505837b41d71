"""The architecture of docs/architecture.md, checked: no import cycle, no import hidden in a
function to dodge one, light modules stay light, tasks stay thin, settings are read by
entry points only, and config names no provider. (The layer order itself is checked by
`lint-imports` in `make lint`, with the contracts in pyproject.toml.)"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grimp
import pytest

from worker.providers import registered

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("worker", "webhooks", "sandbox")


def _sources() -> Iterator[tuple[str, Path]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            yield module, path


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_module_graph_has_no_cycle() -> None:
    # Every import counts: module level, TYPE_CHECKING blocks and function bodies.
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    modules = {m for m in graph.modules if m.split(".")[0] in PACKAGES}
    edges = {m: graph.find_modules_directly_imported_by(m) & modules for m in modules}
    assert _cycles(edges) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _function_level_imports(path: Path) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []

    def walk(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import) and in_function:
                found.extend((child.lineno, alias.name) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and in_function:
                found.append((child.lineno, child.module or "."))
            walk(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    walk(ast.parse(path.read_text()), False)
    return found


def test_no_function_level_import_of_variflow_outside_the_cli() -> None:
    # The CLI defers heavy imports for start-up speed (it says so); nothing else may
    # import variflow inside a function, which is how import cycles were hidden before.
    hidden = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for module, path in _sources()
        if module != "worker.cli"
        for line, name in _function_level_imports(path)
        if name.split(".")[0] in PACKAGES
    ]
    assert hidden == []


LIGHT = """
import sys
import {module}
heavy = sorted(m for m in ("celery", "flask", "httpx", "kombu") if m in sys.modules)
print(",".join(heavy) or "none")
"""


@pytest.mark.parametrize("module", ["worker.states", "worker.models", "worker.status"])
def test_states_and_models_import_no_celery_flask_or_httpx(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", LIGHT.format(module=module)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == "none"


def test_the_package_exports_the_api_lazily() -> None:
    script = (
        "import sys, worker\n"
        "assert 'worker.api' not in sys.modules\n"
        "from worker import submit_variation, get_job, cancel_job, wait, list_jobs, JobStatus\n"
        "from worker import InvalidInput, JobNotFound, VariflowError\n"
        "assert issubclass(InvalidInput, ValueError) and issubclass(InvalidInput, VariflowError)\n"
        "print(submit_variation.__module__, JobStatus.QUEUED.value)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["worker.api", "queued"]


def test_tasks_are_thin() -> None:
    assert len((ROOT / "worker" / "tasks.py").read_text().splitlines()) < 200


def test_config_names_no_provider() -> None:
    text = (ROOT / "worker" / "config.py").read_text().lower()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    code = re.sub(r'""".*?"""', "", code, flags=re.S)  # docstrings may give an example
    assert [name for name in registered() if name in code] == []


# Where the settings may be read: the entry points, once each.
ENTRY_POINTS = {
    "worker.api",
    "worker.celery_app",
    "worker.cli",
    "worker.config",
    "webhooks",
    "webhooks.wsgi",
    "webhooks.gunicorn_conf",
}


def test_settings_are_read_by_entry_points_only() -> None:
    calls = {
        module: len(re.findall(r"\bget_settings\(\)", path.read_text()))
        for module, path in _sources()
    }
    readers = {module for module, count in calls.items() if count}
    assert readers <= ENTRY_POINTS
    outside_config = sum(n for module, n in calls.items() if module != "worker.config")
    assert outside_config <= 8
