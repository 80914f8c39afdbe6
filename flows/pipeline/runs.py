"""A run as the catalog and the caller see it: its record when it starts, its summary when it ends."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from pydantic import Field

from catalog.backend import catalog_location, open_catalog, shown_location
from flows.pipeline.track import TrackPipeline, flow_run_id, now
from flows.pipeline.workarea import close_run_area, default_work_root, open_run_area
from tasks.core.records import Record, RecordedTrack, RunContext, RunRecord, RunSummary, TrackOutcome
from tasks.core.settings import Limits, OutputSettings, SeparationSettings, ShardAssignment
from tasks.core.version import code_version
from tasks.core.vocabulary import FinishedRunStatus, Stage, TrackStatus
from tasks.engine.models import load_model
from tasks.io.locations import normalise, redact
from tasks.io.sources import shown_sources


def run_record(
    context: RunContext,
    *,
    flow_name: str,
    sources: list[str],
    model_signature: str | None,
    device: str | None,
    shard: ShardAssignment | None = None,
) -> RunRecord:
    output = context.output
    return RunRecord(
        run_id=context.run_id,
        flow_run_id=flow_run_id(),
        flow_name=flow_name,
        started_at=now(),
        parameters={
            "separation": context.separation.model_dump(),
            "output": output.model_dump() | {"out": redact(output.out)},
            "limits": context.limits.model_dump(),
        },
        sources=shown_sources(sources),
        out=redact(normalise(output.out)),
        model_name=context.separation.model,
        model_signature=model_signature,
        device=device,
        code_version=code_version(),
        hostname=socket.gethostname(),
        pid=os.getpid(),
        parent_run_id=shard.parent_run_id if shard else None,
        shard=shard.index if shard else None,
    )


@dataclass(frozen=True)
class StartedRun:
    """A run recorded as running: its record, and the pipeline its tracks go through."""

    record: RunRecord
    pipeline: TrackPipeline
    catalog_path: str

    def close(self) -> None:
        """Release the run's claims and remove its work folder: call once its tracks are over, however
        the run ends (a process that dies instead leaves them to lapse, or to `stemworks clean`)."""
        context = self.pipeline.context
        self.pipeline.claims.close()
        close_run_area(context.work_root, context.run_id)

    def stopped(self, exc: BaseException) -> None:
        """Close the run's catalog row when its flow stops before finishing it (`stopped_status`), with the
        counts of the tracks it recorded. Never raises: the exception that stopped the run is the one to report."""
        status = stopped_status(exc)
        try:
            self.pipeline.catalog.close_unfinished_run(self.record.run_id, now(), status)
        except Exception as error:  # noqa: BLE001 - e.g. the catalog itself is what failed
            logging.getLogger(__name__).warning(
                "run %s stopped (%s) and could not be closed as %s: %s", self.record.run_id, exc, status, error
            )


def stopped_status(exc: BaseException) -> FinishedRunStatus:
    """How a run that `exc` stopped ended: `cancelled` on Ctrl-C or when its Prefect flow run is being
    cancelled (the worker's SIGTERM arrives as a TerminationSignal), `crashed` on another termination, `failed`
    on an error."""
    if isinstance(exc, KeyboardInterrupt) or _flow_run_cancelled():
        return "cancelled"
    return "failed" if isinstance(exc, Exception) else "crashed"


def _flow_run_cancelled() -> bool:
    run_id = flow_run_id()
    if run_id is None:
        return False
    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(UUID(run_id)).state
    except Exception:  # noqa: BLE001 - the API is unreachable: nothing says it was a cancellation
        return False
    return state is not None and (state.is_cancelling() or state.is_cancelled())


def start_run(
    flow_name: str,
    sources: list[str],
    separation: SeparationSettings,
    output: OutputSettings,
    limits: Limits,
    catalog: str | None,
    work_root: str | None,
    catalog_data_path: str | None = None,
    shard: ShardAssignment | None = None,
) -> StartedRun:
    """Load the model (a bad model or device fails the run before any file is written), open the
    catalog (`$STEMWORKS_CATALOG` or ./stemworks.duckdb when unset; a 'ducklake:...' location with its data
    path from `catalog_data_path` or `$STEMWORKS_CATALOG_DATA_PATH`) and record the run as running."""
    _, model, device = load_model(separation)
    catalog_path = catalog_location(catalog)
    store = open_catalog(catalog_path, catalog_data_path)
    context = RunContext(
        run_id=uuid.uuid4().hex,
        separation=separation,
        output=output,
        limits=limits,
        work_root=work_root or default_work_root(),
    )
    record = run_record(
        context, flow_name=flow_name, sources=sources, model_signature=model.signature, device=device, shard=shard
    )
    store.start_run(record)
    open_run_area(context.work_root, context.run_id)
    pipeline = TrackPipeline(context, store, shard=shard.index if shard else None)
    return StartedRun(record, pipeline, shown_location(catalog_path))


def run_status(outcomes: Sequence[TrackOutcome | TrackResult]) -> FinishedRunStatus:
    """A run is `completed` when every track succeeded or was skipped, `failed` as soon as one track failed.

    The same rule gives the CLI's exit status (1) and the Prefect state of the flow run (a FAILED-type
    state named `TracksFailed`); `runs.tracks_failed` says how many.
    """
    return "failed" if any(outcome.status == "failed" for outcome in outcomes) else "completed"


def run_summary(run_id: str, outcomes: Sequence[TrackOutcome | TrackResult]) -> RunSummary:
    def count(wanted: TrackStatus) -> int:
        return sum(1 for outcome in outcomes if outcome.status == wanted)

    return RunSummary(
        run_id=run_id,
        finished_at=now(),
        status=run_status(outcomes),
        tracks_total=len(outcomes),
        tracks_succeeded=count("succeeded"),
        tracks_failed=count("failed"),
        tracks_skipped=count("skipped"),
        audio_seconds=sum(o.audio_seconds or 0.0 for o in outcomes if o.status == "succeeded"),
    )


class TrackResult(Record):
    """One track in a library run's result: what the CLI prints and the run's table artifact lists."""

    source: str
    status: TrackStatus
    error: str | None = None
    error_step: Stage | None = None
    manifest_uri: str | None = None
    audio_seconds: float | None = None
    stems: list[str] = Field(default_factory=list)
    # Set in a fanned-out run: the shard and the worker (STEMWORKS_WORKER, else the host) that handled the track.
    shard: int | None = None
    worker: str | None = None

    @classmethod
    def of(cls, outcome: TrackOutcome) -> TrackResult:
        published = outcome.published
        return cls(
            source=outcome.source,
            status=outcome.status,
            error=outcome.error,
            error_step=outcome.error_step,
            audio_seconds=outcome.audio_seconds,
            manifest_uri=published.manifest_uri if published else None,
            stems=[s.stem for s in published.stems] if published else [],
            shard=outcome.shard,
            worker=(outcome.worker or outcome.hostname) if outcome.shard is not None else None,
        )

    @classmethod
    def recorded(cls, row: RecordedTrack) -> TrackResult:
        """A track as a shard run recorded it in the catalog."""
        return cls(
            source=row.source,
            status=row.status,
            error=row.error,
            error_step=row.error_step,
            audio_seconds=row.audio_seconds,
            manifest_uri=row.manifest_uri,
            stems=row.stems,
            shard=row.shard,
            worker=row.worker or row.hostname,
        )


class LibrarySummary(Record):
    """What `separate-library` returns: the run, where things went, and every track's result."""

    run_id: str
    flow_run_id: str | None
    catalog: str
    out: str
    tracks: list[TrackResult] = Field(default_factory=list)

    def count(self, status: TrackStatus) -> int:
        return sum(1 for t in self.tracks if t.status == status)

    def counts_text(self) -> str:
        return f"{self.count('succeeded')} succeeded, {self.count('skipped')} skipped, {self.count('failed')} failed"


# The Prefect state a run with failed tracks ends in (type FAILED; event `prefect.flow-run.TracksFailed`).
TRACKS_FAILED_STATE = "TracksFailed"


class TracksFailed(Exception):
    """What a `separate-library` run whose tracks failed ends with (its Prefect state is `TracksFailed`).

    Calling the flow from Python raises it; `.summary` holds every track's result, as a clean run returns.
    """

    def __init__(self, summary: LibrarySummary) -> None:
        super().__init__(
            f"{summary.count('failed')} of {len(summary.tracks)} tracks failed "
            f"({summary.counts_text()}); each track's reason is in the run's table artifact "
            f"and in the catalog's failures view"
        )
        self.summary = summary

    def __reduce__(self) -> tuple[Any, ...]:
        return (TracksFailed, (self.summary,))
