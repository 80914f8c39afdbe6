"""Small records passed between tasks and into the catalog. Audio never travels in them: only paths."""

from __future__ import annotations

from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from tasks.core.settings import Limits, OutputSettings, SeparationSettings
from tasks.core.vocabulary import FinishedRunStatus, Stage, Step, TrackStatus


class Record(BaseModel):
    model_config = ConfigDict(frozen=True)


class FetchedSource(Record):
    source: str = Field(description="The source as the user gave it (path or URL), credentials removed.")
    local_path: str = Field(description="Copy of the bytes in the run's work area.")
    content_sha256: str
    size_bytes: int
    origin: dict[str, str | None] = Field(
        default_factory=dict, description="Where the bytes came from (URL, extractor, title...)."
    )


class AudioInfo(Record):
    container: str
    codec: str
    stream_index: int = Field(description="Audio stream that holds the mixture (0 for NI stem files).")
    audio_streams: int
    sample_rate: int
    channels: int
    seconds: float = Field(description="Duration claimed by the container; decode re-checks it on the samples.")
    is_stem_file: bool = False


class DecodedAudio(Record):
    path: str = Field(description="float32 .npy of shape (2, frames) at the model's sample rate.")
    sample_rate: int
    frames: int

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate


class ModelInfo(Record):
    name: str
    signature: str = Field(description="sha256 prefix over the weights: changes whenever the weights do.")
    sources: list[str]
    sample_rate: int
    audio_channels: int


class SeparatedStems(Record):
    paths: dict[str, str] = Field(description="Stem name -> float32 .npy of shape (2, frames).")
    sample_rate: int
    frames: int
    model: ModelInfo
    device: str


class StemQuality(Record):
    stem: str
    peak_dbfs: float
    rms_dbfs: float
    silence_ratio: float = Field(description="Share of 50 ms frames below -60 dBFS.")
    clipped_ratio: float = Field(description="Share of samples at or beyond full scale.")
    energy_share_db: float = Field(description="Stem energy relative to the mixture's, in dB.")


class TrackQuality(Record):
    residual_db: float = Field(description="Energy of mixture minus sum of stems, relative to the mixture, in dB.")
    stems: list[StemQuality]


class PublishedStem(Record):
    stem: str
    uri: str
    sha256: str
    seconds: float
    bytes: int
    format: str


class PublishedTrack(Record):
    manifest_uri: str
    track_uri: str = Field(description="Folder (prefix) holding the track's stems and manifest.")
    stems: list[PublishedStem]


class TrackOutcome(Record):
    """Everything the catalog records about one source in one run."""

    source: str
    status: TrackStatus
    content_sha256: str | None = None
    job_key: str | None = None
    error: str | None = None
    error_step: Stage | None = None
    started_at: AwareDatetime
    finished_at: AwareDatetime
    step_seconds: dict[Step, float] = Field(default_factory=dict)
    audio_seconds: float | None = None
    info: AudioInfo | None = None
    origin: dict[str, str | None] = Field(default_factory=dict)
    quality: TrackQuality | None = None
    published: PublishedTrack | None = None
    flow_run_id: str | None = None
    skip_reason: str | None = Field(default=None, description="Why a skipped track was skipped.")
    hostname: str | None = Field(default=None, description="Host that processed the track.")
    worker: str | None = Field(default=None, description="STEMWORKS_WORKER, or the Prefect worker's name.")
    shard: int | None = Field(default=None, description="Shard index within a fanned-out run.")


class RunRecord(Record):
    """One flow run of separate-library, as recorded when it starts."""

    run_id: str
    flow_run_id: str | None = None
    flow_name: str
    started_at: AwareDatetime
    parameters: dict[str, Any] = Field(description="Flow parameters as JSON-able data (no secrets).")
    sources: list[str]
    out: str
    model_name: str
    model_signature: str | None = None
    device: str | None = None
    code_version: str
    hostname: str
    pid: int | None = Field(default=None, description="Process id of the run on `hostname`.")
    parent_run_id: str | None = Field(default=None, description="The fanned-out run this shard run works for.")
    shard: int | None = Field(default=None, description="Shard index within the parent run.")


class RecordedTrack(Record):
    """A track row as a fanned-out parent reads it back from the catalog, with the names of its recorded stems."""

    run_id: str
    flow_run_id: str | None = None
    source: str
    status: TrackStatus
    error: str | None = None
    error_step: Stage | None = None
    manifest_uri: str | None = None
    audio_seconds: float | None = None
    skip_reason: str | None = None
    hostname: str | None = None
    worker: str | None = None
    shard: int | None = None
    finished_at: AwareDatetime
    stems: list[str] = Field(default_factory=list)


class RunningRun(Record):
    """A run the catalog holds as running, with what is needed to tell whether its process is alive."""

    run_id: str
    hostname: str
    pid: int | None
    started_at: AwareDatetime


class Removal(Record):
    """A published output removed by retention (`stemworks clean`)."""

    manifest_uri: str
    job_key: str | None
    content_sha256: str | None
    reason: str
    removed_at: AwareDatetime
    hostname: str


class RunSummary(Record):
    run_id: str
    finished_at: AwareDatetime
    status: FinishedRunStatus
    tracks_total: int
    tracks_succeeded: int
    tracks_failed: int
    tracks_skipped: int
    audio_seconds: float


class RunContext(Record):
    """What every track of one run shares: the run's id and settings, and where scratch files go."""

    run_id: str
    separation: SeparationSettings
    output: OutputSettings
    limits: Limits
    work_root: str


class TrackWork(Record):
    """A track fetched, keyed, validated and decoded: what separate, score and publish work from."""

    source: str = Field(description="The source as shown and recorded (credentials removed).")
    work_dir: str = Field(description="The track's own scratch folder; removed when the track ends.")
    job_key: str
    folder: str = Field(description="The track's folder name under the output location.")
    fetched: FetchedSource
    info: AudioInfo
    decoded: DecodedAudio
