"""Probe a file with PyAV (headers plus one decoded frame) and hold it to the configured limits."""

from __future__ import annotations

import os
import time
from pathlib import Path

import av

from tasks.core.errors import InvalidAudioError
from tasks.core.records import AudioInfo
from tasks.core.settings import Limits
from tasks.io.faults import NotRegularFileError
from tasks.io.hashcopy import require_regular

# Time limits of a probe (headers and the first decoded frame). FFmpeg checks the first two at every
# read of the file, and while it analyses the streams; the whole probe is checked between frames.
PROBE_OPEN_TIMEOUT_S = 30.0  # opening the file and analysing its streams
PROBE_READ_TIMEOUT_S = 30.0  # any one packet read
PROBE_TIMEOUT_S = 60.0  # the whole probe, up to the first decoded frame

# PyAV/FFmpeg demuxer names we accept; the mp4 family covers .m4a and NI .stem.mp4.
ALLOWED_CONTAINERS = frozenset({"wav", "flac", "mp3", "ogg", "mov,mp4,m4a,3gp,3g2,mj2", "aac", "aiff"})
ALLOWED_CODECS = frozenset(
    {
        "pcm_s16le",
        "pcm_s24le",
        "pcm_s32le",
        "pcm_f32le",
        "pcm_f64le",
        "pcm_u8",
        "pcm_s16be",
        "pcm_s24be",
        "pcm_s32be",
        "pcm_f32be",
        "pcm_f64be",
        "flac",
        "mp3",
        "mp3float",
        "vorbis",
        "opus",
        "aac",
        "alac",
    }
)
STEM_SUFFIXES = (".stem.mp4", ".stem.m4a")
NI_STEM_STREAMS = 5  # mixture, drums, bass, other, vocals


def probe(path: str | Path, limits: Limits, *, source: str | None = None) -> AudioInfo:
    """Read headers and the first audio frame; raise InvalidAudioError naming the reason."""
    path = Path(path)
    label = source or str(path)
    try:
        require_regular(path)  # FFmpeg's open() of a FIFO would block forever, beyond any timeout
    except NotRegularFileError as exc:
        raise InvalidAudioError(str(exc), source=label) from None
    size = os.path.getsize(path)
    if size == 0:
        raise InvalidAudioError("file is empty", source=label)
    if size > limits.max_file_bytes:
        raise InvalidAudioError(f"file is {size} bytes, over the limit of {limits.max_file_bytes}", source=label)
    try:
        deadline = time.monotonic() + PROBE_TIMEOUT_S
        timeouts = (PROBE_OPEN_TIMEOUT_S, PROBE_READ_TIMEOUT_S)
        with av.open(str(path), metadata_errors="ignore", timeout=timeouts) as container:
            info = _describe(container, path)
            _decode_first_frame(container, info.stream_index, deadline)
    except InvalidAudioError as exc:
        exc.source = label
        raise
    except av.ExitError:  # FFmpeg gave up at one of our timeouts
        raise InvalidAudioError(
            f"probing timed out (stream analysis over {PROBE_OPEN_TIMEOUT_S:g} s "
            f"or a read over {PROBE_READ_TIMEOUT_S:g} s)",
            source=label,
        ) from None
    except (av.FFmpegError, UnicodeDecodeError, ValueError, IndexError) as exc:
        raise InvalidAudioError(f"not readable as audio ({_ffmpeg_reason(exc)})", source=label) from None
    check_limits(info, limits, source=label)
    return info


def _describe(container: av.container.InputContainer, path: Path) -> AudioInfo:
    fmt = container.format.name
    if fmt not in ALLOWED_CONTAINERS:
        raise InvalidAudioError(f"container '{fmt}' is not supported")
    audio = container.streams.audio
    if not audio:
        raise InvalidAudioError(f"container '{fmt}' has no audio stream")
    stream = audio[0]  # NI stems keep the mixture first; other files have one audio stream
    codec = stream.codec_context.name
    if codec not in ALLOWED_CODECS:
        raise InvalidAudioError(f"audio codec '{codec}' is not supported")
    return AudioInfo(
        container=fmt,
        codec=codec,
        stream_index=0,
        audio_streams=len(audio),
        sample_rate=int(stream.codec_context.sample_rate or 0),
        channels=int(stream.codec_context.channels or 0),
        seconds=_claimed_seconds(container, stream),
        is_stem_file=path.name.lower().endswith(STEM_SUFFIXES) or len(audio) == NI_STEM_STREAMS,
    )


def _claimed_seconds(container: av.container.InputContainer, stream: av.audio.stream.AudioStream) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return 0.0  # unknown: decode enforces the duration limit on the samples themselves


def _decode_first_frame(container: av.container.InputContainer, stream_index: int, deadline: float) -> None:
    stream = container.streams.audio[stream_index]
    for frame in container.decode(stream):
        if frame.samples > 0:
            return
        if time.monotonic() > deadline:
            raise InvalidAudioError(f"no audio decoded within {PROBE_TIMEOUT_S:g} s")
    raise InvalidAudioError("audio stream holds no decodable samples")


def check_limits(info: AudioInfo, limits: Limits, *, source: str) -> None:
    if not limits.min_sample_rate <= info.sample_rate <= limits.max_sample_rate:
        raise InvalidAudioError(
            f"sample rate {info.sample_rate} Hz is outside {limits.min_sample_rate}-{limits.max_sample_rate} Hz",
            source=source,
        )
    if not 1 <= info.channels <= limits.max_channels:
        raise InvalidAudioError(f"{info.channels} channels is outside 1-{limits.max_channels}", source=source)
    if info.seconds > limits.max_seconds:
        raise InvalidAudioError(
            f"duration {info.seconds:.1f} s is over the limit of {limits.max_seconds:.0f} s", source=source
        )
    if 0 < info.seconds < limits.min_seconds:
        raise InvalidAudioError(
            f"duration {info.seconds:.3f} s is under the minimum of {limits.min_seconds} s", source=source
        )


def _ffmpeg_reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc)
    return text.split(": '", 1)[0].strip() or type(exc).__name__
