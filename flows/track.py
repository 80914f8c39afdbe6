"""Flow `separate-track`: one source through fetch → validate → decode → separate → score → publish."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.pipeline.runs import run_summary, start_run
from tasks.core.records import TrackOutcome
from tasks.core.settings import Limits, OutputSettings, SeparationSettings


class TrackFailed(Exception):
    """Raised by `separate-track` so Prefect marks the flow run Failed; carries the recorded outcome."""

    def __init__(self, outcome: TrackOutcome) -> None:
        super().__init__(f"{outcome.source}: {outcome.error} (step: {outcome.error_step})")
        self.outcome = outcome

    def __reduce__(self) -> tuple[Any, ...]:
        return (TrackFailed, (self.outcome,))


@flow(name="separate-track", persist_result=False)
def separate_track(
    source: str,
    separation: SeparationSettings = SeparationSettings(),
    output: OutputSettings = OutputSettings(),
    limits: Limits = Limits(),
    catalog: str | None = None,
    work_root: str | None = None,
    catalog_data_path: str | None = None,
) -> TrackOutcome:
    """Separate one source into stems, publish them with a manifest, and record a run of its own.

    `separate-library` does not call this flow per track (a subflow costs about a second of Prefect
    overhead): it runs the same phases as task runs of its own flow run.
    """
    started = start_run("separate-track", [source], separation, output, limits, catalog, work_root, catalog_data_path)
    pipeline = started.pipeline
    try:
        outcome = pipeline.record(pipeline.process(source))
        pipeline.catalog.finish_run(run_summary(pipeline.context.run_id, [outcome]))
    finally:
        started.close()
    if outcome.status == "failed":
        raise TrackFailed(outcome)
    return outcome
