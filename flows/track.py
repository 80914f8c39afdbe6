"""Flow `separate-track`: one source through fetch → validate → decode → separate → quality-score → publish."""

from __future__ import annotations

import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, runtime
from pydantic import Field

from catalog import Catalog, default_catalog_path
from catalog.rebuild import manifest_stems
from tasks import steps
from tasks.errors import StemworksError
from tasks.progress import reporter
from tasks.publish import manifest_is_complete, published_manifest, track_folder
from tasks.records import (AudioInfo, DecodedAudio, FetchedSource, PublishedTrack, Record, RunRecord, RunSummary,
                           SeparatedStems, TrackOutcome)
from tasks.separate import load_model, precision_for
from tasks.settings import Limits, OutputSettings, SeparationSettings, job_key
from tasks.storage import normalise, redact
from tasks.version import code_version
from flows.workarea import default_work_root


class TrackFailed(Exception):
    """Raised by `separate-track` so Prefect marks the flow run Failed; carries the recorded outcome."""

    def __init__(self, outcome: TrackOutcome) -> None:
        super().__init__(f"{outcome.source}: {outcome.error} (step: {outcome.error_step})")
        self.outcome = outcome

    def __reduce__(self):
        return (TrackFailed, (self.outcome,))


def now() -> datetime:
    return datetime.now(timezone.utc)


class StepTimer:
    """Times each step and remembers which one is running, so a failure names its step."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.seconds: dict[str, float] = {}
        self.current: str | None = None

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.current = name
        reporter().step(self.source, name)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - started, 6)
        self.current = None


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, StemworksError):
        return exc.reason
    return f"{type(exc).__name__}: {exc}"


def find_existing(out: str, folder: str, key: str, catalog: Catalog | None) -> str | None:
    """A complete manifest for this job: at its own folder, or wherever the catalog saw it published."""
    found = published_manifest(out, folder, key)
    if found is None and catalog is not None:
        recorded = catalog.published_manifest(key, normalise(out))
        if recorded is not None and manifest_is_complete(recorded, key):
            found = recorded
    return found


class PreparedTrack(Record):
    """A track fetched, keyed, validated and decoded ahead of its turn (or its outcome, if that ended it)."""

    source: str
    work_dir: str
    started_at: datetime
    step_seconds: dict[str, float] = Field(default_factory=dict)
    known: dict = Field(default_factory=dict)
    key: str | None = None
    folder: str | None = None
    fetched: FetchedSource | None = None
    info: AudioInfo | None = None
    decoded: DecodedAudio | None = None
    outcome: TrackOutcome | None = None


def prepare_track(source: str, *, run_id: str, separation: SeparationSettings, output: OutputSettings,
                  limits: Limits, catalog: Catalog | None, work_root: str) -> PreparedTrack:
    """fetch → key → (skip?) → validate → decode. Never raises for a bad track: the outcome says why.

    Run ahead in a background thread, it gets no catalog (DuckDB connections are not to be shared
    across threads): `separate_prepared` then repeats the skip check with the catalog.
    """
    label = redact(source)
    timer = StepTimer(label)
    started = now()
    work_dir = Path(work_root) / run_id / uuid.uuid4().hex
    work_dir.mkdir(parents=True, exist_ok=True)
    known: dict = {}
    reporter().track_started(label)
    try:
        with timer.step("fetch"):
            fetched = steps.fetch(source, str(work_dir), limits)
        known.update(content_sha256=fetched.content_sha256, origin=fetched.origin)
        _, model_info, device = load_model(separation)
        key = job_key(fetched.content_sha256, model_info.signature, separation, output,
                      precision=precision_for(separation, device))
        known["job_key"] = key
        folder = track_folder(source, key, title=fetched.origin.get("title"))
        existing = find_existing(output.out, folder, key, catalog)
        if existing is not None:
            shutil.rmtree(work_dir, ignore_errors=True)
            return PreparedTrack(source=source, work_dir=str(work_dir), started_at=started,
                                 outcome=_skipped(label, existing, timer.seconds, started, known))
        with timer.step("validate"):
            info = steps.validate(fetched, limits)
        known["info"] = info
        with timer.step("decode"):
            decoded = steps.decode(fetched, info, model_info.sample_rate, limits, str(work_dir))
        known["audio_seconds"] = decoded.seconds
        return PreparedTrack(source=source, work_dir=str(work_dir), started_at=started, step_seconds=timer.seconds,
                             known=known, key=key, folder=folder, fetched=fetched, info=info, decoded=decoded)
    except Exception as exc:  # noqa: BLE001 - a bad track must never stop the library
        shutil.rmtree(work_dir, ignore_errors=True)
        return PreparedTrack(source=source, work_dir=str(work_dir), started_at=started,
                             outcome=_failed(label, exc, timer, started, known))


def _skipped(label: str, manifest: str, seconds: dict[str, float], started: datetime, known: dict) -> TrackOutcome:
    return TrackOutcome(source=label, status="skipped", started_at=started, finished_at=now(), step_seconds=seconds,
                        published=PublishedTrack(manifest_uri=manifest, track_uri=manifest.rsplit("/", 1)[0],
                                                 stems=[]), **known)


def with_unrecorded_stems(outcome: TrackOutcome, catalog: Catalog) -> TrackOutcome:
    """A skip of stems published by a run that died before recording them records them now, or nothing will."""
    published = outcome.published
    if outcome.status != "skipped" or published is None or catalog.stems_recorded(published.manifest_uri):
        return outcome
    stems = manifest_stems(published.manifest_uri)
    return outcome.model_copy(update={"published": published.model_copy(update={"stems": stems})})


def _failed(label: str, exc: Exception, timer: StepTimer, started: datetime, known: dict) -> TrackOutcome:
    step = exc.step if isinstance(exc, StemworksError) else (timer.current or "unknown")
    return TrackOutcome(source=label, status="failed", error=describe_error(exc), error_step=step,
                        started_at=started, finished_at=now(), step_seconds=timer.seconds, **known)


@dataclass(frozen=True)
class SeparatedTrack:
    """A prepared track whose stems are in its work area, waiting to be scored and published."""

    prepared: PreparedTrack
    separated: SeparatedStems
    step_seconds: dict[str, float]


def separate_prepared(prepared: PreparedTrack, *, separation: SeparationSettings, output: OutputSettings,
                      catalog: Catalog) -> SeparatedTrack | TrackOutcome:
    """Skip check (with the catalog) → separate. Returns the outcome instead when the track ends here."""
    if prepared.outcome is not None:
        return prepared.outcome
    label = redact(prepared.source)
    timer = StepTimer(label)
    timer.seconds.update(prepared.step_seconds)
    known = dict(prepared.known)
    try:
        existing = find_existing(output.out, prepared.folder, prepared.key, catalog)
        if existing is not None:  # published while this track waited its turn, or known to the catalog
            shutil.rmtree(prepared.work_dir, ignore_errors=True)
            return _skipped(label, existing, timer.seconds, prepared.started_at, known)
        with timer.step("separate"):
            separated = steps.separate(prepared.decoded, separation, prepared.work_dir, label)
        return SeparatedTrack(prepared=prepared, separated=separated, step_seconds=dict(timer.seconds))
    except Exception as exc:  # noqa: BLE001 - a bad track must never stop the library
        shutil.rmtree(prepared.work_dir, ignore_errors=True)
        return _failed(label, exc, timer, prepared.started_at, known)


def publish_separated(track: SeparatedTrack, *, run_id: str, separation: SeparationSettings,
                      output: OutputSettings) -> TrackOutcome:
    """score → publish a separated track; removes its work area whatever happens."""
    prepared = track.prepared
    label = redact(prepared.source)
    timer = StepTimer(label)
    timer.seconds.update(track.step_seconds)
    known = dict(prepared.known)
    try:
        with timer.step("score"):
            quality = steps.score(prepared.decoded, track.separated, label)
        with timer.step("publish"):
            published = steps.publish(out=output.out, folder=prepared.folder, key=prepared.key, run_id=run_id,
                                      fetched=prepared.fetched, info=prepared.info, separated=track.separated,
                                      quality=quality, separation=separation, output=output,
                                      work_dir=prepared.work_dir)
        return TrackOutcome(source=label, status="succeeded", started_at=prepared.started_at, finished_at=now(),
                            step_seconds=timer.seconds, quality=quality, published=published, **known)
    except Exception as exc:  # noqa: BLE001 - a bad track must never stop the library
        return _failed(label, exc, timer, prepared.started_at, known)
    finally:
        shutil.rmtree(prepared.work_dir, ignore_errors=True)


def finish_track(prepared: PreparedTrack, *, run_id: str, separation: SeparationSettings,
                 output: OutputSettings, catalog: Catalog) -> TrackOutcome:
    """separate → score → publish a prepared track; removes its work area whatever happens."""
    separated = separate_prepared(prepared, separation=separation, output=output, catalog=catalog)
    if isinstance(separated, TrackOutcome):
        return separated
    return publish_separated(separated, run_id=run_id, separation=separation, output=output)


def record_outcome(outcome: TrackOutcome, *, run_id: str, catalog: Catalog) -> TrackOutcome:
    """Record a track's outcome under the current flow run, with the stems of a skip nobody recorded."""
    outcome = with_unrecorded_stems(outcome.model_copy(update={"flow_run_id": flow_run_id()}), catalog)
    catalog.record_track(run_id, outcome)
    reporter().track_finished(outcome.source, outcome.status)
    return outcome


def process_track(source: str, *, run_id: str, separation: SeparationSettings, output: OutputSettings,
                  limits: Limits, catalog: Catalog, work_root: str) -> TrackOutcome:
    """Run every step for one source; return the outcome, never raise."""
    prepared = prepare_track(source, run_id=run_id, separation=separation, output=output, limits=limits,
                             catalog=catalog, work_root=work_root)
    return finish_track(prepared, run_id=run_id, separation=separation, output=output, catalog=catalog)


def flow_run_id() -> str | None:
    value = runtime.flow_run.id
    return str(value) if value else None


def run_record(*, run_id: str, flow_name: str, sources: list[str], separation: SeparationSettings,
               output: OutputSettings, limits: Limits, model_signature: str | None, device: str | None) -> RunRecord:
    return RunRecord(
        run_id=run_id, flow_run_id=flow_run_id(), flow_name=flow_name, started_at=now(),
        parameters={"separation": separation.model_dump(),
                    "output": output.model_dump() | {"out": redact(output.out)},
                    "limits": limits.model_dump()},
        sources=[redact(s) for s in sources], out=redact(normalise(output.out)), model_name=separation.model,
        model_signature=model_signature, device=device, code_version=code_version(), hostname=socket.gethostname())


@flow(name="separate-track", persist_result=False)
def separate_track(source: str, separation: SeparationSettings = SeparationSettings(),
                   output: OutputSettings = OutputSettings(), limits: Limits = Limits(),
                   catalog: str | None = None, work_root: str | None = None) -> TrackOutcome:
    """Separate one source into stems, publish them with a manifest, and record a run of its own.

    `separate-library` does not call this flow per track (a subflow costs about a second of Prefect
    overhead): it runs the same steps as task runs of its own flow run.
    """
    store = Catalog(catalog or default_catalog_path())
    run_id = uuid.uuid4().hex
    _, model_info, device = load_model(separation)
    store.start_run(run_record(run_id=run_id, flow_name="separate-track", sources=[source], separation=separation,
                               output=output, limits=limits, model_signature=model_info.signature, device=device))
    outcome = process_track(source, run_id=run_id, separation=separation, output=output, limits=limits,
                            catalog=store, work_root=work_root or default_work_root())
    outcome = record_outcome(outcome, run_id=run_id, catalog=store)
    store.finish_run(RunSummary(
        run_id=run_id, finished_at=now(), status="completed" if outcome.status != "failed" else "failed",
        tracks_total=1, tracks_succeeded=int(outcome.status == "succeeded"),
        tracks_failed=int(outcome.status == "failed"), tracks_skipped=int(outcome.status == "skipped"),
        audio_seconds=outcome.audio_seconds or 0.0))
    if outcome.status == "failed":
        raise TrackFailed(outcome)
    return outcome
