"""validate + decode + encode on real encoded audio of every accepted format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.core.errors import DecodeError, InvalidAudioError
from tasks.core.settings import Limits, OutputSettings
from tasks.steps.encode import encode
from tasks.steps.validate import probe
from tests.helpers.audio import decode_to_array
from tests.helpers.audiogen import CODECS, EXTENSIONS, audio_file, float_wav_with_nan, music, stem_file

SR = 44100
# Lossy codecs add encoder delay/padding; a decoded length within one codec frame is faithful.
FRAME_TOLERANCE = {"mp3": 1152, "ogg": 2048, "opus": 960, "m4a": 2048}


@pytest.mark.parametrize("kind", sorted(CODECS))
def test_every_accepted_format_decodes_to_stereo_at_model_rate(tmp_path: Path, kind: str) -> None:
    rate = 48000 if kind == "opus" else SR
    path = audio_file(tmp_path, f"song.{EXTENSIONS.get(kind, kind)}", kind, seconds=1.5, sample_rate=rate)
    info = probe(path, Limits())
    audio = decode_to_array(path, info, SR, Limits())
    assert audio.dtype == np.float32 and audio.shape[0] == 2
    assert abs(audio.shape[1] - int(1.5 * SR)) <= FRAME_TOLERANCE.get(kind, 0)
    assert np.isfinite(audio).all() and 0.1 < np.abs(audio).max() < 1.5  # lossy codecs overshoot a little


@pytest.mark.parametrize("rate,channels", [(22050, 1), (48000, 2), (96000, 2), (44100, 6)])
def test_resample_and_channel_mix(tmp_path: Path, rate: int, channels: int) -> None:
    path = audio_file(tmp_path, "odd.flac", "flac", seconds=1.0, sample_rate=rate, channels=channels)
    info = probe(path, Limits())
    assert (info.sample_rate, info.channels) == (rate, channels)
    audio = decode_to_array(path, info, SR, Limits())
    assert audio.shape == (2, SR)
    if channels == 1:  # mono is duplicated, not panned down
        np.testing.assert_array_equal(audio[0], audio[1])


def test_ni_stem_file_uses_the_mixture_stream(tmp_path: Path) -> None:
    path = stem_file(tmp_path / "track.stem.mp4", seconds=1.0)
    info = probe(path, Limits())
    assert info.is_stem_file and info.audio_streams == 5 and info.stream_index == 0


@pytest.mark.testdata
def test_real_musdb_stem_files(testdata: Path) -> None:
    for path in sorted((testdata / "musdb7").iterdir()):
        info = probe(path, Limits())
        audio = decode_to_array(path, info, SR, Limits())
        assert info.is_stem_file and info.audio_streams == 5
        assert abs(audio.shape[1] / SR - info.seconds) < 0.05, path.name


@pytest.mark.parametrize(
    "content,reason",
    [
        (b"", "empty"),
        (b"this is a text file, not audio\n" * 20, "not readable as audio"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", "not readable as audio"),
    ],
)
def test_garbage_is_rejected_with_a_reason(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "broken.wav"
    path.write_bytes(content)
    with pytest.raises(InvalidAudioError, match=reason) as caught:
        probe(path, Limits())
    assert "broken.wav" in str(caught.value) and not caught.value.retryable


def test_truncated_flac_is_rejected(tmp_path: Path) -> None:
    good = audio_file(tmp_path, "good.flac", "flac", seconds=1.0)
    cut = tmp_path / "cut.flac"
    cut.write_bytes(good.read_bytes()[:60])
    with pytest.raises(InvalidAudioError):
        probe(cut, Limits())


def test_image_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "cover.m4a"
    import av

    with av.open(str(path), "w", format="ipod") as container:
        stream = container.add_stream("mpeg4", rate=1)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    with pytest.raises(InvalidAudioError, match=r"no audio stream|not supported|not readable"):
        probe(path, Limits())


@pytest.mark.parametrize(
    "limits,reason",
    [
        (Limits(max_seconds=1.0), "over the limit"),
        (Limits(max_file_bytes=1000), "over the limit of 1000"),
        (Limits(max_channels=1), "channels"),
        (Limits(min_sample_rate=48000), "sample rate"),
    ],
)
def test_limits(tmp_path: Path, limits: Limits, reason: str) -> None:
    path = audio_file(tmp_path, "long.wav", "wav", seconds=2.0)
    with pytest.raises(InvalidAudioError, match=reason):
        probe(path, limits)


def test_header_claiming_hours_decodes_only_the_samples_present(tmp_path: Path) -> None:
    path = audio_file(tmp_path, "liar.wav", "wav", seconds=2.0)
    data = bytearray(path.read_bytes())
    data_at = data.index(b"data")
    data[data_at + 4 : data_at + 8] = (0x7FFFFFF0).to_bytes(4, "little")  # claims about 3.4 hours
    path.write_bytes(bytes(data))
    info = probe(path, Limits())  # FFmpeg clamps the claim to the file; we never allocate from it either
    assert decode_to_array(path, info, SR, Limits()).shape == (2, 2 * SR)


def test_decoded_length_is_checked_whatever_the_header_said(tmp_path: Path) -> None:
    path = audio_file(tmp_path, "long.wav", "wav", seconds=4.0)
    understated = probe(path, Limits()).model_copy(update={"seconds": 1.0})
    with pytest.raises(InvalidAudioError, match="past the limit"):
        decode_to_array(path, understated, SR, Limits(max_seconds=2.0))


def test_nan_samples_are_rejected(tmp_path: Path) -> None:
    path = float_wav_with_nan(tmp_path / "nan.wav")
    with pytest.raises(DecodeError, match="NaN"):
        decode_to_array(path, probe(path, Limits()), SR, Limits())


@pytest.mark.parametrize(
    "fmt,bits,tolerance",
    [
        ("wav", 16, 1.5 / 32767),
        ("wav", 24, 1.5 / 8388607),
        ("wav", 32, 0.0),
        ("flac", 16, 1.5 / 32767),
        ("flac", 24, 1.5 / 8388607),
        ("mp3", 16, None),
    ],
)
def test_encode_round_trip(tmp_path: Path, fmt: str, bits: int, tolerance: float | None) -> None:
    audio = music(1.0)
    path = tmp_path / f"stem.{fmt}"
    encode(audio, SR, path, OutputSettings(format=fmt, bit_depth=bits))
    decoded = decode_to_array(path, probe(path, Limits()), SR, Limits())
    assert decoded.shape == audio.shape
    if tolerance is not None:
        assert np.abs(decoded - audio).max() <= tolerance + 1e-7
    else:  # lossy: close in energy
        assert abs(np.mean(decoded**2) / np.mean(audio**2) - 1) < 0.05


def test_encode_clamps_integer_formats(tmp_path: Path) -> None:
    loud = np.full((2, SR // 10), 1.7, dtype=np.float32)
    path = tmp_path / "loud.wav"
    encode(loud, SR, path, OutputSettings(format="wav", bit_depth=16))
    decoded = decode_to_array(path, probe(path, Limits()), SR, Limits())
    assert np.abs(decoded).max() <= 1.0
