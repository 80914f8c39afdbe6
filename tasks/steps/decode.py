"""Decode the mixture with PyAV into float32 stereo at the model's sample rate."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np

from tasks.core.errors import DecodeError, InvalidAudioError
from tasks.core.records import AudioInfo, DecodedAudio
from tasks.core.settings import Limits
from tasks.io.faults import NotRegularFileError
from tasks.io.hashcopy import require_regular
from tasks.io.npyfile import NpyAppender

# Decoded audio may run this much past `limits.max_seconds` (codec priming and padding: a few thousand
# samples at most) before decoding stops; so the scratch `.npy` of a track never exceeds
# frame_limit x 2 channels x 4 bytes, whatever its header claims.
DURATION_TOLERANCE_S = 0.5
# A decoded sample beyond ±1000 (+60 dBFS; full scale is ±1) is not audio: float files with absurd
# values are refused instead of being separated into stems of noise.
MAX_SAMPLE_PEAK = 1000.0
# Time limits of decoding. FFmpeg checks the first two at every read of the file; the whole decode is
# checked between frames, and must run at DECODE_MIN_SPEED times real time (after DECODE_GRACE_S), so
# the longest allowed track (Limits.max_seconds, 4 h by default) may take 60 s + 1 h.
DECODE_OPEN_TIMEOUT_S = 30.0
DECODE_READ_TIMEOUT_S = 30.0
DECODE_GRACE_S = 60.0
DECODE_MIN_SPEED = 4.0


class DecodedTooLongError(InvalidAudioError):
    """The decoded samples run past the duration limit: a limit broken (never retried), found while decoding."""

    step = "decode"  # type: ignore[assignment]  # InvalidAudioError's step is "validate"; this one is found later


def frame_limit(limits: Limits, sample_rate: int) -> int:
    """The most frames decoding may produce before it stops: the duration limit plus DURATION_TOLERANCE_S."""
    return math.ceil((limits.max_seconds + DURATION_TOLERANCE_S) * sample_rate)


def decode_timeout(limits: Limits) -> float:
    """Seconds a decode may take: DECODE_GRACE_S plus the longest allowed track at DECODE_MIN_SPEED."""
    return DECODE_GRACE_S + limits.max_seconds / DECODE_MIN_SPEED


def decode_blocks(
    path: str | Path,
    info: AudioInfo,
    sample_rate: int,
    limits: Limits,
    *,
    source: str | None = None,
    timeout_s: float | None = None,
) -> Iterator[np.ndarray]:
    """Yield (1 or 2, n) float32 blocks as they decode. Lengths come from the samples, never from headers.

    A block that would take the total past `frame_limit` is never yielded: decoding stops with
    DecodedTooLongError. `timeout_s` (default `decode_timeout(limits)`) bounds the whole decode.
    """
    label = source or str(path)
    max_frames = frame_limit(limits, sample_rate)
    budget = decode_timeout(limits) if timeout_s is None else timeout_s
    deadline = time.monotonic() + budget
    total = 0
    # FFmpeg's matrix does multichannel down-mixes; mono is kept mono (callers duplicate it, as
    # Demucs does) instead of FFmpeg's -3 dB centre pan.
    layout = "mono" if info.channels == 1 else "stereo"
    resampler = av.AudioResampler(format="fltp", layout=layout, rate=sample_rate)
    try:
        require_regular(path)  # FFmpeg's open() of a FIFO would block forever, beyond any timeout
        timeouts = (DECODE_OPEN_TIMEOUT_S, DECODE_READ_TIMEOUT_S)
        with av.open(str(path), metadata_errors="ignore", timeout=timeouts) as container:
            stream = container.streams.audio[info.stream_index]
            for frame in _then_flush(container.decode(stream)):
                for out in resampler.resample(frame):
                    samples = out.to_ndarray()
                    total = _check(samples, total, max_frames, limits, label, sample_rate)
                    yield samples
                if time.monotonic() > deadline:
                    raise DecodeError(
                        f"decoding took longer than {budget:g} s (stopped at {total / sample_rate:.1f} s)",
                        source=label,
                    )
    except (InvalidAudioError, DecodeError):
        raise
    except NotRegularFileError as exc:
        raise DecodeError(str(exc), source=label) from None
    except av.ExitError:  # FFmpeg gave up at one of our timeouts
        raise DecodeError(
            f"decoding stalled: a read took over {DECODE_READ_TIMEOUT_S:g} s after {total / sample_rate:.1f} s",
            source=label,
        ) from None
    except (av.FFmpegError, ValueError) as exc:
        raise DecodeError(f"decoding failed after {total / sample_rate:.1f} s ({exc})", source=label) from None
    except OSError as exc:  # the work copy itself could not be looked at (FFmpeg's own errors are caught above)
        raise DecodeError(f"cannot read the fetched copy: {exc.strerror or exc}", source=label) from None
    if total < max(1, int(limits.min_seconds * sample_rate)):
        raise DecodeError(f"decoded only {total / sample_rate:.3f} s of audio", source=label)


def _then_flush(frames: Iterator[av.AudioFrame]) -> Iterator[av.AudioFrame | None]:
    """The decoded frames, then None: the resampler's signal to flush what it buffered."""
    yield from frames
    yield None


def _check(samples: np.ndarray, total: int, max_frames: int, limits: Limits, label: str, sample_rate: int) -> int:
    """The new total of frames, once `samples` passed every check; raises before the block is used."""
    if not np.isfinite(samples).all():
        raise DecodeError(f"audio contains NaN or infinite samples near {total} frames", source=label)
    peak = float(np.abs(samples).max(initial=0.0))
    if peak > MAX_SAMPLE_PEAK:
        raise DecodeError(
            f"sample peak {20 * math.log10(peak):+.0f} dBFS near {total / sample_rate:.1f} s is out of range "
            f"(the limit is {20 * math.log10(MAX_SAMPLE_PEAK):+.0f} dBFS): not valid audio",
            source=label,
        )
    total += samples.shape[1]
    if total > max_frames:
        raise DecodedTooLongError(
            f"decoded audio runs past the limit of {limits.max_seconds:g} s (stopped at {total / sample_rate:.1f} s)",
            source=label,
        )
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
    """Decode block by block into a .npy in the work area: memory does not grow with the track's length,
    and the file never grows past `frame_limit` frames (a block that would pass it is never written)."""
    target = Path(work_dir) / "mixture.npy"
    with NpyAppender(target) as writer:
        for block in decode_blocks(path, info, sample_rate, limits, source=source):
            writer.append(block)
        frames = writer.finish()
    return DecodedAudio(path=str(target), sample_rate=sample_rate, frames=frames)
