"""The structure ARCHITECTURE.md describes holds: layers, no import cycles, one definition per fact."""

from __future__ import annotations

import os
from pathlib import Path

import grimp
import pytest
from importlinter.cli import lint_imports

from catalog.schema import RunsModel, TracksModel
from catalog.views import THROUGHPUT
from tasks import prefect_tasks
from tasks.core import errors
from tasks.core.vocabulary import RUN_STATUSES, STAGES, STEPS, TRACK_STATUSES

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tasks", "flows", "catalog", "deployments")


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), imports inside functions included."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_module_imports_itself_through_others() -> None:
    graph = grimp.build_graph(*PACKAGES, exclude_type_checking_imports=False, cache_dir=None)
    assert _cycles(graph) == []


def test_the_layer_contracts_in_pyproject_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert lint_imports(no_cache=True, no_logo=True) == 0, "run `lint-imports` to see the broken contract"


def test_prefect_task_names_are_the_step_names() -> None:
    tasks = [getattr(prefect_tasks, step) for step in STEPS]
    assert [task.name for task in tasks] == list(STEPS)


def test_catalog_timing_columns_and_checks_come_from_the_vocabulary() -> None:
    columns = list(TracksModel.to_schema().columns)
    assert [c.removesuffix("_s") for c in columns if c.endswith("_s")] == list(STEPS)
    assert all(f"mean_{step}_s" in THROUGHPUT for step in STEPS)

    def allowed(model: type, column: str) -> set[str]:
        checks = model.to_schema().columns[column].checks
        return {value for check in checks for value in check.statistics.get("allowed_values", ())}

    assert allowed(TracksModel, "error_step") == set(STAGES)
    assert allowed(TracksModel, "status") == set(TRACK_STATUSES)
    assert allowed(RunsModel, "status") == set(RUN_STATUSES)


def test_every_error_names_a_stage_of_the_vocabulary() -> None:
    def subclasses(cls: type) -> list[type]:
        return [cls, *(s for sub in cls.__subclasses__() for s in subclasses(sub))]

    import catalog.errors  # noqa: F401 - registers the catalog's error classes
    import tasks.io.web.policy  # noqa: F401 - and the network policy's

    stages = {cls: cls.step for cls in subclasses(errors.StemworksError)}
    assert set(stages.values()) <= set(STAGES), stages
    assert {
        errors.FetchError.step,
        errors.InvalidAudioError.step,
        errors.DecodeError.step,
        errors.SeparationError.step,
        errors.PublishError.step,
    } <= set(STEPS)


def test_only_prefect_tasks_imports_prefect_inside_tasks() -> None:
    importing = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "tasks").rglob("*.py")
        if "import prefect" in (text := path.read_text()) or "from prefect" in text
    ]
    assert importing == [os.path.join("tasks", "prefect_tasks.py")]
