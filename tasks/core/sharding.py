"""Splitting a library's tracks into shards of about equal work: by count, balanced by a weight per track
(audio duration where known; file size is the usual proxy)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def shard_count(tracks: int, target: int) -> int:
    """How many shards `tracks` tracks make at `target` tracks a shard (0 for none)."""
    return math.ceil(tracks / max(1, target)) if tracks else 0


def plan_shards(weights: Sequence[float | None], target: int) -> list[list[int]]:
    """Indices of the tracks in each shard, each shard's indices in ascending (library) order.

    `weights[i]` is track i's expected cost (None or <= 0: unknown, counted as the median known weight).
    There are `ceil(n / target)` shards; no shard holds more than `ceil(n / shards)` tracks, and within that
    the heaviest tracks are placed first, each on the lightest shard so far (longest-processing-time first),
    so one shard of long DJ mixes does not hold up a run whose other shards are done.
    """
    count = shard_count(len(weights), target)
    if count == 0:
        return []
    known = [w for w in weights if w is not None and w > 0]
    fallback = statistics.median(known) if known else 1.0
    cost = [w if w is not None and w > 0 else fallback for w in weights]
    cap = math.ceil(len(weights) / count)
    loads = [0.0] * count
    members: list[list[int]] = [[] for _ in range(count)]
    for index in sorted(range(len(cost)), key=lambda i: (-cost[i], i)):
        shard = min((s for s in range(count) if len(members[s]) < cap), key=lambda s: (loads[s], s))
        members[shard].append(index)
        loads[shard] += cost[index]
    return [sorted(m) for m in members]
