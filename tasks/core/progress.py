"""Progress reporting from inside tasks to whoever drives the flow (the CLI's progress bars).

A context variable, not a global: each flow run sees only the reporter its caller installed,
and tasks run in the caller's context. Without one, reports go nowhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol


class ProgressReporter(Protocol):
    def planned(self, tracks: int) -> None: ...
    def track_started(self, source: str) -> None: ...
    def step(self, source: str, step: str) -> None: ...
    def fraction(self, source: str, done: float) -> None: ...
    def track_finished(self, source: str, status: str) -> None: ...


class _Silent:
    def planned(self, tracks: int) -> None: ...
    def track_started(self, source: str) -> None: ...
    def step(self, source: str, step: str) -> None: ...
    def fraction(self, source: str, done: float) -> None: ...
    def track_finished(self, source: str, status: str) -> None: ...


_SILENT = _Silent()  # stateless: one instance serves every context
_reporter: ContextVar[ProgressReporter] = ContextVar("stemworks_progress", default=_SILENT)


def reporter() -> ProgressReporter:
    return _reporter.get()


@contextmanager
def reporting_to(target: ProgressReporter) -> Iterator[None]:
    token = _reporter.set(target)
    try:
        yield
    finally:
        _reporter.reset(token)
