"""Flow `separate-library`: expand sources into tracks, separate each, carry on past failures."""

from __future__ import annotations

import uuid
from functools import partial
from typing import Annotated, Literal

from prefect import flow, get_run_logger
from pydantic import Field

from catalog import Catalog, default_catalog_path
from flows.artifacts import RunProgress, publish_table
from flows.finisher import Finisher
from flows.prefetch import prefetched
from flows.track import (SeparatedTrack, now, prepare_track, publish_separated, record_outcome, run_record,
                         separate_prepared)
from flows.workarea import default_work_root
from tasks.errors import SourceError
from tasks.progress import reporter
from tasks.records import Record, RunSummary, TrackOutcome
from tasks.separate import load_model
from tasks.settings import Limits, OutputSettings, SeparationSettings
from tasks.storage import expand_sources, normalise, redact


class TrackResult(Record):
    source: str
    status: Literal["succeeded", "failed", "skipped"]
    error: str | None = None
    error_step: str | None = None
    manifest_uri: str | None = None
    audio_seconds: float | None = None
    stems: list[str] = Field(default_factory=list)


class LibrarySummary(Record):
    run_id: str
    flow_run_id: str | None
    catalog: str
    out: str
    tracks: list[TrackResult] = Field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for t in self.tracks if t.status == status)


def _result(outcome: TrackOutcome) -> TrackResult:
    return TrackResult(source=outcome.source, status=outcome.status, error=outcome.error,
                       error_step=outcome.error_step, audio_seconds=outcome.audio_seconds,
                       manifest_uri=outcome.published.manifest_uri if outcome.published else None,
                       stems=[s.stem for s in outcome.published.stems] if outcome.published else [])


def _unrecorded_failure(source: str, exc: Exception) -> TrackOutcome:
    return TrackOutcome(source=source, status="failed", error=f"{type(exc).__name__}: {exc}",
                        error_step=getattr(exc, "step", "record"), started_at=now(), finished_at=now())


def _unexpandable(source: str, reason: str, started) -> TrackOutcome:
    return TrackOutcome(source=source, status="failed", error=reason, error_step=SourceError.step,
                        started_at=started, finished_at=now())


def _conclude(source: str, separated: SeparatedTrack | TrackOutcome, *, run_id: str,
              separation: SeparationSettings, output: OutputSettings, catalog: Catalog,
              progress: RunProgress) -> TrackOutcome:
    """Publish (unless the track already ended) and record one track; never raises."""
    logger = get_run_logger()
    try:
        outcome = separated if isinstance(separated, TrackOutcome) else publish_separated(
            separated, run_id=run_id, separation=separation, output=output)
        outcome = record_outcome(outcome, run_id=run_id, catalog=catalog)
        if outcome.status == "failed":
            logger.warning("%s failed at %s: %s", outcome.source, outcome.error_step, outcome.error)
    except Exception as exc:  # noqa: BLE001 - e.g. the catalog write itself failed; keep going
        outcome = _unrecorded_failure(redact(source), exc)
        logger.error("%s could not be processed or recorded: %s", outcome.source, outcome.error)
    progress.track_done()
    return outcome


# Validated before any work starts: a deployment run with no sources is rejected by the server.
Sources = Annotated[list[str], Field(min_length=1)]


# The docstring's Args are the field descriptions in the Prefect UI's run form.
@flow(name="separate-library", persist_result=False)
def separate_library(sources: Sources, separation: SeparationSettings = SeparationSettings(),
                     output: OutputSettings = OutputSettings(), limits: Limits = Limits(),
                     catalog: str | None = None, work_root: str | None = None) -> LibrarySummary:
    """Separate every track found in `sources` (files, folders, globs, URLs) and record the run.

    Args:
        sources: Files, folders (scanned recursively), globs or URLs (http(s), s3://, yt-dlp pages) to
            separate. Tracks already published with the same model and settings are skipped.
        separation: Model, device and Demucs settings.
        output: Where (local folder or s3://bucket/prefix) and in which format stems are written.
        limits: What a source must satisfy to be separated; others fail alone, with the reason.
        catalog: DuckDB catalog file recording runs, tracks and stems; unset uses $STEMWORKS_CATALOG or
            ./stemworks.duckdb on the worker.
        work_root: Scratch folder for decoded audio and raw stems; unset uses $STEMWORKS_WORK_DIR or the
            system temp folder.
    """
    logger = get_run_logger()
    catalog_path = str(catalog or default_catalog_path())
    store = Catalog(catalog_path)
    run_id = uuid.uuid4().hex
    _, model_info, device = load_model(separation)  # fails the run early on a bad model or device
    record = run_record(run_id=run_id, flow_name="separate-library", sources=sources, separation=separation,
                        output=output, limits=limits, model_signature=model_info.signature, device=device)
    store.start_run(record)
    summary = LibrarySummary(run_id=run_id, flow_run_id=record.flow_run_id, catalog=catalog_path,
                             out=redact(normalise(output.out)))
    expanded = expand_sources(sources, limits.max_playlist_entries)
    logger.info("run %s: %d tracks from %d sources", run_id, len(expanded.tracks), len(sources))
    reporter().planned(len(expanded.tracks) + len(expanded.problems))
    progress = RunProgress(len(expanded.tracks) + len(expanded.problems))
    for source, reason in expanded.problems:
        outcome = _unexpandable(source, reason, now())
        store.record_track(run_id, outcome)
        reporter().track_finished(source, "failed")
        summary.tracks.append(_result(outcome))
        progress.track_done()
    work = work_root or default_work_root()
    # Three tracks in flight: the next is fetched and decoded (no catalog in that thread), this one
    # separates, the previous one is scored, published and recorded.
    prepare = partial(prepare_track, run_id=run_id, separation=separation, output=output, limits=limits,
                      catalog=None, work_root=work)
    conclude = partial(_conclude, run_id=run_id, separation=separation, output=output, catalog=store,
                       progress=progress)
    with Finisher[TrackOutcome]() as finisher:
        for source, prepared in prefetched(expanded.tracks, prepare):
            separated = separate_prepared(prepared, separation=separation, output=output, catalog=store)
            finisher.submit(partial(conclude, source, separated))
    summary.tracks.extend(_result(outcome) for outcome in finisher.results())
    store.finish_run(RunSummary(
        run_id=run_id, finished_at=now(), status="completed", tracks_total=len(summary.tracks),
        tracks_succeeded=summary.count("succeeded"), tracks_failed=summary.count("failed"),
        tracks_skipped=summary.count("skipped"),
        audio_seconds=sum(t.audio_seconds or 0.0 for t in summary.tracks if t.status == "succeeded")))
    publish_table(summary)
    logger.info("run %s: %d succeeded, %d skipped, %d failed", run_id, summary.count("succeeded"),
                summary.count("skipped"), summary.count("failed"))
    return summary
