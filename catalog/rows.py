"""Turn pipeline records into validated catalog rows (pandas DataFrames), one builder per table.

Builders only flatten records; every rule about what a valid row is lives in catalog.schema.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import pandas as pd

from catalog.errors import CatalogValidationError
from catalog.schema import validate_frame
from tasks.core.records import PublishedStem, Removal, RunRecord, RunSummary, StemQuality, TrackOutcome
from tasks.core.vocabulary import STEPS, Step
from tasks.io.locations import display_text, raw_bytes_hex


def utc(value: datetime, where: str) -> pd.Timestamp:
    """A naive datetime is ambiguous (local time? UTC?) across hosts, so it is refused, not guessed."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise CatalogValidationError(f"{where}: naive datetime {value.isoformat()}; give a timezone-aware one")
    return pd.Timestamp(value).tz_convert("UTC")


def json_text(value: Any, where: str) -> str:
    try:
        return json.dumps(_displayable(value), sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise CatalogValidationError(f"{where}: not JSON-serialisable ({exc})") from exc


def _displayable(value: Any) -> Any:
    """`value` with every string made valid UTF-8 (`display_text`): file names that are not UTF-8 reach
    here as surrogate escapes, which neither DuckDB nor JSON can store."""
    if isinstance(value, str):
        return display_text(value)
    if isinstance(value, dict):
        return {_displayable(k): _displayable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_displayable(v) for v in value]
    return value


def _frame(table: str, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The validated frame of `rows`, every text value made storable first."""
    return validate_frame(table, pd.DataFrame([{k: _displayable(v) for k, v in row.items()} for row in rows]))


def run_frame(run: RunRecord, rebuilt_from: str | None = None) -> pd.DataFrame:
    """The validated `runs` row of a run that has just started (or is being rebuilt from `rebuilt_from`)."""
    # mode="json" turns dates, paths and the like inside parameters into JSON-able values.
    parameters = run.model_dump(mode="json", include={"parameters"})["parameters"]
    row = {
        "run_id": run.run_id,
        "flow_run_id": run.flow_run_id,
        "flow_name": run.flow_name,
        "started_at": utc(run.started_at, "runs.started_at"),
        "finished_at": None,
        "status": "running",
        "parameters": json_text(parameters, "runs.parameters"),
        "sources": json_text(list(run.sources), "runs.sources"),
        "out": run.out,
        "model_name": run.model_name,
        "model_signature": run.model_signature,
        "device": run.device,
        "code_version": run.code_version,
        "hostname": run.hostname,
        "tracks_total": None,
        "tracks_succeeded": None,
        "tracks_failed": None,
        "tracks_skipped": None,
        "audio_seconds": None,
        "rebuilt_from": rebuilt_from,
        "pid": run.pid,
        "parent_run_id": run.parent_run_id,
        "shard": run.shard,
    }
    return _frame("runs", [row])


def finished_run_frame(current: pd.DataFrame, summary: RunSummary) -> pd.DataFrame:
    """The validated `runs` row once `summary` is applied to the stored row `current`."""
    row = current.iloc[0].to_dict()
    row.update(
        finished_at=utc(summary.finished_at, "runs.finished_at"),
        status=summary.status,
        tracks_total=summary.tracks_total,
        tracks_succeeded=summary.tracks_succeeded,
        tracks_failed=summary.tracks_failed,
        tracks_skipped=summary.tracks_skipped,
        audio_seconds=summary.audio_seconds,
    )
    return _frame("runs", [row])


def _step_columns(step_seconds: dict[Step, float]) -> dict[str, float | None]:
    return {f"{step}_s": step_seconds.get(step) for step in STEPS}


def track_frame(run_id: str, track_id: str, outcome: TrackOutcome) -> pd.DataFrame:
    """The validated `tracks` row for one outcome."""
    info, quality, published = outcome.info, outcome.quality, outcome.published
    origin = dict(outcome.origin)
    raw = raw_bytes_hex(outcome.source)
    if raw is not None:  # a name that is not UTF-8: `source` shows it escaped, `origin` keeps its bytes
        origin.setdefault("path_bytes_hex", raw)
    row = {
        "run_id": run_id,
        "track_id": track_id,
        "source": outcome.source,
        "content_sha256": outcome.content_sha256,
        "job_key": outcome.job_key,
        "status": outcome.status,
        "error": outcome.error,
        "error_step": outcome.error_step,
        "started_at": utc(outcome.started_at, "tracks.started_at"),
        "finished_at": utc(outcome.finished_at, "tracks.finished_at"),
        **_step_columns(outcome.step_seconds),
        "audio_seconds": outcome.audio_seconds,
        "container": info.container if info else None,
        "codec": info.codec if info else None,
        "sample_rate": info.sample_rate if info else None,
        "channels": info.channels if info else None,
        "is_stem_file": info.is_stem_file if info else None,
        "origin": json_text(origin, "tracks.origin"),
        "residual_db": quality.residual_db if quality else None,
        "manifest_uri": published.manifest_uri if published else None,
        "track_uri": published.track_uri if published else None,
        "flow_run_id": outcome.flow_run_id,
        "hostname": outcome.hostname,
        "worker": outcome.worker,
        "shard": outcome.shard,
        "skip_reason": outcome.skip_reason,
    }
    return _frame("tracks", [row])


def _stem_row(
    run_id: str, track_id: str, outcome: TrackOutcome, stem: PublishedStem, quality: StemQuality | None
) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "track_id": track_id,
        "content_sha256": outcome.content_sha256,
        "job_key": outcome.job_key,
        "stem": stem.stem,
        "uri": stem.uri,
        "sha256": stem.sha256,
        "seconds": stem.seconds,
        "bytes": stem.bytes,
        "format": stem.format,
        "peak_dbfs": quality.peak_dbfs if quality else None,
        "rms_dbfs": quality.rms_dbfs if quality else None,
        "silence_ratio": quality.silence_ratio if quality else None,
        "clipped_ratio": quality.clipped_ratio if quality else None,
        "energy_share_db": quality.energy_share_db if quality else None,
    }


def stem_frame(run_id: str, track_id: str, outcome: TrackOutcome) -> pd.DataFrame | None:
    """The validated `stems` rows of one outcome, or None when it published nothing."""
    if outcome.published is None or not outcome.published.stems:
        return None
    by_name = {q.stem: q for q in outcome.quality.stems} if outcome.quality else {}
    rows = [_stem_row(run_id, track_id, outcome, stem, by_name.get(stem.stem)) for stem in outcome.published.stems]
    return _frame("stems", rows)


def removal_frame(removal: Removal) -> pd.DataFrame:
    """The validated `removals` row of one removed output."""
    row = removal.model_dump() | {"removed_at": utc(removal.removed_at, "removals.removed_at")}
    return _frame("removals", [row])
