"""Every Prefect task of the pipeline, with its retry policy: thin wrappers over the plain steps.

The only module of `tasks/` that imports Prefect. Task names are the step names of
`tasks.core.vocabulary.Step`; only transient failures are retried (`tasks.io.faults.is_transient`),
so invalid audio or a broken limit fails at once. Tasks exchange paths and small records, never audio.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from prefect import runtime, task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.utilities.math import clamped_poisson_interval

from tasks.core.evaluation import DatasetItem, StemScore
from tasks.core.records import (
    AudioInfo,
    DecodedAudio,
    FetchedSource,
    PublishedStem,
    PublishedTrack,
    RunContext,
    SeparatedStems,
    TrackQuality,
    TrackWork,
)
from tasks.core.settings import Limits, SeparationSettings
from tasks.core.vocabulary import Step
from tasks.engine.models import resolve_device
from tasks.io.faults import is_transient
from tasks.io.locations import redact
from tasks.steps import decode as decode_step
from tasks.steps import fetch as fetch_step
from tasks.steps import publish as publish_step
from tasks.steps import score as score_step
from tasks.steps import separate as separate_step
from tasks.steps import validate as validate_step
from tasks.steps.evaluate import scoring as scoring_step


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    return is_transient(state.result(raise_on_failure=False))


def track_label(source: str) -> str:
    """The file or page name of a source, short and without credentials: `song.flac`."""
    name = redact(source).split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return publish_step.safe_name(name)[:60]


def _source_of(parameters: dict[str, Any]) -> str:
    """The source a task run works on: a `source` parameter, or the `source` of a record it was given."""
    if isinstance(parameters.get("source"), str):
        return str(parameters["source"])
    for value in parameters.values():
        if isinstance(getattr(value, "source", None), str):
            return str(value.source)
    return ""


def named_for_track(step: Step) -> Callable[[], str]:
    """Task runs named `<step> · <file>`: a library run's task list in the Prefect UI reads per track."""

    def name() -> str:
        source = _source_of(runtime.task_run.parameters)
        return f"{step} · {track_label(source)}" if source else step

    return name


def _policy(step: Step, retries: int, delays: list[int] | int = 0) -> dict[str, Any]:
    return {
        "name": step,
        "task_run_name": named_for_track(step),
        "cache_policy": NO_CACHE,
        "persist_result": False,
        "retries": retries,
        "retry_delay_seconds": delays,
        "retry_condition_fn": retry_if_transient,
        "retry_jitter_factor": IO_RETRY_JITTER,
    }


# Storage and network I/O: retried three times with growing delays (plus the store clients' own retries).
IO_RETRY_DELAYS_S = [2, 10, 30]
# Delays vary by up to +50% (and less below), so many tracks that failed together do not retry together.
IO_RETRY_JITTER = 0.5


def io_retry_delays() -> list[float]:
    """The I/O tasks' retry delays, jittered as Prefect jitters them: for store calls made outside those tasks."""
    return [clamped_poisson_interval(delay, IO_RETRY_JITTER) for delay in IO_RETRY_DELAYS_S]


@contextmanager
def gpu_slot(settings: SeparationSettings, device: str | None = None) -> Iterator[None]:
    """Hold one slot of `settings.gpu_slot_limit` while on CUDA; do nothing on CPU or with no limit named.

    One slot per GPU that may separate at once, counted across every worker host sharing the server.
    `strict=False`: on a server where the operator has not created the limit, Prefect logs
    "Concurrency limits [...] do not exist - skipping acquisition." and the step runs unthrottled,
    so a plain `stemworks separate --device cuda` still works without a Prefect setup.
    """
    device = device or resolve_device(settings.device)
    if settings.gpu_slot_limit is None or not device.startswith("cuda"):
        yield
        return
    with concurrency(settings.gpu_slot_limit, occupy=1, strict=False):
        yield


@task(**_policy("fetch", retries=3, delays=IO_RETRY_DELAYS_S))
def fetch(source: str, work_dir: str, limits: Limits) -> FetchedSource:
    return fetch_step.fetch(source, work_dir, limits)


@task(**_policy("validate", retries=0))
def validate(fetched: FetchedSource, limits: Limits) -> AudioInfo:
    return validate_step.probe(fetched.local_path, limits, source=fetched.source)


@task(**_policy("decode", retries=1, delays=2))
def decode(fetched: FetchedSource, info: AudioInfo, sample_rate: int, limits: Limits, work_dir: str) -> DecodedAudio:
    return decode_step.decode(fetched.local_path, info, sample_rate, limits, work_dir, source=fetched.source)


@task(**_policy("separate", retries=1, delays=5))
def separate(track: TrackWork, settings: SeparationSettings) -> SeparatedStems:
    # The GPU slot is held here only: decode, score and publish of other tracks never wait for it.
    with gpu_slot(settings):
        return separate_step.separate(track.decoded, settings, track.work_dir, source=track.source)


@task(**_policy("score", retries=0))
def score(track: TrackWork, separated: SeparatedStems) -> TrackQuality:
    return score_step.score(track.decoded.path, separated)


@task(**_policy("publish", retries=3, delays=IO_RETRY_DELAYS_S))
def publish(track: TrackWork, separated: SeparatedStems, quality: TrackQuality, context: RunContext) -> PublishedTrack:
    files = publish_step.encode_stems(separated, context.output, track.work_dir)
    manifest = publish_step.build_manifest(
        key=track.job_key,
        run_id=context.run_id,
        fetched=track.fetched,
        info=track.info,
        separated=separated,
        quality=quality,
        separation=context.separation,
        output=context.output,
        files=files,
    )
    return publish_step.publish(out=context.output.out, folder=track.folder, manifest=manifest, files=files)


# Not a step of the track pipeline (no `<step>_s` column): the `evaluate` flow scores published stems with it.
@task(
    name="evaluate",
    task_run_name=lambda: f"evaluate · {runtime.task_run.parameters['item'].name}",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=1,
    retry_delay_seconds=2,
    retry_condition_fn=retry_if_transient,
)
def evaluate(
    item: DatasetItem, stems: list[PublishedStem], sample_rate: int, limits: Limits, work_dir: str
) -> tuple[list[StemScore], float, float]:
    return scoring_step.score_item(item, stems, sample_rate, limits, work_dir)
