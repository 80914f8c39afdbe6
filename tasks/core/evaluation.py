"""Records of an evaluation against reference stems: the items of a dataset and their scores.

Defined here, in the shared vocabulary, because the steps produce them, the flow carries them and the
catalog stores them (the catalog never imports the steps).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AwareDatetime, Field

from tasks.core.records import Record, RunRecord

# Where `evaluate` writes a run's report and its evaluations file: <out>/_evaluations/<run id>/.
REPORT_FOLDER = "_evaluations"
EVALUATIONS_FILE = "evaluations.json"
EvaluationsFormat = Literal["stemworks-evaluations/1"]

# What a dataset item's references are stored as: an NI stem file (mixture and stems as audio streams of one
# file) or a folder holding mixture.<ext> beside <stem>.<ext> (the MUSDB18 / MUSDB18-HQ layout).
Layout = Literal["ni-stems", "folder"]
ItemStatus = Literal["evaluated", "failed"]
# Where an item failed: its references, its separation through the pipeline, or scoring it.
EvaluationStage = Literal["references", "separate", "evaluate", "catalog"]


class ReferenceSource(Record):
    """Where one reference stem is: a file, and the audio stream in it (NI stem files hold several)."""

    stem: str
    path: str
    stream_index: int = 0
    origin: str | None = Field(
        default=None, description="The object-store URL `path` was fetched from (path is then a local copy)."
    )


class DatasetItem(Record):
    """One track with true stems: the mixture the pipeline separates, and where each reference stem is."""

    name: str = Field(description="Stable, readable name: the path inside the dataset's parent folder.")
    dataset: str = Field(description="The dataset location as given.")
    layout: Layout
    mixture: str = Field(description="The mixture's file: what the pipeline separates.")
    mixture_stream: int = 0
    references: dict[str, ReferenceSource] = Field(default_factory=dict, description="Stem -> its reference.")
    origin: str | None = Field(
        default=None, description="The object-store URL `mixture` was fetched from (mixture is then a local copy)."
    )


class StemScore(Record):
    """One estimated stem against its reference, in dB. BSSEval values are None where museval gives none
    (a silent source makes it refuse the track; windows whose ratios are all infinite have no median)."""

    stem: str
    sdr: float | None = Field(description="BSSEval v4 SDR, median over 1 s windows (museval 0.4.1).")
    sir: float | None
    isr: float | None
    sar: float | None
    nsdr: float = Field(description="Whole-track simple SDR of the MDX challenges and Demucs.")
    nsdr_chunk_median: float = Field(description="Median over 1 s chunks of the simple SDR (cSDR).")
    bsseval_stable: bool | None = Field(
        default=None,
        description="False where the references' Gram matrix is singular: ISR, SIR and SAR are rounding noise.",
    )


class ItemEvaluation(Record):
    """What happened to one dataset item in one evaluation run, and its scores when it got that far."""

    item: str
    dataset: str
    mixture: str
    status: ItemStatus
    error: str | None = None
    error_stage: EvaluationStage | None = None
    separation_status: str | None = Field(default=None, description="The track's status in the pipeline.")
    content_sha256: str | None = None
    job_key: str | None = None
    manifest_uri: str | None = None
    sample_rate: int | None = None
    seconds: float | None = Field(default=None, description="Audio seconds evaluated.")
    evaluate_s: float | None = Field(
        default=None, description="Wall seconds spent beyond separation: decoding references and stems, scoring."
    )
    scores: list[StemScore] = Field(default_factory=list)


class EvaluationContext(Record):
    """What every row of one evaluation run shares: the configuration evaluated, and by what."""

    run_id: str
    model_name: str
    model_signature: str | None
    config: str = Field(description="Short label of the output-shaping settings, e.g. 'htdemucs shifts=1 ...'.")
    parameters: dict[str, Any] = Field(description="Every setting of the run, JSON-able.")
    evaluator_version: str
    evaluated_at: AwareDatetime


class EvaluationRecord(Record):
    """What `evaluate` writes beside its report (EVALUATIONS_FILE): the run, what its rows share and every
    item, so that `catalog rebuild` restores the `evaluations` rows, which no manifest holds."""

    format: EvaluationsFormat = "stemworks-evaluations/1"
    run: RunRecord
    context: EvaluationContext
    items: list[ItemEvaluation]
