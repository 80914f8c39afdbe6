"""Synthetic audio for tests: music-like signals written in every container/codec we accept."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

# (container format, codec, sample format fed to the encoder)
CODECS: dict[str, tuple[str, str, str]] = {
    "wav": ("wav", "pcm_s16le", "s16"),
    "wav24": ("wav", "pcm_s24le", "s32"),
    "wavf32": ("wav", "pcm_f32le", "flt"),
    "flac": ("flac", "flac", "s16"),
    "mp3": ("mp3", "libmp3lame", "fltp"),
    "ogg": ("ogg", "vorbis", "fltp"),
    "opus": ("ogg", "libopus", "flt"),
    "m4a": ("ipod", "aac", "fltp"),
    "alac": ("ipod", "alac", "s16p"),
}
EXTENSIONS = {"wav24": "wav", "wavf32": "wav", "opus": "opus", "alac": "m4a"}


def music(seconds: float, sample_rate: int = 44100, channels: int = 2, seed: int = 0) -> np.ndarray:
    """A short 'song': bass line, chord tones, a noisy hi-hat pattern; (channels, frames) float32 in ±0.8."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    bass = 0.3 * np.sin(2 * np.pi * 55 * (1 + (t // 0.5 % 2)) * t)
    chord = sum(0.1 * np.sin(2 * np.pi * f * t) for f in (261.6, 329.6, 392.0))
    hat = 0.15 * rng.standard_normal(t.size) * (np.mod(t, 0.25) < 0.03)
    mono = bass + chord + hat
    pan = np.linspace(0.8, 1.2, channels)[:, None]
    return np.clip(mono[None, :] * pan, -0.8, 0.8).astype(np.float32)


def _frame(chunk: np.ndarray, sample_format: str, rate: int, layout: str, pts: int) -> av.AudioFrame:
    planar = sample_format.endswith("p")
    if sample_format.startswith("s16"):
        data = np.round(chunk * 32767).astype(np.int16)
    elif sample_format.startswith("s32"):
        data = np.round(chunk * 8388607).astype(np.int32) << 8
    else:
        data = chunk.astype(np.float32)
    data = np.ascontiguousarray(data if planar else data.T.reshape(1, -1))
    frame = av.AudioFrame.from_ndarray(data, format=sample_format, layout=layout)
    frame.sample_rate, frame.pts = rate, pts
    return frame


def write_audio(path: Path, audio: np.ndarray | list[np.ndarray], sample_rate: int = 44100, kind: str = "wav") -> Path:
    """Encode one array, or several as separate audio streams (NI stems), into `path`."""
    container_format, codec, sample_format = CODECS[kind]
    streams_audio = audio if isinstance(audio, list) else [audio]
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format=container_format) as container:
        streams = []
        for data in streams_audio:
            layout = {1: "mono", 2: "stereo", 6: "5.1"}[data.shape[0]]
            # FFmpeg's native vorbis encoder is flagged experimental; it is what ships in PyAV's wheels.
            stream = container.add_stream(codec, rate=sample_rate, layout=layout, options={"strict": "experimental"})
            stream.format = sample_format
            streams.append((stream, data, layout))
        for stream, data, layout in streams:
            for start in range(0, data.shape[1], 4096):
                frame = _frame(data[:, start : start + 4096], sample_format, sample_rate, layout, start)
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode(None):
                container.mux(packet)
    return path


def audio_file(
    directory: Path,
    name: str,
    kind: str = "wav",
    seconds: float = 2.0,
    sample_rate: int = 44100,
    channels: int = 2,
    seed: int = 0,
) -> Path:
    return write_audio(directory / name, music(seconds, sample_rate, channels, seed), sample_rate, kind)


def stem_file(path: Path, seconds: float = 2.0, kind: str = "m4a") -> Path:
    """An NI-style stem file: five stereo streams, the mixture first, then drums, bass, other, vocals."""
    parts = [music(seconds, seed=seed) * 0.25 for seed in range(1, 5)]
    return write_audio(path, [sum(parts), *parts], 44100, kind)


def float_wav_with_nan(path: Path, seconds: float = 1.0) -> Path:
    audio = music(seconds)
    audio[:, audio.shape[1] // 2] = np.nan
    return write_audio(path, audio, 44100, "wavf32")


REFERENCE_STEMS = ("drums", "bass", "other", "vocals")


def reference_folder(folder: Path, seconds: float = 2.0, *, skip: str | None = None, **odd: dict) -> Path:
    """mixture.wav beside one wav per stem (synthetic music); `odd` changes a stem: {stem: {seconds|rate|channels}}."""
    parts = {stem: music(seconds, seed=seed) * 0.25 for seed, stem in enumerate(REFERENCE_STEMS, start=1)}
    write_audio(folder / "mixture.wav", sum(parts.values()))
    for stem in parts:
        if stem == skip:
            continue
        change = odd.get(stem, {})
        rate = change.get("rate", 44100)
        channels = change.get("channels", 2)
        length = change.get("seconds", seconds)
        write_audio(folder / f"{stem}.wav", music(length, rate, channels, seed=7) * 0.25, rate)
    return folder
