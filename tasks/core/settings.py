"""Run settings: one typed definition shared by the CLI, the flows and the deployments' UI forms.

The CLI's options are generated from these fields (`flows/cli/options.py`): names, choices, defaults
and help texts are written here only.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

GiB = 1024**3

Device = Literal["auto", "cpu", "cuda"]
AudioFormat = Literal["wav", "flac", "mp3"]
PrecisionChoice = Literal["auto", "fp32", "bf16", "fp16"]
BitDepth = Literal[16, 24, 32]
# Offered as examples in the run form; not an enum, because a local model repository may hold any name.
PRETRAINED_MODELS = (
    "htdemucs",
    "htdemucs_ft",
    "htdemucs_6s",
    "hdemucs_mmi",
    "mdx",
    "mdx_extra",
    "mdx_q",
    "mdx_extra_q",
)


class Limits(BaseModel):
    """What a source must satisfy to be separated. Defaults admit long DJ mixes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_file_bytes: int = Field(
        4 * GiB,
        gt=0,
        title="Max file size (bytes)",
        description="Larger sources fail validation without being decoded.",
    )
    max_seconds: float = Field(
        4 * 3600.0,
        gt=0,
        title="Max duration (s)",
        description="Longer sources fail; enforced on the decoded samples too, not only the header.",
    )
    min_seconds: float = Field(0.1, ge=0, title="Min duration (s)", description="Shorter sources fail as empty.")
    min_sample_rate: int = Field(
        8000,
        gt=0,
        title="Min sample rate (Hz)",
        description="Sources at a lower sample rate fail; others are resampled to the model's.",
    )
    max_sample_rate: int = Field(
        384000, gt=0, title="Max sample rate (Hz)", description="Sources at a higher sample rate fail."
    )
    max_channels: int = Field(
        8,
        ge=1,
        title="Max channels",
        description="Sources with more channels fail; others are down- or up-mixed to stereo.",
    )
    max_playlist_entries: int = Field(
        50,
        ge=1,
        le=10000,
        title="Max playlist entries",
        description="A playlist URL expands to at most this many tracks.",
    )


class SeparationSettings(BaseModel):
    """How Demucs is run. Everything here except `device`, `model_repo` and `batch_size` changes the output."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(
        "htdemucs",
        min_length=1,
        title="Model",
        description="Demucs model name or signature, e.g. htdemucs, htdemucs_ft, mdx_extra; "
        "any name found in the local model repository also works.",
        examples=list(PRETRAINED_MODELS),
    )
    model_repo: str | None = Field(
        None,
        title="Local model repository",
        description="Folder of Demucs model files (NAME-SHA8.th files, NAME.yaml bags) for offline use; "
        "unset fetches from the Demucs hub and caches.",
    )
    device: Device = Field("auto", title="Device", description="auto picks CUDA when present, else CPU.")
    shifts: int = Field(
        1,
        ge=0,
        le=20,
        title="Shifts",
        description="Random time shifts averaged per prediction (0 = deterministic, faster).",
    )
    overlap: float = Field(0.25, ge=0.0, lt=1.0, title="Overlap", description="Overlap between model segments.")
    segment: float | None = Field(
        None, gt=0, title="Segment (s)", description="Segment length override; unset uses the model's own."
    )
    two_stems: str | None = Field(
        None, title="Two stems", description="Keep one stem and its complement (e.g. vocals -> vocals + no_vocals)."
    )
    gpu_slot_limit: str | None = Field(
        "gpu-slots",
        min_length=1,
        title="GPU slot limit",
        description="Prefect global concurrency limit held around the separate step on CUDA (one slot per GPU); "
        "a missing limit is skipped with a warning; unset never throttles.",
    )
    precision: PrecisionChoice = Field(
        "auto",
        title="Precision",
        description="Model arithmetic: auto = fp32 on CPU, bf16 (fp16 where bf16 is "
        "unsupported) on GPU. Reduced precision changes the output slightly.",
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        le=512,
        title="Batch size",
        description="Segments per model call; unset: 1 on CPU, from free memory on GPU.",
    )

    @field_validator("model")
    @classmethod
    def _model_name_is_plain(cls, value: str) -> str:
        if "/" in value and not value.startswith("hf://"):
            raise ValueError("model must be a name or signature, not a path; use model_repo for a local folder")
        return value


# FLAC stores integers of up to 24 bits; 32-bit float is wav only.
FLAC_BIT_DEPTHS: tuple[BitDepth, ...] = (16, 24)
# The same rule in the parameter schema, so Prefect's server refuses flac at 32 bits (409) before a run exists.
_FLAC_BIT_DEPTH_SCHEMA: dict[str, Any] = {
    "if": {"properties": {"format": {"const": "flac"}}, "required": ["format"]},
    "then": {"properties": {"bit_depth": {"enum": list(FLAC_BIT_DEPTHS)}}},
}


class OutputSettings(BaseModel):
    """Where and how stems are written."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={"allOf": [_FLAC_BIT_DEPTH_SCHEMA]})

    out: str = Field(
        "./separated",
        min_length=1,
        title="Output location",
        description="Local folder or fsspec URL (s3://bucket/prefix) that receives one folder per track.",
    )
    format: AudioFormat = Field("wav", title="Format", description="Container and codec of the stem files.")
    bit_depth: BitDepth = Field(
        16, title="Bit depth", description="wav: 16/24-bit integer or 32-bit float; flac: 16/24."
    )
    mp3_bitrate: int = Field(320, ge=64, le=320, title="MP3 bitrate (kbit/s)", description="Used when format is mp3.")

    @model_validator(mode="after")
    def _format_supports_bit_depth(self) -> OutputSettings:
        if self.format == "flac" and self.bit_depth not in FLAC_BIT_DEPTHS:
            raise ValueError("flac stores 16 or 24 bits; use wav for 32-bit float")
        return self


def job_key(
    content_sha256: str,
    model_signature: str,
    separation: SeparationSettings,
    output: OutputSettings,
    precision: str = "fp32",
) -> str:
    """Identity of one piece of work: same bytes, same model weights, same output-shaping settings.

    File names, locations and the device do not take part, so renamed or moved files are
    recognised and a GPU host can skip what a CPU host already published. `precision` is the
    resolved one (`auto` depends on the device); float32 adds nothing, so float32 keys stay as they were.
    """
    shaping = {
        "content_sha256": content_sha256,
        "model_signature": model_signature,
        "shifts": separation.shifts,
        "overlap": separation.overlap,
        "segment": separation.segment,
        "two_stems": separation.two_stems,
        "format": output.format,
        "bit_depth": output.bit_depth if output.format != "mp3" else None,
        "mp3_bitrate": output.mp3_bitrate if output.format == "mp3" else None,
    }
    if precision != "fp32":
        shaping["precision"] = precision
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()


class Retention(BaseModel):
    """Which published outputs `stemworks clean` removes. Both off by default: nothing published goes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    superseded: bool = Field(
        False,
        title="Remove superseded outputs",
        description="Remove a track's outputs once the same audio was published again with another model or "
        "settings; the newest stays.",
    )
    older_than_days: float | None = Field(
        None,
        gt=0,
        title="Remove outputs older than (days)",
        description="Remove outputs published more than this many days ago.",
    )


class Housekeeping(BaseModel):
    """How `stemworks clean` judges leftovers whose process cannot be checked from this host."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stale_after_hours: float = Field(
        24.0,
        gt=0,
        title="Stale after (hours)",
        description="Leftovers of runs on other hosts (or without a process record) are removed once this old; "
        "those of dead processes on this host are removed at once.",
    )
    dry_run: bool = Field(False, title="Dry run", description="List what would be removed; change nothing.")


class FanOut(BaseModel):
    """How a library run started from a deployment spreads its tracks over the work pool's workers.

    The tracks are split into shards (by count, balanced by file size); each shard is a flow run of a
    deployment in the same work pool, taken by whichever worker polls. Runs with at most one shard of
    tracks, and runs not started from a deployment (the CLI, plain Python), separate in their own process.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        True, title="Fan out", description="Split a large library over the work pool's workers (deployment runs only)."
    )
    shard_tracks: int = Field(
        16,
        ge=1,
        le=100_000,
        title="Target shard size (tracks)",
        description="Tracks per shard; a library of at most this many tracks is separated in one process.",
    )
    shards_at_once: int = Field(
        8,
        ge=1,
        le=1024,
        title="Shards at once",
        description="Shard flow runs dispatched and not yet finished at any time; the rest wait their turn.",
    )
    deployment: str | None = Field(
        None,
        title="Shard deployment",
        description="'flow/deployment' (or id) the shards run as, in the pool whose workers should take them; "
        "unset: the deployment this run itself runs from.",
    )
    stall_s: float = Field(
        600.0,
        ge=10,
        title="Shard stalled after (s)",
        description="A shard run with no flow-run heartbeat (PREFECT_FLOWS_HEARTBEAT_FREQUENCY, default 180 s) for "
        "this long is marked crashed; its unrecorded tracks are dispatched again.",
    )
    max_attempts: int = Field(
        3,
        ge=1,
        le=20,
        title="Attempts per shard",
        description="How often a shard whose run crashed or was lost is dispatched; its tracks then fail.",
    )


class ShardAssignment(BaseModel):
    """Set by a fanned-out parent run on the shard runs it dispatches; leave unset when starting a run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    parent_run_id: str = Field(min_length=1, title="Parent run", description="Catalog run id of the parent run.")
    index: int = Field(ge=0, title="Shard", description="Index of this shard in the parent's plan.")
    attempt: int = Field(
        1, ge=1, title="Attempt", description="1, then 2, ... when a crashed shard is dispatched again."
    )
