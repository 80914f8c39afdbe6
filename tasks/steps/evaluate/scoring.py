"""Step `evaluate`: score one item's published stems against its references.

Scores are museval's (BSSEval v4 medians over 1 s windows, `bsseval`) and the MDX challenges' simple SDR
(`nsdr`), whole-track and chunk-median. Evaluation happens at the model's sample rate (the rate of the published
stems), with windows of one second at that rate: at 44.1 kHz, exactly museval's and SiSEC 2018's settings.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from tasks.core.errors import StemworksError
from tasks.core.evaluation import DatasetItem, StemScore
from tasks.core.records import PublishedStem
from tasks.core.settings import Limits
from tasks.steps.evaluate import bsseval
from tasks.steps.evaluate.bsseval import SilentSourceError
from tasks.steps.evaluate.datasets import check_references, decode_file, load_references, local_copy, reference_parts
from tasks.steps.evaluate.nsdr import median_chunk_nsdr, nsdr
from tasks.steps.fetch import fetch
from tasks.steps.validate import probe

# Changes whenever a score would change for the same stems: stored in every `evaluations` row.
EVALUATOR_VERSION = "stemworks-eval 1: BSSEval v4 as museval 0.4.1 (1 s windows, TrackStore medians); MDX nSDR"


class EvaluationError(StemworksError):
    """The stems or references of an item could not be scored."""

    step = "unknown"


def score_arrays(references: np.ndarray, estimates: np.ndarray, stems: list[str], sample_rate: int) -> list[StemScore]:
    """Scores of (stems, samples, channels) estimates against references of the same layout, in dB.

    The estimates are cut or zero-padded to the references' length first, as museval does. A source that is
    all zeros (museval refuses the whole track) leaves the BSSEval values of every stem None; nSDR is defined.
    """
    window = sample_rate  # one second, as museval at 44.1 kHz
    estimates = bsseval.pad_or_truncate(torch.as_tensor(estimates), references.shape[1]).numpy()
    whole = nsdr(references, estimates).tolist()
    chunks = median_chunk_nsdr(references, estimates, chunk=window, hop=window).tolist()
    try:
        frames = bsseval.bss_eval_v4(references, estimates, window=window, hop=window)
        medians: list[bsseval.StemMetrics | None] = list(bsseval.aggregate(frames))
        stable: bool | None = frames.stable
    except SilentSourceError:
        medians, stable = [None] * len(stems), None
    return [
        StemScore(
            stem=stem,
            sdr=_finite(m.sdr) if m else None,
            sir=_finite(m.sir) if m else None,
            isr=_finite(m.isr) if m else None,
            sar=_finite(m.sar) if m else None,
            nsdr=whole[i],
            nsdr_chunk_median=chunks[i],
            bsseval_stable=stable,
        )
        for i, (stem, m) in enumerate(zip(stems, medians, strict=True))
    ]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def score_item(
    item: DatasetItem, stems: list[PublishedStem], sample_rate: int, limits: Limits, work_dir: str | Path
) -> tuple[list[StemScore], float, float]:
    """Fetch and decode the published `stems`, fetch (from an object store) and decode the item's references,
    score them.

    Returns (scores, audio seconds evaluated, wall seconds taken). Raises ReferencesError for missing or
    mismatched references, EvaluationError for stems that cannot be read.
    """
    started = time.perf_counter()
    names = [s.stem for s in stems]
    local = local_copy(item, names, Path(work_dir) / "references", limits)  # an object store's files, fetched
    mixture = check_references(local, names, limits)
    parts = reference_parts(local, names)
    references = load_references(local, mixture, parts, sample_rate, limits)
    estimates = np.stack(
        [_pad(_decode_stem(stem, sample_rate, limits, Path(work_dir)), references.shape[1]) for stem in stems]
    )
    scores = score_arrays(references, estimates, names, sample_rate)
    return scores, references.shape[1] / sample_rate, time.perf_counter() - started


def _pad(audio: np.ndarray, length: int) -> np.ndarray:
    if audio.shape[0] >= length:
        return audio[:length]
    return np.pad(audio, ((0, length - audio.shape[0]), (0, 0)))


def _decode_stem(stem: PublishedStem, sample_rate: int, limits: Limits, work_dir: Path) -> np.ndarray:
    folder = work_dir / f"estimate-{stem.stem}"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fetched = fetch(stem.uri, folder, limits)
        info = probe(fetched.local_path, limits, source=stem.uri)
        return decode_file(fetched.local_path, info, sample_rate, limits, label=stem.uri)
    except StemworksError as exc:
        raise EvaluationError(f"published stem {stem.stem!r} cannot be read: {exc}", source=stem.uri) from None
