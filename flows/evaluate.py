"""Flow `evaluate`: separate the mixtures of reference sets through the pipeline, score the stems against the
true stems, record the scores and report how this configuration compares with those evaluated before."""

from __future__ import annotations

import shutil
import uuid
from functools import partial
from pathlib import Path
from typing import Annotated, Any, cast

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Failed, State
from pydantic import Field

from catalog import Catalog
from flows.artifacts import RunProgress
from flows.pipeline.overlap import overlapped
from flows.pipeline.runs import run_summary, start_run
from flows.pipeline.track import Separated, TrackPipeline, now
from tasks import prefect_tasks as steps
from tasks.core.errors import ConfigurationError, StemworksError
from tasks.core.evaluation import (
    EVALUATIONS_FILE,
    REPORT_FOLDER,
    DatasetItem,
    EvaluationContext,
    EvaluationRecord,
    ItemEvaluation,
)
from tasks.core.progress import reporter
from tasks.core.records import Record, RunContext, TrackOutcome
from tasks.core.settings import Limits, OutputSettings, SeparationSettings
from tasks.engine.models import load_model, precision_for
from tasks.engine.overlap_add import output_names
from tasks.io.locations import has_scheme, normalise, redact
from tasks.io.manifest import read_manifest
from tasks.io.storage import filesystem
from tasks.steps.evaluate.datasets import ReferencesError, accepted_layouts, discover, precheck_references
from tasks.steps.evaluate.report import comparison_rows, distribution_png, markdown_table
from tasks.steps.evaluate.scoring import EVALUATOR_VERSION

ITEMS_FAILED_STATE = "ItemsFailed"
REPORT_KEY = "evaluation-report"
Datasets = Annotated[list[str], Field(min_length=1)]


class EvaluationSummary(Record):
    """What `evaluate` returns: the run, every item's result, and the comparison with earlier configurations."""

    run_id: str
    flow_run_id: str | None
    catalog: str
    out: str
    config: str
    report: str | None = Field(default=None, description="Folder holding report.md and report.png.")
    stems: list[str] = Field(default_factory=list)
    items: list[ItemEvaluation] = Field(default_factory=list)
    comparison: list[dict[str, Any]] = Field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for item in self.items if item.status == status)


class ItemsFailed(Exception):
    """What an `evaluate` run with failed items ends with; `.summary` is what a clean run returns."""

    def __init__(self, summary: EvaluationSummary) -> None:
        failed = summary.count("failed")
        super().__init__(
            f"{failed} of {len(summary.items)} items failed; each item's reason is in the run's report artifact"
        )
        self.summary = summary

    def __reduce__(self) -> tuple[Any, ...]:
        return (ItemsFailed, (self.summary,))


def config_label(separation: SeparationSettings, output: OutputSettings, signature: str, precision: str) -> str:
    """Model and output-shaping settings, short: what the views and the report compare."""
    parts = [f"{separation.model}@{signature[:8]}", f"shifts={separation.shifts}", f"overlap={separation.overlap:g}"]
    if separation.segment is not None:
        parts.append(f"segment={separation.segment:g}")
    if separation.two_stems is not None:
        parts.append(f"two_stems={separation.two_stems}")
    fmt = output.format + (f"@{output.mp3_bitrate}k" if output.format == "mp3" else str(output.bit_depth))
    return " ".join([*parts, precision, fmt])


def _failed(item: DatasetItem, stage: Any, reason: str, outcome: TrackOutcome | None = None) -> ItemEvaluation:
    return ItemEvaluation(
        item=item.name,
        dataset=item.dataset,
        mixture=redact(item.mixture),
        status="failed",
        error=reason,
        error_stage=stage,
        separation_status=outcome.status if outcome else None,
        content_sha256=outcome.content_sha256 if outcome else None,
        job_key=outcome.job_key if outcome else None,
    )


class Evaluator:
    """Scores and records one item after the pipeline has separated (or skipped) it; never raises."""

    def __init__(self, pipeline: TrackPipeline, context: EvaluationContext, progress: RunProgress) -> None:
        self.pipeline = pipeline
        self.context = context
        self.progress = progress

    def conclude(self, item: DatasetItem, separated: Separated | TrackOutcome) -> tuple[TrackOutcome, ItemEvaluation]:
        """Publish and record the track (unless it already ended), then score it: its outcome and evaluation."""
        try:
            outcome = self.pipeline.record(self.pipeline.finish(separated))
        except Exception as exc:  # noqa: BLE001 - e.g. the catalog write failed; the item fails alone
            reason = f"{type(exc).__name__}: {exc}"
            outcome = TrackOutcome(
                source=redact(item.mixture),
                status="failed",
                error=reason,
                error_step="catalog",
                started_at=now(),
                finished_at=now(),
            )
            result = _failed(item, "catalog", reason)
        else:
            result = self.score(item, outcome)
        self.progress.track_done()
        return outcome, result

    def score(self, item: DatasetItem, outcome: TrackOutcome) -> ItemEvaluation:
        logger = get_run_logger()
        if outcome.status == "skipped" and outcome.published is None:  # claimed by another run, not published yet
            logger.warning("%s: not separated here: %s", item.name, outcome.skip_reason)
            return _failed(item, "separate", f"not separated here ({outcome.skip_reason}); evaluate it again", outcome)
        if outcome.status == "failed" or outcome.published is None:
            logger.warning("%s: separation failed at %s: %s", item.name, outcome.error_step, outcome.error)
            return _failed(item, "separate", f"separation failed at {outcome.error_step}: {outcome.error}", outcome)
        run = self.pipeline.context
        work_dir = Path(run.work_root) / run.run_id / f"evaluate-{uuid.uuid4().hex}"
        try:
            manifest_uri = outcome.published.manifest_uri
            stems = read_manifest(manifest_uri).published(manifest_uri).stems
            scores, seconds, elapsed = steps.evaluate(item, stems, self.context_rate, run.limits, str(work_dir))
        except Exception as exc:  # noqa: BLE001 - a bad item must never stop the dataset
            reason = exc.reason if isinstance(exc, StemworksError) else f"{type(exc).__name__}: {exc}"
            logger.warning("%s could not be evaluated: %s", item.name, reason)
            # references found wrong only now: an object store's, fetched for scoring, or a length on the samples
            stage = "references" if isinstance(exc, ReferencesError) else "evaluate"
            return _failed(item, stage, reason, outcome)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        result = ItemEvaluation(
            item=item.name,
            dataset=item.dataset,
            mixture=redact(item.mixture),
            status="evaluated",
            separation_status=outcome.status,
            content_sha256=outcome.content_sha256,
            job_key=outcome.job_key,
            manifest_uri=outcome.published.manifest_uri,
            sample_rate=self.context_rate,
            seconds=round(seconds, 6),
            evaluate_s=round(elapsed, 6),
            scores=scores,
        )
        try:
            self.pipeline.catalog.record_evaluations(self.context, result)
        except Exception as exc:  # noqa: BLE001
            return _failed(item, "catalog", f"{type(exc).__name__}: {exc}", outcome)
        return result

    @property
    def context_rate(self) -> int:
        return int(self.context.parameters["sample_rate"])


def _references_ok(item: DatasetItem, stems: list[str], limits: Limits) -> ItemEvaluation | None:
    """None when the item's references are all there and match the mixture; else the item's failure."""
    try:
        precheck_references(item, stems, limits)
    except StemworksError as exc:
        return _failed(item, "references", exc.reason)
    return None


def _record_reference_failure(pipeline: TrackPipeline, failure: ItemEvaluation) -> TrackOutcome:
    """A failed `tracks` row for an item never separated, so the catalog's `failures` view lists it too."""
    outcome = TrackOutcome(
        source=failure.mixture,
        status="failed",
        error=f"evaluation references: {failure.error}",
        error_step="validate",
        started_at=now(),
        finished_at=now(),
    )
    return pipeline.record(outcome)


def _report_location(report: str | None, out: str, run_id: str) -> str:
    if report:
        return normalise(report)
    return f"{normalise(out).rstrip('/')}/{REPORT_FOLDER}/{run_id}"


def _write(location: str, name: str, data: bytes) -> str:
    fs, folder = filesystem(location)
    fs.makedirs(folder, exist_ok=True)
    path = f"{folder.rstrip('/')}/{name}"
    fs.pipe_file(path, data)
    return path if has_scheme(location) and not location.startswith("file://") else str(Path(path).resolve())


def _image_link(path: str) -> str:
    return path if has_scheme(path) else Path(path).as_uri()


def write_report(
    summary: EvaluationSummary, store: Catalog, location: str, model_stems: list[str]
) -> tuple[str, list[dict[str, Any]]]:
    """report.png (distributions) and report.md (table, failures) at `location`; returns the markdown and the
    comparison table's rows."""
    hashes = sorted({i.content_sha256 for i in summary.items if i.status == "evaluated" and i.content_sha256})
    frame = store.comparable_evaluations(hashes)
    rows = comparison_rows(frame, model_stems)
    png = distribution_png(frame, model_stems, f"Evaluation {summary.run_id[:12]}: {len(hashes)} items")
    png_path = _write(location, "report.png", png)
    failures = [f"- **{i.item}** ({i.error_stage}): {i.error}" for i in summary.items if i.status == "failed"]
    markdown = "\n\n".join(
        [
            f"# Evaluation {summary.run_id}",
            (
                f"This run: `{summary.config}`; {summary.count('evaluated')} items evaluated, "
                f"{summary.count('failed')} failed. Each configuration's latest scores on these items (dB; BSSEval v4 "
                "medians over 1 s windows as museval 0.4.1; nSDR: whole-track simple SDR; cSDR: its 1 s chunk median)."
            ),
            markdown_table(rows),
            f"![per-stem distributions]({_image_link(png_path)})",
            *(["## Failed items", "\n".join(failures)] if failures else []),
        ]
    )
    _write(location, "report.md", markdown.encode())
    return markdown, rows


@flow(name="evaluate", persist_result=False)
def evaluate(
    datasets: Datasets,
    separation: SeparationSettings = SeparationSettings(),
    output: OutputSettings = OutputSettings(),
    limits: Limits = Limits(),
    catalog: str | None = None,
    work_root: str | None = None,
    report: str | None = None,
    catalog_data_path: str | None = None,
) -> EvaluationSummary | State[Any]:
    """Separate the mixtures of reference sets, score every stem against its true stem, and compare.

    A run where any item failed ends in the FAILED-type state `ItemsFailed`; called from Python it then
    raises `ItemsFailed`, whose `.summary` is what a clean run returns.

    Args:
        datasets: NI stem files (*.stem.mp4), folders holding mixture.wav beside drums.wav, bass.wav, other.wav,
            vocals.wav (MUSDB18-HQ layout, any audio extension), or folders searched recursively for both; local
            paths on the worker or object-store URLs (s3://bucket/prefix).
        separation: Model, device and Demucs settings evaluated. Stems already published with the same model
            and settings are reused, not separated again.
        output: Where (local folder or s3://bucket/prefix) and in which format the stems are published.
        limits: What a mixture or reference must satisfy; others fail alone, with the reason.
        catalog: DuckDB catalog file recording runs, tracks, stems and evaluations; unset uses
            $STEMWORKS_CATALOG or ./stemworks.duckdb on the worker.
        work_root: Scratch folder for decoded audio; unset uses $STEMWORKS_WORK_DIR or the system temp folder.
        report: Folder (or s3:// prefix) for report.md and report.png; unset uses <output>/_evaluations/<run id>.
        catalog_data_path: Folder or s3:// prefix for a DuckLake catalog's data files (needed to create
            one); unset uses $STEMWORKS_CATALOG_DATA_PATH. Not used by a DuckDB file catalog.
    """
    logger = get_run_logger()
    found = discover(datasets)
    if not found.items:
        problems = "; ".join(f"{d}: {why}" for d, why in found.problems)
        raise ConfigurationError(
            f"no recognisable items in {', '.join(datasets)}{f' ({problems})' if problems else ''}; "
            f"accepted layouts: {accepted_layouts()}"
        )
    items = found.items
    started = start_run(
        "evaluate", [i.mixture for i in items], separation, output, limits, catalog, work_root, catalog_data_path
    )
    try:
        pipeline, record = started.pipeline, started.record
        run: RunContext = pipeline.context
        _, model, device = load_model(separation)
        precision = precision_for(separation, device)
        stems = output_names(model.sources, separation.two_stems)
        config = config_label(separation, output, model.signature, precision)
        context = EvaluationContext(
            run_id=run.run_id,
            model_name=separation.model,
            model_signature=model.signature,
            config=config,
            parameters={
                **record.parameters,
                "precision": precision,
                "device": device,
                "sample_rate": model.sample_rate,
            },
            evaluator_version=EVALUATOR_VERSION,
            evaluated_at=now(),
        )
        logger.info("evaluation run %s: %d items, configuration %s", run.run_id, len(items), config)
        reporter().planned(len(items))
        progress = RunProgress(len(items))
        evaluator = Evaluator(pipeline, context, progress)

        results: dict[str, ItemEvaluation] = {}
        outcomes: list[TrackOutcome] = []
        ready: list[DatasetItem] = []
        for item in items:
            failure = _references_ok(item, stems, limits)
            if failure is None:
                ready.append(item)
                continue
            logger.warning("%s: %s", item.name, failure.error)
            results[item.mixture] = failure
            outcomes.append(_record_reference_failure(pipeline, failure))
            progress.track_done()
        by_label = {redact(i.mixture): i for i in ready}

        def conclude(separated: Separated | TrackOutcome) -> tuple[TrackOutcome, ItemEvaluation]:
            label = separated.source if isinstance(separated, TrackOutcome) else separated.log.label
            return evaluator.conclude(by_label[label], separated)

        scored = overlapped(
            [i.mixture for i in ready],
            prepare=partial(pipeline.prepare, ask_catalog=False),
            work=pipeline.separate,
            finish=conclude,
        )
        published = {o.job_key: o.published for o, _ in scored if o.published}
        for item, (outcome, result) in zip(ready, scored, strict=True):
            same_content = published.get(outcome.job_key) if outcome.status == "skipped" else None
            if outcome.published is None and same_content is not None:
                # the same audio as another item of this run, separated once, there: score those stems
                results[item.mixture] = evaluator.score(item, outcome.model_copy(update={"published": same_content}))
            else:
                results[item.mixture] = result
            outcomes.append(outcome)
        ordered = [results[i.mixture] for i in items]
        finished = run_summary(run.run_id, outcomes)
        if any(r.status == "failed" for r in ordered):
            finished = finished.model_copy(update={"status": "failed"})
        pipeline.catalog.finish_run(finished)
    except BaseException as exc:  # cancelled, interrupted or failed: the row must not stay `running`
        started.stopped(exc)
        raise
    finally:
        started.close()
    summary = EvaluationSummary(
        run_id=run.run_id,
        flow_run_id=record.flow_run_id,
        catalog=started.catalog_path,
        out=redact(normalise(output.out)),
        config=config,
        stems=stems,
        items=ordered,
    )
    location = _report_location(report, output.out, run.run_id)
    try:
        saved = EvaluationRecord(run=record, context=context, items=ordered)
        _write(location, EVALUATIONS_FILE, saved.model_dump_json(indent=1).encode())
    except Exception as exc:  # noqa: BLE001 - the scores are recorded; only a rebuild would miss them
        logger.warning("%s not written to %s: %s: %s", EVALUATIONS_FILE, redact(location), type(exc).__name__, exc)
    try:
        markdown, rows = write_report(summary, pipeline.catalog, location, stems)
        summary = summary.model_copy(update={"report": redact(location), "comparison": rows})
        create_markdown_artifact(markdown=markdown, key=REPORT_KEY, description=f"Evaluation {run.run_id}")
    except Exception as exc:  # noqa: BLE001 - the scores are recorded; a report that cannot be written is a warning
        logger.warning("report not written to %s: %s: %s", redact(location), type(exc).__name__, exc)
    logger.info(
        "evaluation run %s: %d evaluated, %d failed", run.run_id, summary.count("evaluated"), summary.count("failed")
    )
    if summary.count("failed"):
        failed = ItemsFailed(summary)
        return Failed(name=ITEMS_FAILED_STATE, message=str(failed), data=failed)
    return summary


def evaluation_summary(state: State[Any]) -> EvaluationSummary:
    """The summary of a finished `evaluate` run, clean or with failed items (errors before any item raise)."""
    result = state.result(raise_on_failure=False)
    if isinstance(result, ItemsFailed):
        return result.summary
    if isinstance(result, BaseException):
        raise result
    return cast(EvaluationSummary, result)
