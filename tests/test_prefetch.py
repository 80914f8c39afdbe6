"""The library prepares the next track and finishes the previous one while the current one separates."""

from __future__ import annotations

import threading

import pytest

from flows.finisher import Finisher
from flows.prefetch import prefetched


def test_next_source_is_prepared_while_the_current_one_is_worked_on() -> None:
    started = {name: threading.Event() for name in "abc"}

    def prepare(source: str) -> str:
        started[source].set()
        return source.upper()

    seen = []
    for source, prepared in prefetched(list("abc"), prepare):
        seen.append((source, prepared))
        following = chr(ord(source) + 1)
        if following in started:  # the consumer is still "separating" `source`
            assert started[following].wait(timeout=30), f"{following} was not prepared ahead"
    assert seen == [("a", "A"), ("b", "B"), ("c", "C")]


def test_without_lookahead_sources_are_prepared_in_turn() -> None:
    assert list(prefetched(["x", "y"], str.upper, ahead=0)) == [("x", "X"), ("y", "Y")]


def test_previous_track_is_finished_while_the_next_one_separates() -> None:
    finishing = threading.Event()
    with Finisher[str]() as finisher:
        finisher.submit(lambda: finishing.set() or "a done")
        # the caller goes on to "separate" the next track while `a` is published in the background
        assert finishing.wait(timeout=30)
        finisher.submit(lambda: "b done")
    assert finisher.results() == ["a done", "b done"]


def test_only_one_track_is_finished_at_a_time_and_results_keep_their_order() -> None:
    gate, running, most = threading.Event(), [], []

    def job(name: str, wait: bool) -> str:
        running.append(name)
        most.append(len(running))
        if wait:
            gate.wait(timeout=30)
        running.remove(name)
        return name

    with Finisher[str]() as finisher:
        finisher.submit(lambda: job("slow", True))
        submitted = threading.Event()
        caller = threading.Thread(target=lambda: (finisher.submit(lambda: job("next", False)), submitted.set()))
        caller.start()
        assert not submitted.wait(timeout=0.5), "a second track was queued while the first was still publishing"
        gate.set()
        caller.join(timeout=30)
    assert finisher.results() == ["slow", "next"] and max(most) == 1


def test_a_job_that_raises_surfaces_in_results() -> None:
    with Finisher[str]() as finisher:
        finisher.submit(lambda: 1 / 0)
        finisher.submit(lambda: "after")
    with pytest.raises(ZeroDivisionError):
        finisher.results()
