"""Prefect tasks: thin wrappers that give each plain step its own retry policy.

Only transient failures are retried (see `tasks.errors.is_retryable`); invalid audio or a
broken limit fails at once. Tasks exchange paths and small records, never audio arrays.
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Callable
from typing import Any

from prefect import runtime, task
from prefect.cache_policies import NO_CACHE

from tasks import decode as decode_step
from tasks import fetch as fetch_step
from tasks import publish as publish_step
from tasks import score as score_step
from tasks import separate as separate_step
from tasks import validate as validate_step
from tasks.errors import is_retryable
from tasks.records import (AudioInfo, DecodedAudio, FetchedSource, PublishedTrack, SeparatedStems,
                           TrackQuality)
from tasks.settings import Limits, OutputSettings, SeparationSettings
from tasks.slots import gpu_slot
from tasks.storage import redact


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    return is_retryable(state.result(raise_on_failure=False))


def track_label(source: str) -> str:
    """The file or page name of a source, short and without credentials: `song.flac`."""
    name = redact(source).split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return publish_step.safe_name(name)[:60]


def named_for_track(step: str) -> Callable[[], str]:
    """Task runs named `<step> · <file>`: a library run's task list in the Prefect UI reads per track."""
    def name() -> str:
        parameters = runtime.task_run.parameters
        fetched = parameters.get("fetched")
        source = parameters.get("source") or (fetched.source if isinstance(fetched, FetchedSource) else "")
        return f"{step} · {track_label(source)}" if source else step
    return name


_COMMON: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False,
                           "retry_condition_fn": retry_if_transient, "retry_jitter_factor": 0.5}
_IO_RETRIES: dict[str, Any] = {"retries": 3, "retry_delay_seconds": [2, 10, 30]}


@task(name="fetch", task_run_name=named_for_track("fetch"), **_COMMON, **_IO_RETRIES)
def fetch(source: str, work_dir: str, limits: Limits) -> FetchedSource:
    return fetch_step.fetch(source, work_dir, limits)


@task(name="validate", task_run_name=named_for_track("validate"), **_COMMON, retries=0)
def validate(fetched: FetchedSource, limits: Limits) -> AudioInfo:
    return validate_step.probe(fetched.local_path, limits, source=fetched.source)


@task(name="decode", task_run_name=named_for_track("decode"), **_COMMON, retries=1, retry_delay_seconds=2)
def decode(fetched: FetchedSource, info: AudioInfo, sample_rate: int, limits: Limits, work_dir: str) -> DecodedAudio:
    return decode_step.decode(fetched.local_path, info, sample_rate, limits, work_dir, source=fetched.source)


@task(name="separate", task_run_name=named_for_track("separate"), **_COMMON, retries=1, retry_delay_seconds=5)
def separate(decoded: DecodedAudio, settings: SeparationSettings, work_dir: str, source: str) -> SeparatedStems:
    # The GPU slot is held here only: decode, score and publish of other tracks never wait for it.
    with gpu_slot(settings):
        return separate_step.separate(decoded, settings, work_dir, source=source)


@task(name="quality-score", task_run_name=named_for_track("quality-score"), **_COMMON, retries=0)
def score(decoded: DecodedAudio, separated: SeparatedStems, source: str = "") -> TrackQuality:
    return score_step.score(decoded.path, separated)


@task(name="publish", task_run_name=named_for_track("publish"), **_COMMON, **_IO_RETRIES)
def publish(*, out: str, folder: str, key: str, run_id: str, fetched: FetchedSource, info: AudioInfo,
            separated: SeparatedStems, quality: TrackQuality, separation: SeparationSettings,
            output: OutputSettings, work_dir: str) -> PublishedTrack:
    files = publish_step.encode_stems(separated, output, Path(work_dir))
    manifest = publish_step.build_manifest(key=key, run_id=run_id, fetched=fetched, info=info, separated=separated,
                                           quality=quality, separation=separation, output=output, files=files)
    return publish_step.publish(out=out, folder=folder, manifest=manifest, files=files)
