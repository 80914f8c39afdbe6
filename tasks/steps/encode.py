"""Encode float32 stereo stems with PyAV: wav (16/24-bit, 32-bit float), flac (16/24-bit), mp3."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Protocol

import av
import numpy as np

from tasks.core.settings import OutputSettings

CHUNK_FRAMES = 65536
EXTENSIONS = {"wav": "wav", "flac": "flac", "mp3": "mp3"}

# Literal, so that PyAV's add_stream knows the stream is an audio one.
Codec = Literal["pcm_s16le", "pcm_s24le", "pcm_f32le", "flac", "libmp3lame"]

# bit depth -> (codec, PyAV sample format fed to the encoder)
_WAV_CODECS: dict[int, tuple[Codec, str]] = {
    16: ("pcm_s16le", "s16"),
    24: ("pcm_s24le", "s32"),
    32: ("pcm_f32le", "flt"),
}
_FLAC_CODECS: dict[int, tuple[Codec, str]] = {16: ("flac", "s16"), 24: ("flac", "s32")}


class Frames(Protocol):
    """(channels, frames) samples that slice as `x[:, a:b]` into arrays: an ndarray, or an NpyAudio read by windows."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, key: tuple[slice, slice], /) -> np.ndarray: ...


def extension(output: OutputSettings) -> str:
    return EXTENSIONS[output.format]


def encode(samples: Frames, sample_rate: int, path: str | Path, output: OutputSettings) -> None:
    """Write `samples` (channels, frames) float32 to `path` in the configured format."""
    # FFmpeg stores s32 input as 24 bits in pcm_s24le and (by default) in flac.
    codec, sample_format = _codec_for(output)
    with av.open(str(path), mode="w", format=output.format) as container:
        stream = container.add_stream(codec, rate=sample_rate, layout="stereo" if samples.shape[0] == 2 else "mono")
        stream.format = sample_format
        if output.format == "mp3":
            stream.bit_rate = output.mp3_bitrate * 1000
        for start in range(0, samples.shape[1], CHUNK_FRAMES):
            frame = _frame(samples[:, start : start + CHUNK_FRAMES], sample_format, sample_rate, start)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def _codec_for(output: OutputSettings) -> tuple[Codec, str]:
    if output.format == "wav":
        return _WAV_CODECS[output.bit_depth]
    if output.format == "flac":
        return _FLAC_CODECS[output.bit_depth]
    return ("libmp3lame", "fltp")


def _frame(chunk: np.ndarray, sample_format: str, sample_rate: int, pts: int) -> av.AudioFrame:
    layout = "stereo" if chunk.shape[0] == 2 else "mono"
    if sample_format == "fltp":
        data = np.ascontiguousarray(chunk, dtype=np.float32)
    else:
        data = _to_packed(chunk, sample_format)
    frame = av.AudioFrame.from_ndarray(data, format=sample_format, layout=layout)
    frame.sample_rate = sample_rate
    frame.pts = pts
    return frame


def _to_packed(chunk: np.ndarray, sample_format: str) -> np.ndarray:
    interleaved = np.ascontiguousarray(chunk.T).reshape(1, -1)
    if sample_format == "flt":
        return interleaved.astype(np.float32)
    clipped = np.clip(interleaved, -1.0, 1.0)
    if sample_format == "s16":
        return np.round(clipped * 32767.0).astype(np.int16)
    # 24-bit samples travel in the top bits of int32, as FFmpeg expects for s32 with 24 raw bits.
    return (np.round(clipped * 8388607.0).astype(np.int32) << 8).astype(np.int32)
