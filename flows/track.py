"""Flow `separate-track`: one source through fetch → validate → decode → separate → score → publish."""

from __future__ import annotations

import uuid
from typing import Any

from prefect import flow

from catalog import Catalog, default_catalog_path
from flows.pipeline.runs import run_record, run_summary
from flows.pipeline.track import TrackPipeline
from flows.pipeline.workarea import default_work_root
from tasks.core.records import RunContext, TrackOutcome
from tasks.core.settings import Limits, OutputSettings, SeparationSettings
from tasks.engine.models import load_model


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
) -> TrackOutcome:
    """Separate one source into stems, publish them with a manifest, and record a run of its own.

    `separate-library` does not call this flow per track (a subflow costs about a second of Prefect
    overhead): it runs the same phases as task runs of its own flow run.
    """
    store = Catalog(catalog or default_catalog_path())
    context = RunContext(
        run_id=uuid.uuid4().hex,
        separation=separation,
        output=output,
        limits=limits,
        work_root=work_root or default_work_root(),
    )
    _, model, device = load_model(separation)
    store.start_run(
        run_record(
            context, flow_name="separate-track", sources=[source], model_signature=model.signature, device=device
        )
    )
    pipeline = TrackPipeline(context, store)
    outcome = pipeline.record(pipeline.process(source))
    store.finish_run(run_summary(context.run_id, [outcome], "failed" if outcome.status == "failed" else "completed"))
    if outcome.status == "failed":
        raise TrackFailed(outcome)
    return outcome
