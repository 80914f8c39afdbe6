"""In-memory audio for tests and benchmarks: what the pipeline streams through files, held in arrays.

The pipeline never holds a track in memory (`tasks.steps.decode.decode` writes a .npy block by block,
`tasks.steps.score.score` reads it window by window); these are the whole-array references that tests
compare those against, and a convenient decoder for short inputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.core.records import AudioInfo, StemQuality, TrackQuality
from tasks.core.settings import Limits
from tasks.steps.decode import decode_blocks
from tasks.steps.score import FLOOR_DB, FRAME_SECONDS, SILENCE_DBFS, db


def decode_to_array(
    path: str | Path, info: AudioInfo, sample_rate: int, limits: Limits, *, source: str | None = None
) -> np.ndarray:
    """Return (2, frames) float32 in memory (short inputs, tests); runs use `decode`, which streams to disk."""
    audio = np.concatenate(list(decode_blocks(path, info, sample_rate, limits, source=source)), axis=1)
    if audio.shape[0] == 1:
        audio = np.repeat(audio, 2, axis=0)
    return np.ascontiguousarray(audio, dtype=np.float32)


def stem_quality(stem: str, samples: np.ndarray, mixture_power: float, sample_rate: int) -> StemQuality:
    power = float(np.mean(np.square(samples, dtype=np.float64)))
    peak = float(np.max(np.abs(samples))) if samples.size else 0.0
    return StemQuality(
        stem=stem,
        peak_dbfs=db(peak**2),
        rms_dbfs=db(power),
        silence_ratio=silence_ratio(samples, sample_rate),
        clipped_ratio=float(np.mean(np.abs(samples) >= 1.0)),
        energy_share_db=db(power / mixture_power) if mixture_power > 0 else FLOOR_DB,
    )


def silence_ratio(samples: np.ndarray, sample_rate: int) -> float:
    """Share of 50 ms frames whose RMS (over both channels) is below -60 dBFS."""
    frame = max(1, int(FRAME_SECONDS * sample_rate))
    count = samples.shape[-1] // frame
    if count == 0:
        return 1.0
    framed = samples[:, : count * frame].reshape(samples.shape[0], count, frame)
    rms_db = 10.0 * np.log10(np.mean(np.square(framed, dtype=np.float64), axis=(0, 2)) + 1e-20)
    return float(np.mean(rms_db < SILENCE_DBFS))


def score_arrays(mixture: np.ndarray, stems: dict[str, np.ndarray], sample_rate: int) -> TrackQuality:
    """What `tasks.steps.score.score` computes window by window, over whole arrays at once."""
    mixture_power = float(np.mean(np.square(mixture, dtype=np.float64)))
    residual = mixture.astype(np.float64) - sum(s.astype(np.float64) for s in stems.values())
    residual_power = float(np.mean(np.square(residual)))
    residual_db = db(residual_power / mixture_power) if mixture_power > 0 else db(residual_power)
    return TrackQuality(
        residual_db=residual_db,
        stems=[stem_quality(name, array, mixture_power, sample_rate) for name, array in stems.items()],
    )
