"""Three tracks in flight: the next is prepared and the previous finished while the current one separates.

The device never waits for a download, a decode, an encode or an upload, and at most three work
areas exist on disk at once.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

Item = TypeVar("Item")
Prepared = TypeVar("Prepared")
Worked = TypeVar("Worked")
Finished = TypeVar("Finished")


def _submit(pool: ThreadPoolExecutor, job: Callable[..., Any], *args: Any) -> Future[Any]:
    # A copy of the caller's context: Prefect task runs started by the job belong to the caller's
    # flow run, and progress goes to the caller's reporter.
    return pool.submit(contextvars.copy_context().run, job, *args)


def overlapped(
    items: Sequence[Item],
    prepare: Callable[[Item], Prepared],
    work: Callable[[Prepared], Worked],
    finish: Callable[[Worked], Finished],
) -> list[Finished]:
    """`finish(work(prepare(item)))` for every item, in order, with the three stages overlapped.

    `prepare` runs one item ahead in a background thread, `work` runs in the caller's thread, and
    `finish` runs one item behind in another background thread, one at a time and in order (the
    next finish is submitted only once the previous one is done). None of the three may raise for
    a bad item (they return an outcome instead); if one does, the error surfaces here.
    """
    with (
        ThreadPoolExecutor(1, thread_name_prefix="prepare") as preparer,
        ThreadPoolExecutor(1, thread_name_prefix="finish") as finisher,
    ):
        ahead: Future[Prepared] | None = _submit(preparer, prepare, items[0]) if items else None
        finishing: list[Future[Finished]] = []
        for index in range(len(items)):
            assert ahead is not None
            prepared = ahead.result()
            ahead = _submit(preparer, prepare, items[index + 1]) if index + 1 < len(items) else None
            worked = work(prepared)
            if finishing:
                finishing[-1].exception()  # waits for the previous finish; its error surfaces below, in order
            finishing.append(_submit(finisher, finish, worked))
        return [future.result() for future in finishing]
