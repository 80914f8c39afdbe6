"""The library prepares the next track and finishes the previous one while the current one separates."""

from __future__ import annotations

import threading

import pytest

from flows.pipeline.overlap import overlapped


def test_next_item_is_prepared_and_previous_finished_while_the_current_one_is_worked_on() -> None:
    prepared = {name: threading.Event() for name in "abc"}
    finished = {name: threading.Event() for name in "abc"}

    def prepare(item: str) -> str:
        prepared[item].set()
        return item

    def work(item: str) -> str:
        following = chr(ord(item) + 1)
        if following in prepared:  # the caller is still "separating" `item`
            assert prepared[following].wait(timeout=30), f"{following} was not prepared ahead"
        previous = chr(ord(item) - 1)
        if previous in finished:
            assert finished[previous].wait(timeout=30), f"{previous} was not finished meanwhile"
        return item.upper()

    def finish(item: str) -> str:
        finished[item.lower()].set()
        return f"{item} done"

    assert overlapped(list("abc"), prepare, work, finish) == ["A done", "B done", "C done"]


def test_finishes_run_one_at_a_time_in_order() -> None:
    running, order = threading.Lock(), []

    def finish(item: int) -> int:
        assert running.acquire(blocking=False), "two finishes at once"
        try:
            order.append(item)
            return item
        finally:
            running.release()

    assert overlapped(list(range(8)), lambda i: i, lambda i: i, finish) == list(range(8))
    assert order == list(range(8))


def test_no_items_no_work() -> None:
    assert overlapped([], str.upper, str.upper, str.upper) == []


def test_an_error_that_escapes_a_stage_surfaces_to_the_caller() -> None:
    def finish(item: str) -> str:
        raise RuntimeError(f"boom {item}")

    with pytest.raises(RuntimeError, match="boom a"):
        overlapped(["a", "b"], str, str, finish)
