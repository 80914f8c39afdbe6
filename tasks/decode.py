"""Decode the mixture with PyAV into float32 stereo at the model's sample rate."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

from tasks.errors import DecodeError, ValidationError
from tasks.records import AudioInfo, DecodedAudio
from tasks.settings import Limits


def decode_to_array(path: str | Path, info: AudioInfo, sample_rate: int, limits: Limits,
                    *, source: str | None = None) -> np.ndarray:
    """Return (2, frames) float32. Lengths come from the decoded samples, never from headers."""
    label = source or str(path)
    max_frames = int(limits.max_seconds * sample_rate) + sample_rate
    chunks: list[np.ndarray] = []
    total = 0
    # FFmpeg's matrix does multichannel down-mixes; mono is kept mono and duplicated below,
    # as Demucs does, instead of FFmpeg's -3 dB centre pan.
    layout = "mono" if info.channels == 1 else "stereo"
    resampler = av.AudioResampler(format="fltp", layout=layout, rate=sample_rate)
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            stream = container.streams.audio[info.stream_index]
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    total = _append(chunks, out.to_ndarray(), total, max_frames, limits, label)
            for out in resampler.resample(None):
                total = _append(chunks, out.to_ndarray(), total, max_frames, limits, label)
    except (ValidationError, DecodeError):
        raise
    except (av.FFmpegError, ValueError) as exc:
        raise DecodeError(f"decoding failed after {total / sample_rate:.1f} s ({exc})", source=label) from None
    if total < max(1, int(limits.min_seconds * sample_rate)):
        raise DecodeError(f"decoded only {total / sample_rate:.3f} s of audio", source=label)
    audio = np.concatenate(chunks, axis=1)
    if audio.shape[0] == 1:
        audio = np.repeat(audio, 2, axis=0)
    return np.ascontiguousarray(audio, dtype=np.float32)


def _append(chunks: list[np.ndarray], samples: np.ndarray, total: int, max_frames: int,
            limits: Limits, label: str) -> int:
    if not np.isfinite(samples).all():
        raise DecodeError(f"audio contains NaN or infinite samples near {total} frames", source=label)
    total += samples.shape[1]
    if total > max_frames:
        raise ValidationError(f"decoded audio runs past the limit of {limits.max_seconds:.0f} s", source=label)
    chunks.append(samples)
    return total


def decode(path: str | Path, info: AudioInfo, sample_rate: int, limits: Limits, work_dir: str | Path,
           *, source: str | None = None) -> DecodedAudio:
    """Decode to a .npy in the work area and describe it."""
    audio = decode_to_array(path, info, sample_rate, limits, source=source)
    target = Path(work_dir) / "mixture.npy"
    np.save(target, audio)
    return DecodedAudio(path=str(target), sample_rate=sample_rate, frames=audio.shape[1])
