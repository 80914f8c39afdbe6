"""Prepare the next track while the current one separates, so the model never waits on I/O."""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

Prepared = TypeVar("Prepared")


def prefetched(sources: list[str], prepare: Callable[[str], Prepared], ahead: int = 1
               ) -> Iterator[tuple[str, Prepared]]:
    """Yield (source, prepare(source)) in order, with up to `ahead` later sources prepared in the background.

    `prepare` runs in a worker thread in a copy of the caller's context, so Prefect task runs it
    starts belong to the caller's flow run and progress goes to the caller's reporter. It must
    not raise for a bad source (it returns an outcome instead); if it does, the error surfaces here.
    """
    if ahead < 1:
        for source in sources:
            yield source, prepare(source)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        futures: list[Future] = []

        def submit(index: int) -> None:
            if index < len(sources):
                context = contextvars.copy_context()
                futures.append(pool.submit(context.run, prepare, sources[index]))

        for index in range(ahead):
            submit(index)
        for index, source in enumerate(sources):
            prepared = futures[index].result()
            submit(index + ahead)  # starts while the caller works on this one
            yield source, prepared
