"""BSSEval v4 (`tasks.steps.evaluate.bsseval`) against museval 0.4.1 itself, and the MDX SDR (`nsdr`).

museval and the inputs both are run on live in tests/helpers/bsseval_reference.py (benchmarks/bsseval_speed.py
uses them too). museval costs seconds per call whatever the input's length - four dense 4096 x 4096 solves for
four stereo sources - so each input is given to it once: the synthetic estimates are of several kinds at once
(one kind per source: the sources' filters and scores are independent), the MUSDB clips are cut to their first
3.5 s (three 1 s windows) with both kinds of estimate, two stems each.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tasks.steps.evaluate import bsseval
from tasks.steps.evaluate.bsseval import (
    SilentSourceError,
    block_levinson,
    frame_count,
    lagged_products,
    nanmedian,
    pad_or_truncate,
    solve_dense,
    track_metrics,
    trackstore_values,
)
from tasks.steps.evaluate.nsdr import chunk_nsdr, median_chunk_nsdr, nsdr
from tests.helpers.bsseval_reference import (
    ILL_CONDITIONED,
    METRICS,
    MUSDB_CLIPS,
    RATE,
    REAL_ESTIMATES,
    as_array,
    leaky,
    medians_array,
    museval_frames,
    museval_medians,
    museval_metrics,
    ours,
    read_stem_file,
    synthetic_sources,
    white_noise,
)

TOLERANCE_DB = 0.01
MUSDB_SECONDS = 3.5  # three whole 1 s windows, and half of one that museval's framing drops


def assert_close(actual: np.ndarray, expected: np.ndarray, label: str, tolerance: float = TOLERANCE_DB) -> None:
    """Equal within `tolerance` dB, NaN where NaN, inf where inf; the message names each (metric, stem) off."""
    same_special = (np.isnan(actual) == np.isnan(expected)).all() and (np.isinf(actual) == np.isinf(expected)).all()
    finite = np.isfinite(actual) & np.isfinite(expected)
    off = np.argwhere(finite & (np.abs(actual - expected) > tolerance))
    details = [f"{METRICS[m]}[{i}]: ours {actual[m, i]:.5f} museval {expected[m, i]:.5f}" for m, i, *_ in off]
    assert same_special, f"{label}: NaN/inf differ\nours\n{actual}\nmuseval\n{expected}"
    assert not details, f"{label}: off by more than {tolerance} dB: " + "; ".join(details[:12])


# ---------------------------------------------------------------- fast: no museval


def test_sdr_is_the_plain_windowed_signal_to_error_ratio() -> None:
    refs = synthetic_sources(2.5)
    ests = white_noise(refs, np.array([0.0, 10.0, 20.0, 30.0]))
    frames = ours(refs, ests)
    r, e = refs.astype(np.float64)[:, : 2 * RATE], ests.astype(np.float64)[:, : 2 * RATE]
    windows = lambda x: x.reshape(4, 2, RATE, 2)  # noqa: E731
    expected = 10 * np.log10((windows(r) ** 2).sum(axis=(2, 3)) / (windows(r - e) ** 2).sum(axis=(2, 3)))
    assert frames.sdr.shape == (4, 2)  # the trailing half window is dropped, as museval's Framing does
    np.testing.assert_allclose(frames.sdr.numpy(), expected, atol=1e-9)


@pytest.mark.parametrize(
    ("length", "window", "hop", "count"),
    [
        (300032, 44100, 44100, 6),
        (88200, 44100, 44100, 2),
        (88199, 44100, 44100, 1),
        (30000, 44100, 44100, 1),
        (44100, 44100, 44100, 1),
        (132300, 88200, 66150, 1),
        (300000, 88200, 66150, 4),
    ],
)
def test_frame_count_is_museval_framing(length: int, window: int, hop: int, count: int) -> None:
    assert frame_count(length, window, hop) == count


@pytest.mark.parametrize("projection_fft", [1024, 1 << 17])
def test_projection_blocks_do_not_change_the_metrics(monkeypatch: pytest.MonkeyPatch, projection_fft: int) -> None:
    """The window's convolution with the filters, overlap-added from blocks of the default size, from many
    short blocks (513 samples) or from one block per window: the same projections, so the same metrics."""
    refs = synthetic_sources(2.2)
    ests = white_noise(leaky(refs, 0.2), np.array([5.0, 10.0, 15.0, 20.0]))
    default = as_array(ours(refs, ests))
    monkeypatch.setattr(bsseval, "PROJECTION_FFT", projection_fft)
    np.testing.assert_allclose(as_array(ours(refs, ests)), default, rtol=1e-9, atol=1e-9)


def test_a_track_shorter_than_the_filters_is_one_window() -> None:
    refs = synthetic_sources(0.007)  # 308 samples: the projections' FFT is shorter than two filters
    ests = white_noise(refs, np.array([0.0, 10.0, 20.0, 30.0]))
    frames = ours(refs, ests)
    r, e = refs.astype(np.float64), ests.astype(np.float64)
    expected = 10 * np.log10((r**2).sum(axis=(1, 2)) / ((r - e) ** 2).sum(axis=(1, 2)))
    assert frames.sdr.shape == (4, 1)
    np.testing.assert_allclose(frames.sdr.numpy()[:, 0], expected, atol=1e-9)
    assert torch.isfinite(torch.stack([frames.isr, frames.sir, frames.sar])).all()


def test_silent_sources_are_refused_as_museval_does() -> None:
    refs = synthetic_sources(1.2)
    silent = refs.copy()
    silent[2] = 0
    with pytest.raises(SilentSourceError, match=r"reference source\(s\) \[2\]"):
        ours(silent, refs)
    with pytest.raises(SilentSourceError, match=r"estimated source\(s\) \[2\]"):
        ours(refs, silent)
    antiphase = refs.copy()  # museval tests the sum over channels: L = -R counts as silent
    antiphase[1, :, 1] = -antiphase[1, :, 0]
    with pytest.raises(ValueError, match="all zeros"):
        ours(antiphase, refs)


def test_block_levinson_solves_the_dense_system() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 6000, dtype=torch.float64)
    x[1] = torch.nn.functional.conv1d(x[1][None, None], torch.randn(1, 1, 9, dtype=torch.float64), padding=4)[0, 0]
    y = torch.randn(3, 6000, dtype=torch.float64)
    products = lagged_products(x, torch.cat([x, y]), 64)
    assert float(products[5, 1, 2]) == pytest.approx(float((x[1, :-5] * x[2, 5:]).sum()), rel=1e-12)
    blocks, rhs = products[..., :4], products[..., 4:]
    np.testing.assert_allclose(
        block_levinson(blocks, rhs).numpy(), solve_dense(blocks, rhs).numpy(), atol=1e-12, rtol=1e-9
    )


def test_solve_dense_survives_a_thread_count_set_by_the_caller() -> None:
    """torch's batched LU on CPU fails once `torch.set_num_threads` has been called, as the pipeline does
    (pytorch/pytorch#142815: MKL 'Parameter 6 was incorrect on entry to DLASWP', then a RuntimeError, for
    systems over ~150 unknowns): `solve_dense` solves a batch one system at a time."""
    torch.set_num_threads(torch.get_num_threads())  # the count is unchanged; the call alone is enough
    torch.manual_seed(1)
    x = torch.randn(3, 2, 4000, dtype=torch.float64)
    blocks = torch.stack([lagged_products(signal, signal, 96) for signal in x])  # 3 systems of 192 unknowns
    rhs = torch.randn(3, 96, 2, 1, dtype=torch.float64)
    np.testing.assert_allclose(
        solve_dense(blocks, rhs).numpy(), block_levinson(blocks, rhs).numpy(), atol=1e-12, rtol=1e-9
    )


def test_nanmedian_and_trackstore_values_are_numpys() -> None:
    values = torch.tensor([[1.0, np.nan, 3.0, 2.0, 10.0], [np.nan] * 5, [4.0, np.inf, -np.inf, 1.0, np.nan]])
    stored = trackstore_values(values)
    assert torch.isnan(stored[2, 1:3]).all()
    with pytest.warns(RuntimeWarning):
        expected = np.nanmedian(stored.numpy(), axis=1)
    np.testing.assert_array_equal(nanmedian(stored).numpy(), expected)  # [2.5, nan, 2.5]
    assert float(trackstore_values(torch.tensor(12.3456789, dtype=torch.float64))) == pytest.approx(12.34568, abs=1e-12)


def test_track_metrics_pads_or_cuts_estimates_like_museval() -> None:
    refs = synthetic_sources(2.2)
    assert pad_or_truncate(torch.from_numpy(refs[:, :1000]), 1200)[:, 1000:].abs().sum() == 0
    longer = np.concatenate([refs, refs[:, :500]], axis=1)
    np.testing.assert_array_equal(
        np.array([[s.sdr, s.isr, s.sir, s.sar] for s in track_metrics(refs, longer)]),
        np.array([[s.sdr, s.isr, s.sir, s.sar] for s in track_metrics(refs, refs.copy())]),
    )


def demucs_new_sdr() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`demucs.evaluate.new_sdr` as demucs 4.1.0 ships it, compiled from its source: importing the module
    would need dora (a training dependency) and museval's package (ffmpeg)."""
    spec = importlib.util.find_spec("demucs")
    assert spec is not None and spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations))) / "evaluate.py"
    tree = ast.parse(path.read_text())
    function = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "new_sdr")
    namespace: dict[str, Any] = {"th": torch}
    exec(compile(ast.Module(body=[function], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["new_sdr"]


def test_nsdr_is_demucs_new_sdr() -> None:
    refs = synthetic_sources(2.0)
    ests = white_noise(refs, np.array([3.0, 6.0, 12.0, 24.0]))
    ests[3] = refs[3]  # a perfect estimate: 10 log10((energy + 1e-7) / 1e-7), finite
    expected = demucs_new_sdr()(torch.from_numpy(refs).double()[None], torch.from_numpy(ests).double()[None])[0]
    np.testing.assert_allclose(nsdr(refs, ests).numpy(), expected.numpy(), rtol=1e-12)
    assert torch.isfinite(nsdr(refs, ests)).all()


def test_chunk_nsdr_is_per_chunk_and_median() -> None:
    refs = synthetic_sources(3.5)
    ests = white_noise(refs, np.array([3.0, 6.0, 12.0, 24.0]))
    chunks = chunk_nsdr(refs, ests)
    assert chunks.shape == (4, 3)
    np.testing.assert_allclose(chunks[:, 1].numpy(), nsdr(refs[:, RATE : 2 * RATE], ests[:, RATE : 2 * RATE]).numpy())
    np.testing.assert_allclose(median_chunk_nsdr(refs, ests).numpy(), np.median(chunks.numpy(), axis=1))
    silent = refs.copy()
    silent[0, :RATE] = 0
    assert float(chunk_nsdr(silent, silent)[0, 0]) == 0.0  # delta / delta: silent chunks stay finite
    # v4's SDR is this ratio without the 1e-7: the same numbers on ordinary audio
    np.testing.assert_allclose(chunks.numpy(), ours(refs, ests).sdr.numpy(), atol=1e-6)


# ---------------------------------------------------------------- against museval (slow: seconds per call)


# One synthetic track for museval, estimates of a different kind per source (ests[i] is scored against refs[i]
# alone, through its own filters): white noise at 0 dB (artefacts), the mixture / 4 (interference everywhere),
# the reference plus 0.3 x another source (finite SIR), white noise at 30 dB. Source 1 is silent through window
# 1, reference and estimate; source 3's reference through half of window 2.
SYNTHETIC_KINDS = ("noise at 0 dB", "mixture / 4", "leak of 0.3 x another source", "noise at 30 dB")


@pytest.fixture(scope="module")
def synthetic_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(references, estimates, museval's frames), museval run once for the tests that share it."""
    refs = synthetic_sources(4.0)
    refs[1, RATE : 2 * RATE] = 0  # source 1 silent through window 1: museval skips that window for all sources
    refs[3, int(2.5 * RATE) : 3 * RATE] = 0  # silent through half of window 2 only: still scored
    noisy = white_noise(refs, np.array([0.0, 10.0, 20.0, 30.0]))
    ests = np.stack([noisy[0], refs.sum(axis=0) / 4, leaky(refs, 0.3)[2], noisy[3]]).astype(np.float32)
    ests[1, RATE : 2 * RATE] = 0
    return refs, ests, museval_frames(refs, ests)


@pytest.mark.slow
def test_synthetic_estimates_match_museval(synthetic_case: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    refs, ests, expected = synthetic_case
    frames = ours(refs, ests)
    assert frames.stable
    label = ", ".join(f"{i}: {kind}" for i, kind in enumerate(SYNTHETIC_KINDS))
    assert_close(as_array(frames), expected, f"{label}; per window")
    assert_close(medians_array(frames), museval_medians(expected), f"{label}; track medians")


@pytest.mark.slow
def test_windows_with_a_silent_source_are_nan_for_every_source(
    synthetic_case: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    refs, ests, expected = synthetic_case
    assert np.isnan(expected[:, :, 1]).all() and np.isfinite(expected[:, :, [0, 2, 3]]).all()
    frames = ours(refs, ests)
    assert np.isnan(as_array(frames)[:, :, 1]).all()
    assert_close(as_array(frames), expected, "partly silent, per window")
    assert_close(medians_array(frames), museval_medians(expected), "partly silent, track medians")


@pytest.mark.slow
def test_a_silent_stem_is_refused_by_both() -> None:
    refs = synthetic_sources(1.5)
    refs[2] = 0
    ests = white_noise(refs, np.full(4, 10.0))
    with pytest.raises(ValueError, match="non-silent"):
        museval_frames(refs, ests)
    with pytest.raises(SilentSourceError):
        ours(refs, ests)


@pytest.mark.slow
def test_perfect_estimates_give_museval_s_ceiling() -> None:
    """References against themselves: SDR is +inf in every window in both (e - s is exactly 0), so TrackStore
    keeps NaN and the track's SDR is NaN. ISR, SIR and SAR are +inf in exact arithmetic; both return rounding
    noise, ~270-310 dB, that agrees in size, not in digits. (Two sources: museval's solves cost an eighth.)"""
    refs = synthetic_sources(2.0, sources=2)
    expected = museval_frames(refs, refs.copy())
    frames = ours(refs, refs.copy())
    assert np.isposinf(expected[0]).all() and torch.isposinf(frames.sdr).all()
    assert (expected[1:] > 250).all() and (as_array(frames)[1:] > 250).all()
    assert np.isnan(museval_medians(expected)[0]).all() and np.isnan(medians_array(frames)[0]).all()


@pytest.mark.slow
def test_trackstore_replica() -> None:
    """`museval_medians` against museval's own TrackStore (where `import museval` works: ffmpeg on PATH)."""
    museval_metrics()
    try:
        from museval.aggregate import TrackStore  # type: ignore[import-untyped]
    except (ImportError, RuntimeError) as exc:
        pytest.skip(f"the museval package does not import here ({exc})")
    rng = np.random.default_rng(0)
    frames = rng.normal(5, 5, size=(4, 3, 8))
    frames[:, 0, 2] = np.nan
    frames[2, 1, 3:5] = np.inf
    store = TrackStore(track_name="t", win=1.0, hop=1.0)
    for i, stem in enumerate(("a", "b", "c")):
        store.add_target(stem, {name: frames[m, i].tolist() for m, name in enumerate(METRICS)})
    table = store.df.groupby(["target", "metric"])["score"].median().unstack()
    np.testing.assert_allclose(table.loc[["a", "b", "c"], list(METRICS)].to_numpy().T, museval_medians(frames))


# ---------------------------------------------------------------- real music: the MUSDB18 preview clips


def real_estimates(stems: np.ndarray) -> np.ndarray:
    """Both kinds of REAL_ESTIMATES on one clip: stems 0 and 2 get the first, 1 and 3 the second."""
    kinds = [REAL_ESTIMATES[kind](stems) for kind in REAL_ESTIMATES]
    return np.stack([kinds[i % len(kinds)][i] for i in range(stems.shape[0] - 1)])


@pytest.mark.slow
@pytest.mark.testdata
@pytest.mark.parametrize("clip", MUSDB_CLIPS)
def test_musdb_clips_match_museval(testdata: Path, clip: str) -> None:
    stems = read_stem_file(testdata / "musdb7" / clip, MUSDB_SECONDS)
    refs, ests = stems[1:], real_estimates(stems)
    expected = museval_frames(refs, ests)
    frames = ours(refs, ests)
    assert frames.stable == (clip not in ILL_CONDITIONED)
    checked = slice(None) if frames.stable else slice(0, 1)
    kinds = " / ".join(REAL_ESTIMATES)
    assert_close(as_array(frames)[checked], expected[checked], f"{clip}, {kinds}, per window")
    assert_close(medians_array(frames)[checked], museval_medians(expected)[checked], f"{clip}, {kinds}, medians")
