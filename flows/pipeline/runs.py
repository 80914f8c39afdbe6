"""A run as the catalog and the caller see it: its record when it starts, its summary when it ends."""

from __future__ import annotations

import socket
from collections.abc import Sequence

from pydantic import Field

from flows.pipeline.track import flow_run_id, now
from tasks.core.records import Record, RunContext, RunRecord, RunSummary, TrackOutcome
from tasks.core.version import code_version
from tasks.core.vocabulary import FinishedRunStatus, Stage, TrackStatus
from tasks.io.locations import normalise, redact


def run_record(
    context: RunContext, *, flow_name: str, sources: list[str], model_signature: str | None, device: str | None
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
        sources=[redact(s) for s in sources],
        out=redact(normalise(output.out)),
        model_name=context.separation.model,
        model_signature=model_signature,
        device=device,
        code_version=code_version(),
        hostname=socket.gethostname(),
    )


def run_summary(run_id: str, outcomes: Sequence[TrackOutcome], status: FinishedRunStatus) -> RunSummary:
    def count(wanted: TrackStatus) -> int:
        return sum(1 for outcome in outcomes if outcome.status == wanted)

    return RunSummary(
        run_id=run_id,
        finished_at=now(),
        status=status,
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
