"""museval 0.4.1 as the reference for `tasks.steps.evaluate.bsseval`, and the inputs both are run on: for
tests/test_bsseval.py and benchmarks/bsseval_speed.py.

museval is loaded from its installed `metrics.py` file, not as a package: `import museval` imports musdb and
stempeg, and stempeg refuses to import without an `ffmpeg` binary on PATH, which `metrics.py` never uses.
`museval_metrics` skips the calling test where museval is not installed. Its TrackStore aggregation (5
decimals, inf -> NaN, nanmedian) is restated in `museval_medians`; `test_trackstore_replica` checks the
restatement against the real TrackStore where the whole package imports.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from decimal import Decimal
from functools import cache
from pathlib import Path
from types import ModuleType

import av
import numpy as np
import pytest
import torch

from tasks.steps.evaluate.bsseval import FrameMetrics, aggregate, bss_eval_v4

RATE = 44100
METRICS = ("SDR", "ISR", "SIR", "SAR")
STEMS = ("drums", "bass", "other", "vocals")  # NI stem streams 1..4; stream 0 is the mixture

# The MUSDB18 preview clips in ../shared/testdata/musdb7 (4 stems each, ~6-7 s).
MUSDB_CLIPS = (
    "Music Delta - 80s Rock.stem.mp4",
    "The Easton Ellises - Falcon 69 (NI ALAC).stem.m4a",
    "The Easton Ellises - Falcon 69.stem.mp4",
)
# Whose references' Gram matrix is singular to working precision: there museval's own ISR/SIR/SAR are rounding
# noise (its np.linalg.solve against a Cholesky solve of the same system: up to 27 dB apart), so only SDR
# can be compared; ours reports it (`stable` False).
ILL_CONDITIONED = {"Music Delta - 80s Rock.stem.mp4"}


# ---------------------------------------------------------------- inputs


def read_stem_file(path: Path, seconds: float | None = None) -> np.ndarray:
    """(streams, samples, channels) float32 at 44.1 kHz: every audio stream of an NI stem file, or its first
    `seconds` (decoding stops there)."""
    limit = None if seconds is None else round(seconds * RATE)
    with av.open(str(path)) as container:
        count = len(container.streams.audio)
    streams = [_read_stream(path, index, limit) for index in range(count)]
    length = min(stream.shape[1] for stream in streams)
    return np.stack([stream[:, :length].T for stream in streams])


def _read_stream(path: Path, index: int, limit: int | None) -> np.ndarray:
    resampler = av.AudioResampler(format="fltp", layout="stereo", rate=RATE)
    blocks: list[np.ndarray] = []
    decoded = 0
    with av.open(str(path)) as container:
        for frame in container.decode(container.streams.audio[index]):
            outs = [out.to_ndarray() for out in resampler.resample(frame)]
            blocks += outs
            decoded += sum(out.shape[1] for out in outs)
            if limit is not None and decoded >= limit:
                break
    if limit is None or decoded < limit:
        blocks += [out.to_ndarray() for out in resampler.resample(None)]
    return np.concatenate(blocks, axis=1)[:, :limit]


def synthetic_sources(seconds: float = 3.0, seed: int = 0, sources: int = 4) -> np.ndarray:
    """(sources, samples, 2) float32: coloured noise plus a tone under a slow envelope, per source. Broadband,
    so the references' Gram matrix is well conditioned and museval's ISR/SIR/SAR are reproducible."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    t = np.arange(n) / RATE
    out = []
    for i in range(sources):
        fir = rng.standard_normal(32) * np.exp(-np.arange(32) / (2 + 3 * i))
        noise = rng.standard_normal((n + 31, 2))
        coloured = np.stack([np.convolve(noise[:, c], fir, mode="valid") for c in range(2)], axis=1)
        tone = np.sin(2 * np.pi * 110 * (i + 1) * t)[:, None] * np.array([[0.6, 0.4]])
        envelope = 0.6 + 0.4 * np.sin(2 * np.pi * (0.5 + 0.3 * i) * t)[:, None]
        out.append(0.1 * envelope * (0.5 * coloured / coloured.std() + tone))
    return np.stack(out).astype(np.float32)


def white_noise(refs: np.ndarray, snr_db: np.ndarray, seed: int = 1) -> np.ndarray:
    """References plus white noise, source i at snr_db[i] below it."""
    noise = np.random.default_rng(seed).standard_normal(refs.shape)
    scale = np.sqrt((refs.astype(np.float64) ** 2).mean(axis=(1, 2)) / 10 ** (snr_db / 10))
    return (refs + scale[:, None, None] * noise).astype(np.float32)


def shaped_noise(refs: np.ndarray, level_db: float, seed: int = 2) -> np.ndarray:
    """Noise with each reference's own magnitude spectrogram and random phases, level_db below it: artefacts
    that stay in the band the reference occupies (lossy-coded stems have next to nothing above ~16 kHz)."""
    x = torch.as_tensor(refs, dtype=torch.float64).permute(0, 2, 1)  # (sources, channels, samples)
    window = torch.hann_window(4096, dtype=torch.float64)
    spec = torch.stft(x.reshape(-1, x.shape[-1]), 4096, 1024, window=window, return_complex=True)
    phase = torch.rand(spec.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    noise = torch.istft(
        spec.abs() * torch.exp(2j * torch.pi * phase), 4096, 1024, window=window, length=x.shape[-1]
    ).reshape(x.shape)
    noise *= x.norm(dim=(1, 2), keepdim=True) / noise.norm(dim=(1, 2), keepdim=True) * 10 ** (level_db / 20)
    return (x + noise).permute(0, 2, 1).numpy().astype(np.float32)


def leaky(refs: np.ndarray, leak: float = 0.3) -> np.ndarray:
    """Each estimate is its reference plus `leak` times the next source: interference, so SIR is finite."""
    return (refs + leak * np.roll(refs, 1, axis=0)).astype(np.float32)


def mixture_over_four(stems: np.ndarray) -> np.ndarray:
    """Every estimate is the mixture (stream 0 of a stem file) / 4: interference everywhere."""
    return np.repeat(stems[:1] / 4, 4, axis=0).astype(np.float32)


# Estimates made from a stem file's streams (mixture first, then the 4 stems): no trained model here.
REAL_ESTIMATES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "reference + in-band noise + leak": lambda stems: leaky(shaped_noise(stems[1:], -15.0), 0.1),
    "mixture / 4": mixture_over_four,
}


# ---------------------------------------------------------------- museval


@cache
def _museval_module() -> ModuleType | None:
    spec = importlib.util.find_spec("museval")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "metrics.py"
    module_spec = importlib.util.spec_from_file_location("museval_metrics_041", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def museval_metrics() -> ModuleType:
    """museval's `metrics.py` (needs numpy and scipy only); skips the test where museval is not installed."""
    pytest.importorskip("scipy")
    module = _museval_module()
    if module is None:
        pytest.skip("museval is not installed (pip install museval==0.4.1)")
    return module


def museval_frames(refs: np.ndarray, ests: np.ndarray) -> np.ndarray:
    """(4, sources, windows): what `museval.evaluate(refs, ests)` (v4, 1 s windows and hops) returns."""
    metrics = museval_metrics()
    sdr, isr, sir, sar, _ = metrics.bss_eval(
        refs,
        ests,
        window=RATE,
        hop=RATE,
        compute_permutation=False,
        filters_len=512,
        framewise_filters=False,
        bsseval_sources_version=False,
    )
    return np.stack([sdr, isr, sir, sar])


def museval_medians(frames: np.ndarray) -> np.ndarray:
    """(4, sources): museval.TrackStore's track scores: `_q` (inf -> NaN, else Decimal-quantised to 0.00001)
    per value, then `np.nanmedian` over the windows."""
    quantised = np.vectorize(
        lambda v: np.nan if np.isinf(v) or np.isnan(v) else float(Decimal(v).quantize(Decimal(".00001")))
    )(frames)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "All-NaN slice encountered"
        return np.nanmedian(quantised, axis=-1)


# ---------------------------------------------------------------- ours, in museval's layout


def ours(refs: np.ndarray, ests: np.ndarray) -> FrameMetrics:
    return bss_eval_v4(torch.from_numpy(refs), torch.from_numpy(ests))


def as_array(frames: FrameMetrics) -> np.ndarray:
    """(4, sources, windows), as `museval_frames`."""
    return torch.stack([frames.sdr, frames.isr, frames.sir, frames.sar]).numpy()


def medians_array(frames: FrameMetrics) -> np.ndarray:
    """(4, sources), as `museval_medians`."""
    return np.array([[s.sdr, s.isr, s.sir, s.sar] for s in aggregate(frames)]).T
