"""One track through the pipeline: prepare → separate → finish → record, as Prefect task runs.

Every phase returns the track's outcome instead of raising when the track ends there (skipped,
or failed with the step and reason), so a bad track never stops a library. Each phase removes the
track's work area once the track is over.
"""

from __future__ import annotations

import logging
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from prefect import get_run_logger, runtime
from prefect.exceptions import MissingContextError
from pydantic import Field

from catalog import Catalog
from tasks import prefect_tasks as steps
from tasks.core.errors import StemworksError
from tasks.core.progress import reporter
from tasks.core.records import (
    AudioInfo,
    PublishedTrack,
    Record,
    RunContext,
    SeparatedStems,
    TrackOutcome,
    TrackQuality,
    TrackWork,
)
from tasks.core.settings import job_key
from tasks.core.vocabulary import Stage, Step, TrackStatus
from tasks.engine.models import load_model, precision_for
from tasks.io.claims import Claim, ClaimKeeper, Holder
from tasks.io.faults import retry_transient
from tasks.io.locations import normalise, raw_bytes_hex, redact
from tasks.io.manifest import complete_manifest, manifest_uri, read_manifest
from tasks.io.processes import alive_since, worker_label
from tasks.steps.publish import AlreadyPublishedError, track_folder

ALREADY_PUBLISHED = "already published with the same model and settings"
T = TypeVar("T")


def now() -> datetime:
    return datetime.now(UTC)


def flow_run_id() -> str | None:
    value = runtime.flow_run.id
    return str(value) if value else None


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, StemworksError):
        return exc.reason
    return f"{type(exc).__name__}: {exc}"


def store_call(label: str, call: Callable[[], T]) -> T:
    """A store call a track makes between its steps (the destination check, its job claim), retried on
    transient failures with the fetch and publish tasks' delays: a store blip there does not fail the track."""

    def warn(exc: BaseException, delay: float) -> None:
        try:
            logger: logging.Logger | logging.LoggerAdapter[logging.Logger] = get_run_logger()
        except MissingContextError:
            logger = logging.getLogger(__name__)
        logger.warning("%s: %s; retrying in %.1f s", label, describe_error(exc), delay)

    return retry_transient(call, steps.io_retry_delays(), on_retry=warn)


class TrackFacts(Record):
    """What is known about a track so far; every outcome carries it, however far the track got."""

    content_sha256: str | None = None
    job_key: str | None = None
    origin: dict[str, str | None] = Field(default_factory=dict)
    info: AudioInfo | None = None
    audio_seconds: float | None = None


@dataclass
class TrackLog:
    """One track's passage: when it started, each step's time, the step running now, and its facts.

    Handed from phase to phase (and thread to thread), never used by two at once.
    """

    label: str
    started_at: datetime = field(default_factory=now)
    seconds: dict[Step, float] = field(default_factory=dict)
    current: Stage | None = None
    facts: TrackFacts = field(default_factory=TrackFacts)

    @contextmanager
    def step(self, name: Step) -> Iterator[None]:
        self.current = name
        reporter().step(self.label, name)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - started, 6)
        self.current = None

    def learn(self, **facts: object) -> None:
        self.facts = self.facts.model_copy(update=facts)

    def outcome(
        self,
        status: TrackStatus,
        *,
        error: str | None = None,
        error_step: Stage | None = None,
        quality: TrackQuality | None = None,
        published: PublishedTrack | None = None,
        skip_reason: str | None = None,
    ) -> TrackOutcome:
        facts = self.facts
        return TrackOutcome(
            source=self.label,
            status=status,
            error=error,
            error_step=error_step,
            started_at=self.started_at,
            finished_at=now(),
            step_seconds=dict(self.seconds),
            content_sha256=facts.content_sha256,
            job_key=facts.job_key,
            origin=facts.origin,
            info=facts.info,
            audio_seconds=facts.audio_seconds,
            quality=quality,
            published=published,
            skip_reason=skip_reason,
        )

    def skipped(self, manifest: str, reason: str = ALREADY_PUBLISHED) -> TrackOutcome:
        return self.outcome(
            "skipped",
            published=PublishedTrack(manifest_uri=manifest, track_uri=manifest.rsplit("/", 1)[0], stems=[]),
            skip_reason=reason,
        )

    def claimed_elsewhere(self, holder: Holder, run_id: str) -> TrackOutcome:
        """Another track holds this job: separating it again would only duplicate the same stems."""
        if holder.run_id == run_id:
            reason = f"same content as {holder.source} in this run: separated once, there"
        else:
            reason = f"being separated by {holder.describe()}; claimed until {holder.expires_at:%Y-%m-%d %H:%M:%S} UTC"
        return self.outcome("skipped", skip_reason=reason)

    def failed(self, exc: BaseException) -> TrackOutcome:
        step: Stage = exc.step if isinstance(exc, StemworksError) else (self.current or "unknown")
        return self.outcome("failed", error=describe_error(exc), error_step=step)


@dataclass(frozen=True)
class Prepared:
    """A track fetched, keyed, validated and decoded ahead of its turn; or its outcome, if that ended it."""

    log: TrackLog
    work: TrackWork | TrackOutcome


@dataclass(frozen=True)
class Separated:
    """A track whose stems are in its work area, waiting to be scored and published."""

    log: TrackLog
    work: TrackWork
    stems: SeparatedStems
    claim: Claim | None = None


@dataclass(frozen=True)
class TrackPipeline:
    """The phases of one track within a run. `catalog` answers "was this job published elsewhere?";
    `claims` makes sure no two tracks (of this run or any other) separate the same job at once."""

    context: RunContext
    catalog: Catalog
    shard: int | None = None  # the shard of a fanned-out run this pipeline works through, recorded per track
    claims: ClaimKeeper = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "claims", ClaimKeeper(self.context.output.out, self.context.run_id))

    def existing_manifest(self, folder: str, key: str, *, ask_catalog: bool = True) -> str | None:
        """A complete manifest for this job: at its own folder, or wherever the catalog saw it published."""
        out = self.context.output.out
        own = manifest_uri(out, folder)
        if complete_manifest(own, key) is not None:
            return own
        if not ask_catalog:
            return None
        recorded = self.catalog.recorded_manifest_uri(key, normalise(out))
        return recorded if recorded is not None and complete_manifest(recorded, key) is not None else None

    def prepare(self, source: str, *, ask_catalog: bool = True) -> Prepared:
        """fetch → key → (skip?) → validate → decode.

        Run ahead in a background thread, it leaves the catalog alone (`ask_catalog=False`):
        `separate` repeats the skip check with the catalog when the track's turn comes.
        """
        log = TrackLog(label=redact(source))
        if (raw := raw_bytes_hex(source)) is not None:  # a name that is not UTF-8: keep its exact bytes
            log.learn(origin={"path_bytes_hex": raw})
        work_dir = Path(self.context.work_root) / self.context.run_id / uuid.uuid4().hex
        work_dir.mkdir(parents=True, exist_ok=True)
        reporter().track_started(log.label)
        limits = self.context.limits
        try:
            with log.step("fetch"):
                fetched = steps.fetch(source, str(work_dir), limits)
            log.learn(content_sha256=fetched.content_sha256, origin=fetched.origin)
            separation, output = self.context.separation, self.context.output
            _, model, device = load_model(separation)
            key = job_key(
                fetched.content_sha256, model.signature, separation, output, precision=precision_for(separation, device)
            )
            log.learn(job_key=key)
            folder = track_folder(source, key, title=fetched.origin.get("title"))
            existing = store_call(log.label, lambda: self.existing_manifest(folder, key, ask_catalog=ask_catalog))
            if existing is not None:
                shutil.rmtree(work_dir, ignore_errors=True)
                return Prepared(log, log.skipped(existing))
            with log.step("validate"):
                info = steps.validate(fetched, limits)
            log.learn(info=info)
            with log.step("decode"):
                decoded = steps.decode(fetched, info, model.sample_rate, limits, str(work_dir))
            log.learn(audio_seconds=decoded.seconds)
            return Prepared(
                log,
                TrackWork(
                    source=log.label,
                    work_dir=str(work_dir),
                    job_key=key,
                    folder=folder,
                    fetched=fetched,
                    info=info,
                    decoded=decoded,
                ),
            )
        except Exception as exc:  # noqa: BLE001 - a bad track must never stop the library
            shutil.rmtree(work_dir, ignore_errors=True)
            return Prepared(log, log.failed(exc))

    def separate(self, prepared: Prepared) -> Separated | TrackOutcome:
        """Skip check (with the catalog) → separate. Returns the outcome instead when the track ends here."""
        log, work = prepared.log, prepared.work
        if isinstance(work, TrackOutcome):
            return work
        try:
            existing = store_call(log.label, lambda: self.existing_manifest(work.folder, work.job_key))
            if existing is not None:  # published while this track waited its turn, or known to the catalog
                shutil.rmtree(work.work_dir, ignore_errors=True)
                return log.skipped(existing)
            # A retry after a claim write whose reply was lost finds that claim abandoned by this process: taken.
            claim = store_call(log.label, lambda: self.claims.acquire(work.job_key, work.source))
        except Exception as exc:  # noqa: BLE001 - a bad track must never stop the library
            shutil.rmtree(work.work_dir, ignore_errors=True)
            return log.failed(exc)
        if isinstance(claim, Holder):
            shutil.rmtree(work.work_dir, ignore_errors=True)
            return log.claimed_elsewhere(claim, self.context.run_id)
        try:
            # Published (and recorded) by the claim's previous holder between our first look and our claim?
            # The catalog is asked too: the same audio under another name is published in another folder.
            existing = store_call(log.label, lambda: self.existing_manifest(work.folder, work.job_key))
            if existing is not None:
                self.claims.release(claim)
                shutil.rmtree(work.work_dir, ignore_errors=True)
                return log.skipped(existing)
            with log.step("separate"):
                stems = steps.separate(work, self.context.separation)
            return Separated(log, work, stems, claim)
        except Exception as exc:  # noqa: BLE001 - a bad track must never stop the library
            self.claims.release(claim)
            shutil.rmtree(work.work_dir, ignore_errors=True)
            return log.failed(exc)

    def finish(self, separated: Separated | TrackOutcome) -> TrackOutcome:
        """score → publish a separated track (an ended one passes through); removes its work area.

        A published track keeps its claim until `record` has written it to the catalog: released earlier,
        another run could claim the job, find it neither in its own folder nor in the catalog yet (the same
        audio under another name lands in another folder), and separate it again.
        """
        if isinstance(separated, TrackOutcome):
            return separated
        log, work = separated.log, separated.work
        try:
            with log.step("score"):
                quality = steps.score(work, separated.stems)
            with log.step("publish"):
                published = steps.publish(work, separated.stems, quality, self.context)
            return log.outcome("succeeded", quality=quality, published=published)
        except AlreadyPublishedError as exc:  # our claim lapsed and another run finished first: keep theirs
            self.claims.release(separated.claim)
            return log.skipped(exc.manifest_uri, f"published meanwhile by another run ({exc.reason})")
        except Exception as exc:  # noqa: BLE001 - a bad track must never stop the library
            self.claims.release(separated.claim)
            return log.failed(exc)
        finally:
            shutil.rmtree(work.work_dir, ignore_errors=True)

    def process(self, source: str) -> TrackOutcome:
        """Every step for one source, in this thread; returns the outcome, never raises."""
        return self.finish(self.separate(self.prepare(source)))

    def record(self, outcome: TrackOutcome) -> TrackOutcome:
        """Record an outcome under the current flow run, with the stems of a skip nobody recorded."""
        here = {
            "flow_run_id": flow_run_id(),
            "hostname": socket.gethostname(),
            "worker": worker_label(),
            "shard": self.shard,
        }
        try:
            outcome = self._with_unrecorded_stems(outcome.model_copy(update=here))
            self.catalog.record_track(self.context.run_id, outcome)
        finally:
            if outcome.job_key is not None:  # the claim `finish` kept for a published track
                self.claims.release_held(outcome.job_key, outcome.source)
        reporter().track_finished(outcome.source, outcome.status)
        return outcome

    def _with_unrecorded_stems(self, outcome: TrackOutcome) -> TrackOutcome:
        """A skip of stems published by a run that died before recording them records them now, or nothing will.

        A run still running records its own stems (it may be between publishing and recording): left to it,
        unless its process is known to be gone.
        """
        published = outcome.published
        if outcome.status != "skipped" or published is None or self.catalog.stems_recorded(published.manifest_uri):
            return outcome
        manifest = read_manifest(published.manifest_uri)
        publisher = self.catalog.running_run(manifest.run_id)
        if publisher is not None and (
            publisher.pid is None
            or alive_since(publisher.hostname, publisher.pid, publisher.started_at.timestamp()) is not False
        ):
            return outcome
        stems = manifest.published(published.manifest_uri).stems
        return outcome.model_copy(update={"published": published.model_copy(update={"stems": stems})})
