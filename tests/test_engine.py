"""The batched, streaming engine against Demucs's own apply_model, on real music and the tiny model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from demucs.apply import BagOfModels, apply_model
from demucs.pretrained import get_model

import tasks.engine.overlap_add as engine
from tasks.core.records import ModelInfo, SeparatedStems
from tasks.core.settings import Limits, OutputSettings, SeparationSettings, job_key
from tasks.engine.attention import FusedAttention, fused_attention
from tasks.engine.overlap_add import EngineOptions, TrackFiles, output_names, separate_files
from tasks.io.npyfile import NpyAudio
from tasks.steps.decode import decode
from tasks.steps.score import score
from tasks.steps.validate import probe
from tests.helpers.audio import decode_to_array, score_arrays
from tests.helpers.constants import MODEL_NAME

SR = 44100
SONG = "music/Kevin_MacLeod_-_Vibe_Ace.hq.ogg"


class FixedOffsets:
    """Stands in for `random` so that Demucs and the engine draw the same shift offsets."""

    def __init__(self, offsets: list[int]) -> None:
        self.offsets = list(offsets)

    def randint(self, low: int, high: int) -> int:
        return self.offsets.pop(0)


def sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(reference**2) / max(np.sum((reference - estimate) ** 2), 1e-30)))


@pytest.fixture(scope="module")
def model(model_repo: Path) -> torch.nn.Module:
    return get_model(MODEL_NAME, repo=model_repo).eval()


@pytest.fixture(scope="module")
def song(testdata: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 s of real music (a segment of 7.8 s plus a ragged tail), decoded to a .npy on disk."""
    source = testdata / SONG
    audio = decode_to_array(source, probe(source, Limits()), SR, Limits())[:, 20 * SR : 32 * SR]
    path = tmp_path_factory.mktemp("song") / "mixture.npy"
    np.save(path, np.ascontiguousarray(audio))
    return path


def reference(model: torch.nn.Module, mixture: np.ndarray, shifts: int = 0) -> np.ndarray:
    wav = torch.from_numpy(mixture)
    ref = wav.mean(0)
    mean, std = ref.mean(), ref.std() + 1e-8
    with torch.inference_mode():
        out = apply_model(model, ((wav - mean) / std)[None], shifts=shifts, split=True, overlap=0.25)
    return (out[0] * std + mean).numpy()


def ours(model: torch.nn.Module, mixture: Path, out_dir: Path, **options) -> np.ndarray:
    names = output_names(list(model.sources), options.get("two_stems"))
    files = TrackFiles(str(mixture), {name: str(out_dir / f"{name}.npy") for name in names})
    separate_files(model, [files], EngineOptions(**options), "cpu")
    return np.stack([np.load(files.stems[name]) for name in names])


@pytest.mark.slow
@pytest.mark.testdata
@pytest.mark.parametrize("batch_size", [1, 3])
def test_fp32_cpu_output_equals_demucs_apply_model(model, song: Path, tmp_path: Path, batch_size: int) -> None:
    expected = reference(model, np.load(song))
    got = ours(model, song, tmp_path, batch_size=batch_size)
    for name, want, have in zip(model.sources, expected, got, strict=True):
        assert sdr(want, have) >= 60.0, name


@pytest.mark.slow
@pytest.mark.testdata
def test_shifts_and_bags_of_models_match_apply_model(
    model, model_repo: Path, song: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bag = BagOfModels(
        [model, get_model(MODEL_NAME, repo=model_repo).eval()], weights=[[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]
    )
    offsets = [20411, 8160, 0, 22050]
    import demucs.apply

    monkeypatch.setattr(demucs.apply, "random", FixedOffsets(offsets))
    expected = reference(bag, np.load(song), shifts=2)
    monkeypatch.setattr(engine, "random", FixedOffsets(offsets))
    got = ours(bag, song, tmp_path, shifts=2, batch_size=4)
    for name, want, have in zip(bag.sources, expected, got, strict=True):
        assert sdr(want, have) >= 60.0, name


@pytest.mark.slow
@pytest.mark.testdata
def test_two_stems_are_the_stem_and_the_sum_of_the_rest(model, song: Path, tmp_path: Path) -> None:
    expected = reference(model, np.load(song))
    got = ours(model, song, tmp_path, two_stems="vocals")
    assert sdr(expected[3], got[0]) >= 60.0
    assert sdr(expected[:3].sum(axis=0), got[1]) >= 60.0


@pytest.mark.slow
@pytest.mark.testdata
def test_bf16_on_cpu_stays_close_to_float32(model, song: Path, tmp_path: Path) -> None:
    (tmp_path / "fp32").mkdir()
    fp32 = ours(model, song, tmp_path / "fp32")
    bf16 = ours(model, song, tmp_path, precision="bf16")
    assert min(sdr(a, b) for a, b in zip(fp32, bf16, strict=True)) >= 30.0


@pytest.mark.testdata
def test_streaming_decode_equals_in_memory_decode(testdata: Path, tmp_path: Path) -> None:
    source = testdata / "musdb7" / "The Easton Ellises - Falcon 69.stem.mp4"
    info = probe(source, Limits())
    decoded = decode(source, info, SR, Limits(), tmp_path)
    in_memory = decode_to_array(source, info, SR, Limits())
    on_disk = np.load(decoded.path)
    assert decoded.frames == in_memory.shape[1]
    np.testing.assert_array_equal(on_disk, in_memory)
    assert not list(tmp_path.glob("*.ch1"))  # the side file for channel 1 is gone


@pytest.mark.testdata
def test_windowed_score_equals_whole_array_score(song: Path, tmp_path: Path) -> None:
    mixture = np.load(song)
    stems = {"a": mixture * 0.25, "b": mixture * 0.7, "quiet": np.zeros_like(mixture)}
    stems["a"][:, : 3 * SR] = 1.5  # clipped and loud
    paths = {}
    for name, array in stems.items():
        paths[name] = str(tmp_path / f"{name}.npy")
        np.save(paths[name], array.astype(np.float32))
    info = ModelInfo(name="m", signature="s", sources=list(stems), sample_rate=SR, audio_channels=2)
    separated = SeparatedStems(paths=paths, sample_rate=SR, frames=mixture.shape[1], model=info, device="cpu")
    windowed = score(str(song), separated)
    whole = score_arrays(mixture, stems, SR)
    assert windowed.residual_db == pytest.approx(whole.residual_db, abs=1e-6)
    for got, want in zip(windowed.stems, whole.stems, strict=True):
        for field in ("peak_dbfs", "rms_dbfs", "silence_ratio", "clipped_ratio", "energy_share_db"):
            assert getattr(got, field) == pytest.approx(getattr(want, field), abs=1e-6), (got.stem, field)


@pytest.mark.testdata
def test_npy_windows_read_zeros_outside_the_track(song: Path) -> None:
    whole = np.load(song)
    with NpyAudio(song) as audio:
        window = audio.read(-10, 20)
        assert np.all(window[:, :10] == 0) and np.array_equal(window[:, 10:], whole[:, :20])
        assert np.array_equal(audio[:, 100:200], whole[:, 100:200])


def test_reduced_precision_changes_the_job_key_and_float32_keeps_it() -> None:
    separation, output = SeparationSettings(), OutputSettings()
    fp32 = job_key("c" * 64, "sig", separation, output)
    assert job_key("c" * 64, "sig", separation, output, precision="fp32") == fp32
    assert job_key("c" * 64, "sig", separation, output, precision="bf16") != fp32
    # batch size does not change the output, so it does not change the key
    assert job_key("c" * 64, "sig", SeparationSettings(batch_size=8), output) == fp32


@pytest.mark.parametrize("mask", [None, "bool", "float"])
@pytest.mark.parametrize("cross", [False, True])
def test_fused_attention_equals_torch_multihead_attention(mask: str | None, cross: bool) -> None:
    torch.manual_seed(0)
    plain = torch.nn.MultiheadAttention(48, 4, batch_first=True).eval()
    query = torch.randn(3, 37, 48)
    key = torch.randn(3, 23, 48) if cross else query
    masks = {None: None, "bool": torch.rand(37, key.shape[1]) > 0.7, "float": torch.randn(37, key.shape[1])}
    with torch.inference_mode():
        expected = plain(query, key, key, attn_mask=masks[mask], need_weights=False)[0]
        with fused_attention(plain) as switched:
            assert switched == 1 and isinstance(plain, FusedAttention)
            got = plain(query, key, key, attn_mask=masks[mask], need_weights=False)[0]
    assert type(plain) is torch.nn.MultiheadAttention  # put back afterwards
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.testdata
def test_engine_leaves_the_model_as_it_found_it(model, song: Path, tmp_path: Path) -> None:
    from tasks.engine.models import model_signature

    before = model_signature(model)
    with fused_attention(model) as switched:
        assert switched > 0  # HTDemucs's transformer layers are covered
    ours(model, song, tmp_path)
    assert model_signature(model) == before
    assert not any(isinstance(m, FusedAttention) for m in model.modules())
