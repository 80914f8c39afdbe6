"""Rebuild a lost or corrupted catalog from the `manifest.json` files published under an output location.

Manifests are the source of truth for what is on storage: each complete one becomes a succeeded track
with its stems, grouped into the runs that published them (`runs.rebuilt_from` says where from). The
`evaluations` rows come back from the evaluations files `evaluate` writes beside its reports
(`<out>/_evaluations/<run id>/evaluations.json`), with a run row for an evaluation run that published nothing.
What neither holds (failures, step timings, per-stem quality, Prefect flow-run ids) cannot come back.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from catalog.ducklake import DuckLakeCatalog, is_ducklake
from catalog.errors import CatalogError
from catalog.store import Catalog
from tasks.core.evaluation import EVALUATIONS_FILE, REPORT_FOLDER, EvaluationRecord
from tasks.core.records import RunRecord, RunSummary, TrackOutcome, TrackQuality
from tasks.io.locations import display_text, join, normalise, redact
from tasks.io.manifest import MANIFEST_NAME, STAGING_DIR, Manifest, complete_manifest, read_manifest
from tasks.io.storage import filesystem


@dataclass
class RebuildReport:
    catalog: Path | str  # a file, or a DuckLake location (without its password)
    out: str
    runs: int = 0
    tracks: int = 0
    stems: int = 0
    evaluations: int = 0  # `evaluations` rows, from the evaluations files under `out`
    moved_aside: Path | str | None = None  # the old file, or the DuckLake snapshot that still holds the old rows
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (manifest, why it was not used)


def manifest_uris(out: str) -> list[str]:
    """Every track folder's manifest directly under `out` (staging folders are never complete tracks)."""
    fs, root = filesystem(out)
    found = sorted(p for p in fs.glob(f"{root.rstrip('/')}/*/{MANIFEST_NAME}") if f"/{STAGING_DIR}/" not in p)
    # Addressed like publishing addressed them (join(out, folder, manifest.json)), so URIs match a live catalog's.
    return [join(out, PurePosixPath(p).parent.name, MANIFEST_NAME) for p in found]


def outcome_from_manifest(uri: str, manifest: Manifest) -> TrackOutcome:
    """The succeeded track a manifest describes; timings, failures and per-stem quality are unknown."""
    return TrackOutcome(
        source=manifest.source,
        status="succeeded",
        content_sha256=manifest.content_sha256,
        job_key=manifest.job_key,
        started_at=manifest.created_at,
        finished_at=manifest.created_at,
        audio_seconds=manifest.seconds,
        info=manifest.source_audio,
        origin=manifest.origin,
        quality=TrackQuality(residual_db=manifest.residual_db, stems=[]),
        published=manifest.published(uri),
    )


def _run_record(run_id: str, out: str, manifests: list[Manifest]) -> RunRecord:
    first = manifests[0]
    return RunRecord(
        run_id=run_id,
        flow_run_id=None,
        flow_name="rebuild",
        started_at=min(m.created_at for m in manifests),
        parameters=first.parameters,
        sources=sorted({m.source for m in manifests}),
        out=redact(out),
        model_name=first.model.name,
        model_signature=first.model.signature,
        device=first.device,
        code_version=first.code_version,
        hostname=socket.gethostname(),
        pid=None,  # rebuilt, not run: no process to watch
    )


def _move_aside(path: Path) -> Path | None:
    """Keep a damaged or stale catalog (and its WAL) next to the new one rather than deleting it."""
    if not path.exists():
        return None
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    aside = path.with_name(f"{path.name}.before-rebuild-{stamp}")
    os.replace(path, aside)
    wal = path.with_name(path.name + ".wal")
    if wal.exists():
        os.replace(wal, aside.with_name(aside.name + ".wal"))
    return aside


def rebuild(
    out: str, catalog_path: str | os.PathLike[str], *, allow_empty: bool = False, data_path: str | None = None
) -> RebuildReport:
    """Write a new catalog at `catalog_path` from the manifests under `out`; an existing file is moved aside.

    A DuckLake `catalog_path` ('ducklake:...', data files under `data_path` or $STEMWORKS_CATALOG_DATA_PATH) is
    rebuilt in a scratch file first, whose rows then replace the lake's in one transaction; the lake's previous
    snapshot keeps the old rows.

    A location that does not exist or holds no manifest is refused (CatalogError, nothing touched) unless
    `allow_empty`: a mistyped path must never swap the live catalog for an empty one.
    Run it while no flow writes to `catalog_path`: a run recording meanwhile would write to the old file.
    """
    if is_ducklake(catalog_path):
        return _rebuild_ducklake(out, str(catalog_path), allow_empty, data_path)
    base = normalise(out)
    report = RebuildReport(catalog=Path(catalog_path), out=redact(base))
    uris = _manifests_to_rebuild_from(base, allow_empty)
    by_run: dict[str, list[tuple[str, Manifest]]] = {}
    for uri in uris:
        try:
            manifest = read_manifest(uri)
            if complete_manifest(uri, manifest.job_key) is None:
                raise ValueError("a stem it lists is missing or has another size")
            by_run.setdefault(manifest.run_id, []).append((uri, manifest))
        except Exception as exc:  # noqa: BLE001 - one unreadable manifest is reported, never the end of a rebuild
            report.skipped.append((redact(uri), _reason(exc)))
    new_path = Path(f"{catalog_path}.rebuilding")
    new_path.unlink(missing_ok=True)
    try:
        catalog = Catalog(new_path)
        runs: set[str] = set()
        for run_id, entries in sorted(by_run.items()):
            recorded = _record_run(catalog, run_id, base, entries, report.skipped)
            if recorded is not None:
                runs.add(run_id)
                report.tracks += len(recorded)
                report.stems += sum(len(m.stems) for m in recorded)
        for uri in evaluation_uris(base):
            try:
                report.evaluations += _record_evaluations(catalog, read_evaluations(uri), base, runs)
            except Exception as exc:  # noqa: BLE001 - like a manifest: reported, never the end of a rebuild
                report.skipped.append((redact(uri), _reason(exc)))
        report.runs = len(runs)
    except BaseException:
        _remove_partial(new_path)  # never leave a half-built `.rebuilding` file behind
        raise
    report.moved_aside = _move_aside(Path(catalog_path))
    os.replace(new_path, catalog_path)  # a finished catalog appears in one step, never a partial one
    Path(f"{new_path}.lock").unlink(missing_ok=True)
    return report


def _rebuild_ducklake(out: str, location: str, allow_empty: bool, data_path: str | None) -> RebuildReport:
    lake = DuckLakeCatalog(location, data_path or os.environ.get("STEMWORKS_CATALOG_DATA_PATH") or None)
    try:
        with tempfile.TemporaryDirectory(prefix="stemworks-rebuild-") as scratch:
            report = rebuild(out, Path(scratch) / "rebuilt.duckdb", allow_empty=allow_empty)
            before = lake.replace_contents(report.catalog)
    finally:
        lake.close()
    report.catalog = str(lake.location)
    report.moved_aside = f"snapshot {before} of the DuckLake (read it with `FROM runs AT (VERSION => {before})`)"
    return report


def _manifests_to_rebuild_from(base: str, allow_empty: bool) -> list[str]:
    fs, root = filesystem(base)
    if not fs.exists(root):
        if allow_empty:
            return []
        raise CatalogError(
            f"rebuild: {redact(base)} does not exist; the catalog was not touched "
            f"(check the path, or pass --allow-empty to write an empty catalog)"
        )
    uris = manifest_uris(base)
    if not uris and not allow_empty:
        raise CatalogError(
            f"rebuild: no manifest.json under {redact(base)} (expected <track folder>/manifest.json); "
            f"the catalog was not touched (pass --allow-empty to write an empty catalog)"
        )
    return uris


def _record_run(
    catalog: Catalog, run_id: str, out: str, entries: list[tuple[str, Manifest]], skipped: list[tuple[str, str]]
) -> list[Manifest] | None:
    """Record one run and the tracks of its manifests; returns the manifests recorded (None when the run
    itself could not be), and adds each one that could not be recorded to `skipped` with the reason."""
    manifests = [m for _, m in entries]
    try:
        catalog.start_run(_run_record(run_id, out, manifests), rebuilt_from=redact(out))
    except Exception as exc:  # noqa: BLE001 - e.g. parameters the catalog refuses: skip this run's manifests
        skipped.extend((redact(uri), f"run {run_id}: {_reason(exc)}") for uri, _ in entries)
        return None
    recorded: list[Manifest] = []
    for uri, manifest in entries:
        try:
            catalog.record_track(run_id, outcome_from_manifest(uri, manifest))
        except Exception as exc:  # noqa: BLE001 - one manifest the catalog refuses is reported, the rest go in
            skipped.append((redact(uri), _reason(exc)))
        else:
            recorded.append(manifest)
    catalog.finish_run(
        RunSummary(
            run_id=run_id,
            finished_at=max(m.created_at for m in manifests),
            status="completed",
            tracks_total=len(recorded),
            tracks_succeeded=len(recorded),
            tracks_failed=0,
            tracks_skipped=0,
            audio_seconds=sum(m.seconds for m in recorded),
        )
    )
    return recorded


def evaluation_uris(out: str) -> list[str]:
    """Every evaluations file `evaluate` wrote under `out` (`<out>/_evaluations/<run id>/evaluations.json`)."""
    fs, root = filesystem(out)
    found = sorted(fs.glob(f"{root.rstrip('/')}/{REPORT_FOLDER}/*/{EVALUATIONS_FILE}"))
    return [join(out, REPORT_FOLDER, PurePosixPath(p).parent.name, EVALUATIONS_FILE) for p in found]


def read_evaluations(uri: str) -> EvaluationRecord:
    fs, path = filesystem(uri)
    return EvaluationRecord.model_validate_json(fs.cat_file(path))


def _record_evaluations(catalog: Catalog, saved: EvaluationRecord, out: str, runs: set[str]) -> int:
    """Record an evaluation run's `evaluations` rows; first its run, when no manifest recorded it (an
    evaluation that reused every stem published nothing). Returns the rows written."""
    run_id = saved.run.run_id
    if run_id not in runs:
        rebuilt = {"flow_run_id": None, "flow_name": "rebuild", "hostname": socket.gethostname(), "pid": None}
        catalog.start_run(saved.run.model_copy(update=rebuilt), rebuilt_from=redact(out))
        catalog.finish_run(
            RunSummary(
                run_id=run_id,
                finished_at=max(saved.run.started_at, saved.context.evaluated_at),
                status="completed",
                tracks_total=0,
                tracks_succeeded=0,
                tracks_failed=0,
                tracks_skipped=0,
                audio_seconds=0.0,
            )
        )
        runs.add(run_id)
    return sum(catalog.record_evaluations(saved.context, item) for item in saved.items)


def _reason(exc: BaseException) -> str:
    return display_text(f"{type(exc).__name__}: {exc}")


def _remove_partial(path: Path) -> None:
    """Best effort, and quiet: the error that stopped the rebuild is the one to report."""
    for leftover in (path, path.with_name(path.name + ".wal"), path.with_name(path.name + ".lock")):
        with contextlib.suppress(OSError):
            leftover.unlink(missing_ok=True)
