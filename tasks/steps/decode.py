"""Decode the mixture with PyAV into float32 stereo at the model's sample rate."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np

from tasks.core.errors import DecodeError, InvalidAudioError
from tasks.core.records import AudioInfo, DecodedAudio
from tasks.core.settings import Limits
from tasks.io.npyfile import NpyAppender


def decode_blocks(
    path: str | Path, info: AudioInfo, sample_rate: int, limits: Limits, *, source: str | None = None
) -> Iterator[np.ndarray]:
    """Yield (1 or 2, n) float32 blocks as they decode. Lengths come from the samples, never from headers."""
    label = source or str(path)
    max_frames = int(limits.max_seconds * sample_rate) + sample_rate
    total = 0
    # FFmpeg's matrix does multichannel down-mixes; mono is kept mono (callers duplicate it, as
    # Demucs does) instead of FFmpeg's -3 dB centre pan.
    layout = "mono" if info.channels == 1 else "stereo"
    resampler = av.AudioResampler(format="fltp", layout=layout, rate=sample_rate)
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            stream = container.streams.audio[info.stream_index]
            for frame in _then_flush(container.decode(stream)):
                for out in resampler.resample(frame):
                    samples = out.to_ndarray()
                    total = _check(samples, total, max_frames, limits, label)
                    yield samples
    except (InvalidAudioError, DecodeError):
        raise
    except (av.FFmpegError, ValueError) as exc:
        raise DecodeError(f"decoding failed after {total / sample_rate:.1f} s ({exc})", source=label) from None
    if total < max(1, int(limits.min_seconds * sample_rate)):
        raise DecodeError(f"decoded only {total / sample_rate:.3f} s of audio", source=label)


def _then_flush(frames: Iterator[av.AudioFrame]) -> Iterator[av.AudioFrame | None]:
    """The decoded frames, then None: the resampler's signal to flush what it buffered."""
    yield from frames
    yield None


def _check(samples: np.ndarray, total: int, max_frames: int, limits: Limits, label: str) -> int:
    if not np.isfinite(samples).all():
        raise DecodeError(f"audio contains NaN or infinite samples near {total} frames", source=label)
    total += samples.shape[1]
    if total > max_frames:
        raise InvalidAudioError(f"decoded audio runs past the limit of {limits.max_seconds:.0f} s", source=label)
    return total


def decode(
    path: str | Path,
    info: AudioInfo,
    sample_rate: int,
    limits: Limits,
    work_dir: str | Path,
    *,
    source: str | None = None,
) -> DecodedAudio:
    """Decode block by block into a .npy in the work area: memory does not grow with the track's length."""
    target = Path(work_dir) / "mixture.npy"
    with NpyAppender(target) as writer:
        for block in decode_blocks(path, info, sample_rate, limits, source=source):
            writer.append(block)
        frames = writer.finish()
    return DecodedAudio(path=str(target), sample_rate=sample_rate, frames=frames)
