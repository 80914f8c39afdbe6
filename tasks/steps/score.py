"""Reference-free quality numbers for separated stems."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tasks.core.records import SeparatedStems, StemQuality, TrackQuality
from tasks.io.npyfile import NpyAudio

FLOOR_DB = -150.0  # reported for digital silence instead of -inf, so numbers stay finite in SQL
SILENCE_DBFS = -60.0
FRAME_SECONDS = 0.05


def db(power_ratio: float) -> float:
    return float(max(FLOOR_DB, 10.0 * np.log10(power_ratio))) if power_ratio > 0 else FLOOR_DB


WINDOW_FRAMES_PER_SILENCE_FRAME = 400  # windows of 400 x 50 ms = 20 s: silence frames never straddle two


@dataclass
class _StemTotals:
    squares: float = 0.0
    peak: float = 0.0
    clipped: int = 0
    silent_frames: int = 0
    frames: int = 0


def score(mixture_path: str, separated: SeparatedStems) -> TrackQuality:
    """Quality numbers of the whole track, computed window by window so memory does not grow with length."""
    sample_rate = separated.sample_rate
    frame = max(1, int(FRAME_SECONDS * sample_rate))
    mixture = NpyAudio(mixture_path)
    stems = {name: NpyAudio(path) for name, path in separated.paths.items()}
    totals = {name: _StemTotals() for name in stems}
    mixture_squares = residual_squares = 0.0
    try:
        for start, stop in mixture.windows(frame * WINDOW_FRAMES_PER_SILENCE_FRAME):
            mix = mixture.read(start, stop).astype(np.float64)
            residual = mix.copy()
            mixture_squares += float(np.square(mix).sum())
            for name, stem in stems.items():
                block = stem.read(start, stop)
                residual -= block
                _accumulate(totals[name], block, frame)
            residual_squares += float(np.square(residual).sum())
    finally:
        for audio in (mixture, *stems.values()):
            audio.close()
    samples = mixture.channels * mixture.frames
    mixture_power = mixture_squares / samples
    residual_power = residual_squares / samples
    return TrackQuality(
        residual_db=db(residual_power / mixture_power) if mixture_power > 0 else db(residual_power),
        stems=[_quality(name, t, samples, mixture_power) for name, t in totals.items()],
    )


def _accumulate(totals: _StemTotals, block: np.ndarray, frame: int) -> None:
    totals.squares += float(np.square(block, dtype=np.float64).sum())
    totals.peak = max(totals.peak, float(np.max(np.abs(block))) if block.size else 0.0)
    totals.clipped += int(np.count_nonzero(np.abs(block) >= 1.0))
    count = block.shape[-1] // frame
    if count:
        framed = block[:, : count * frame].reshape(block.shape[0], count, frame)
        rms_db = 10.0 * np.log10(np.mean(np.square(framed, dtype=np.float64), axis=(0, 2)) + 1e-20)
        totals.silent_frames += int(np.count_nonzero(rms_db < SILENCE_DBFS))
        totals.frames += count


def _quality(stem: str, totals: _StemTotals, samples: int, mixture_power: float) -> StemQuality:
    power = totals.squares / samples if samples else 0.0
    return StemQuality(
        stem=stem,
        peak_dbfs=db(totals.peak**2),
        rms_dbfs=db(power),
        silence_ratio=totals.silent_frames / totals.frames if totals.frames else 1.0,
        clipped_ratio=totals.clipped / samples if samples else 0.0,
        energy_share_db=db(power / mixture_power) if mixture_power > 0 else FLOOR_DB,
    )
