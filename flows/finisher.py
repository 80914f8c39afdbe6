"""Finish tracks (score, publish, record) in the background while the next one separates."""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Generic, TypeVar

Finished = TypeVar("Finished")


class Finisher(Generic[Finished]):
    """Runs finishing jobs one at a time, in order, in a worker thread.

    `submit` first waits for the job before it, so at most one track is being finished while the
    caller separates the next: work areas on disk stay bounded at two tracks, and the device never
    waits for an encode or an upload. Jobs run in a copy of the caller's context, so the Prefect task
    runs they start belong to the caller's flow run. A job must not raise (it returns an outcome);
    if it does, `results` raises it.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finish")
        self._futures: list[Future[Finished]] = []

    def submit(self, job: Callable[[], Finished]) -> None:
        if self._futures:
            self._futures[-1].exception()  # waits; an error surfaces in `results`, in order
        self._futures.append(self._pool.submit(contextvars.copy_context().run, job))

    def results(self) -> list[Finished]:
        return [future.result() for future in self._futures]

    def __enter__(self) -> Finisher[Finished]:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._pool.shutdown(wait=True)
