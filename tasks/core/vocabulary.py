"""The words every layer shares: pipeline steps, track and run statuses. Defined once, here.

Prefect task names, the `<step>_s` timing columns of the catalog, the `step` of every typed error
and the catalog's checks on `error_step` and `status` are all derived from these literals.
"""

from __future__ import annotations

from typing import Literal, get_args

# The steps a track goes through, in order. Each is a Prefect task of the same name and a timing column.
Step = Literal["fetch", "validate", "decode", "separate", "score", "publish"]
# Where else a track or a run can fail: before any track (setup), while listing sources (expand),
# while recording (catalog), or somewhere no step claims (unknown).
Stage = Literal["setup", "expand", Step, "catalog", "unknown"]
TrackStatus = Literal["succeeded", "failed", "skipped"]
# `failed`: some track failed, or the run itself stopped on an error; `cancelled`: stopped by a Prefect
# cancellation or an interrupt (Ctrl-C); `crashed`: its process died without finishing it (closed by
# `stemworks clean`, or by a fanned-out parent for a lost shard run, or on a termination that was no cancel).
FinishedRunStatus = Literal["completed", "failed", "crashed", "cancelled"]
RunStatus = Literal["running", FinishedRunStatus]

STEPS: tuple[Step, ...] = get_args(Step)
STAGES: tuple[Stage, ...] = get_args(Stage)
TRACK_STATUSES: tuple[TrackStatus, ...] = get_args(TrackStatus)
RUN_STATUSES: tuple[RunStatus, ...] = get_args(RunStatus)
