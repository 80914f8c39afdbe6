"""The library prepares the next track while the current one is being separated."""

from __future__ import annotations

import threading

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
