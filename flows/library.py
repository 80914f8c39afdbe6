"""Flow `separate-library`: expand sources into tracks, separate each, carry on past failures."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any, cast

from prefect import flow, get_run_logger
from prefect.states import Failed, State
from pydantic import Field

from flows.artifacts import RunProgress, publish_table
from flows.pipeline.fanout import ShardDispatcher, plan_fan_out, shared_parameters
from flows.pipeline.overlap import overlapped
from flows.pipeline.runs import (
    TRACKS_FAILED_STATE,
    LibrarySummary,
    TrackResult,
    TracksFailed,
    run_summary,
    start_run,
)
from flows.pipeline.track import Separated, TrackPipeline, now
from tasks.core.progress import reporter
from tasks.core.records import TrackOutcome
from tasks.core.settings import FanOut, Limits, OutputSettings, SeparationSettings, ShardAssignment
from tasks.io.locations import has_secret, normalise, redact
from tasks.io.sources import expand_sources

# Validated before any work starts: a deployment run with no sources is rejected by the server.
Sources = Annotated[list[str], Field(min_length=1)]


def _unexpandable(source: str, reason: str) -> TrackOutcome:
    return TrackOutcome(
        source=source, status="failed", error=reason, error_step="expand", started_at=now(), finished_at=now()
    )


def _conclude(pipeline: TrackPipeline, progress: RunProgress, separated: Separated | TrackOutcome) -> TrackOutcome:
    """Publish (unless the track already ended) and record one track; never raises."""
    logger = get_run_logger()
    label = separated.source if isinstance(separated, TrackOutcome) else separated.log.label
    try:
        outcome = pipeline.record(pipeline.finish(separated))
        if outcome.status == "failed":
            logger.warning("%s failed at %s: %s", outcome.source, outcome.error_step, outcome.error)
    except Exception as exc:  # noqa: BLE001 - e.g. the catalog write itself failed; keep going
        outcome = TrackOutcome(
            source=label,
            status="failed",
            error=f"{type(exc).__name__}: {exc}",
            error_step="catalog",
            started_at=now(),
            finished_at=now(),
        )
        logger.error("%s could not be processed or recorded: %s", outcome.source, outcome.error)
    progress.track_done()
    return outcome


# The docstring's Args are the field descriptions in the Prefect UI's run form.
@flow(name="separate-library", persist_result=False)
def separate_library(
    sources: Sources,
    separation: SeparationSettings = SeparationSettings(),
    output: OutputSettings = OutputSettings(),
    limits: Limits = Limits(),
    catalog: str | None = None,
    work_root: str | None = None,
    catalog_data_path: str | None = None,
    fanout: FanOut = FanOut(),
    shard: ShardAssignment | None = None,
) -> LibrarySummary | State[Any]:
    """Separate every track found in `sources` (files, folders, globs, URLs) and record the run.

    A run where any track failed ends in the FAILED-type state `TracksFailed` (message: the counts);
    called from Python it then raises `TracksFailed`, whose `.summary` is what a clean run returns.

    Args:
        sources: Files, folders (scanned recursively), globs or URLs (http(s), s3://, yt-dlp pages) to
            separate; '@PATH' reads sources from a file, one per line (keeps URL credentials out of the run's
            parameters). Tracks already published with the same model and settings are skipped.
        separation: Model, device and Demucs settings.
        output: Where (local folder or s3://bucket/prefix) and in which format stems are written.
        limits: What a source must satisfy to be separated; others fail alone, with the reason.
        catalog: DuckDB catalog file recording runs, tracks and stems, or a DuckLake every worker shares
            ('ducklake:postgres:dbname=... host=... port=... user=...'); unset uses $STEMWORKS_CATALOG or
            ./stemworks.duckdb on the worker.
        work_root: Scratch folder for decoded audio and raw stems; unset uses $STEMWORKS_WORK_DIR or the
            system temp folder.
        catalog_data_path: Folder or s3:// prefix for a DuckLake catalog's data files (needed to create
            one); unset uses $STEMWORKS_CATALOG_DATA_PATH. Not used by a DuckDB file catalog.
        fanout: How a run started from a deployment splits a large library into shards, each a flow run that
            any worker of the pool may take; smaller libraries and CLI runs are separated in one process.
        shard: Set by a fanned-out run on the shard runs it starts; leave unset.
    """
    logger = get_run_logger()
    started = start_run(
        "separate-library", sources, separation, output, limits, catalog, work_root, catalog_data_path, shard=shard
    )
    pipeline, record = started.pipeline, started.record
    context, store = pipeline.context, pipeline.catalog
    if any(has_secret(source) for source in sources):
        logger.warning(
            "sources carry credentials, which Prefect stores with this run's parameters; pass them in a "
            "source list file instead (a source '@PATH', one source per line), as `stemworks separate` does"
        )
    try:
        expanded = expand_sources(sources, limits.max_playlist_entries)
        logger.info("run %s: %d tracks from %d sources", context.run_id, len(expanded.tracks), len(sources))
        total = len(expanded.tracks) + len(expanded.problems)
        reporter().planned(total)
        progress = RunProgress(total)
        conclude = partial(_conclude, pipeline, progress)
        outcomes = [conclude(_unexpandable(source, reason)) for source, reason in expanded.problems]
        results = [TrackResult.of(o) for o in outcomes]
        plan = plan_fan_out(expanded.tracks, fanout, shard)
        if plan is not None:  # shard runs on the pool's workers separate the tracks (flows/pipeline/fanout.py)
            shared = shared_parameters(separation, output, limits, fanout, catalog, work_root, catalog_data_path)
            results += ShardDispatcher(started, plan, fanout, shared, progress.tracks_done).run()
        else:
            # Three tracks in flight: the next is fetched and decoded (leaving the catalog alone), this one
            # separates, the previous one is scored, published and recorded.
            tracks = overlapped(
                expanded.tracks,
                prepare=partial(pipeline.prepare, ask_catalog=False),
                work=pipeline.separate,
                finish=conclude,
            )
            results += [TrackResult.of(o) for o in tracks]
        store.finish_run(run_summary(context.run_id, results))
    except BaseException as exc:  # cancelled, interrupted or failed: the row must not stay `running`
        started.stopped(exc)
        raise
    finally:
        started.close()
    summary = LibrarySummary(
        run_id=context.run_id,
        flow_run_id=record.flow_run_id,
        catalog=started.catalog_path,
        out=redact(normalise(output.out)),
        tracks=results,
    )
    publish_table(summary)
    logger.info(
        "run %s: %d succeeded, %d skipped, %d failed",
        context.run_id,
        summary.count("succeeded"),
        summary.count("skipped"),
        summary.count("failed"),
    )
    if summary.count("failed"):
        failed = TracksFailed(summary)
        return Failed(name=TRACKS_FAILED_STATE, message=str(failed), data=failed)
    return summary


def library_summary(state: State[Any]) -> LibrarySummary:
    """The summary of a finished `separate-library` run, clean or with failed tracks.

    For callers holding the run's state (`separate_library(..., return_state=True)`); an error that
    ended the run before its tracks (e.g. a model that cannot be loaded) is raised.
    """
    result = state.result(raise_on_failure=False)
    if isinstance(result, TracksFailed):
        return result.summary
    if isinstance(result, BaseException):
        raise result
    return cast(LibrarySummary, result)
