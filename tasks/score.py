"""Reference-free quality numbers for separated stems."""

from __future__ import annotations

import numpy as np

from tasks.records import SeparatedStems, StemQuality, TrackQuality

FLOOR_DB = -150.0  # reported for digital silence instead of -inf, so numbers stay finite in SQL
SILENCE_DBFS = -60.0
FRAME_SECONDS = 0.05


def db(power_ratio: float) -> float:
    return float(max(FLOOR_DB, 10.0 * np.log10(power_ratio))) if power_ratio > 0 else FLOOR_DB


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
    mixture_power = float(np.mean(np.square(mixture, dtype=np.float64)))
    residual = mixture.astype(np.float64) - sum(s.astype(np.float64) for s in stems.values())
    residual_power = float(np.mean(np.square(residual)))
    residual_db = db(residual_power / mixture_power) if mixture_power > 0 else db(residual_power)
    return TrackQuality(
        residual_db=residual_db,
        stems=[stem_quality(name, array, mixture_power, sample_rate) for name, array in stems.items()],
    )


def score(mixture_path: str, separated: SeparatedStems) -> TrackQuality:
    mixture = np.load(mixture_path, mmap_mode="r")
    stems = {name: np.load(path, mmap_mode="r") for name, path in separated.paths.items()}
    return score_arrays(np.asarray(mixture), {k: np.asarray(v) for k, v in stems.items()}, separated.sample_rate)
