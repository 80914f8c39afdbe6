"""BSSEval v4 on the CPU: SDR, ISR, SIR and SAR as museval 0.4.1 computes them for SiSEC 2018 and MUSDB18.

museval's defaults there: `museval.evaluate` -> `museval.metrics.bss_eval` with `window=hop=44100` (1 s),
`compute_permutation=False`, `filters_len=512`, `framewise_filters=False`, `bsseval_sources_version=False`;
then `museval.TrackStore` takes each track's median over windows. We follow it step by step, because numbers
that are to be compared with published ones must be the same numbers:

1. `museval.evaluate` cuts or zero-pads the estimates to the references' length (`track_metrics` does too).
2. A source that is all zeros - its channels *sum* to zero at every sample - in the references or the
   estimates makes museval refuse the track with ValueError; here `SilentSourceError` (a ValueError).
3. v4 fits the distortion filters once, on the whole track (v3 refitted them in every window). For each
   estimate: the least-squares FIR filters, 512 taps from every reference channel to every estimate channel,
   that best map (a) all references and (b) its own reference alone onto it. museval solves the normal
   equations (Gram matrix of the delayed references plus eps*I, eps = 2.2e-16 absolute) with a dense
   `np.linalg.solve`, once per estimate; that matrix is block Toeplitz and the same for every estimate, so a
   block Levinson recursion (reflection form) solves all estimates' systems, and the own-source ones, in one
   batched pass, O(p^3 L^2) instead of O(p^3 L^3) per estimate (p = sources x channels, L = 512), checked
   by its residual. The correlations are summed from blocked FFTs, the projections by FFT convolution.
4. Windows as museval's `Framing`: floor((n - window + hop) / hop) windows of `window` samples, `hop` apart;
   a trailing partial window is dropped; a track shorter than one window is a single window.
5. In each window the references *cut to that window* (zero outside it) go through the global filters; the
   projections are window + 511 samples long (filter tails included). With s the reference, e the estimate,
   Pj the projection on its own reference and P the projection on all references:
   SDR = |s|^2/|e - s|^2, ISR = |s|^2/|Pj - s|^2, SIR = |Pj|^2/|P - Pj|^2, SAR = |P|^2/|e - P|^2, summed over
   samples and channels, in dB; +inf where the denominator is 0. SDR needs no projection at all: in v4 it is
   the plain signal-to-error ratio of the window.
6. A window in which any source, reference or estimate, sums to zero over channels at every sample is NaN for
   *every* source and metric of that window.
7. `TrackStore` (what `museval.eval_mus_track` and SiSEC report) stores each value rounded to 5 decimals with
   +-inf turned into NaN, and a track's score is `np.nanmedian` over its windows (`aggregate`). (Demucs's own
   evaluation takes `np.nanmedian` of the raw values instead, where an inf counts as a large value.)

ISR, SIR and SAR depend on that linear solve, and the Gram matrix of band-limited references (lossy-coded
stems have next to nothing above ~16 kHz) can be singular to working precision. The filters' components in
those directions are then rounding noise in museval, and so are its ISR, SIR and SAR: its numbers move by up
to tens of dB when its `np.linalg.solve` is swapped for a Cholesky solve of the same system. Such a track is
recognised by the spread of its references' cross-power spectra (`spectral_range`, above CONDITION_LIMIT);
its filters are solved with a small ridge (Tikhonov) instead, a well-defined answer at the same cost, and
`FrameMetrics.stable` is False: only SDR, which never depends on the solve, is then museval's.

Tensors (any device) in and out; the work runs in numpy, float64, on the CPU, on a samples-first copy of the
signals (`_samples_first`): numpy's FFTs along that first axis leave each frequency bin's spectra together
for the per-bin products with the filters (torch's, along the last axis, need transposing copies that cost
more than the FFTs), numpy's small calls cost less than torch's (the Levinson loop is thousands of them), and
its FFTs and products release the GIL, so the correlations' blocks and the windows run on `_threads()`
threads (`_parallel_map`).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from numpy.lib.stride_tricks import as_strided
from torch import Tensor

WINDOW = 44100  # samples: 1 s at 44.1 kHz, museval.evaluate's default and SiSEC 2018's
HOP = 44100
FILTERS_LEN = 512  # taps of the distortion filters (museval's `filters_len`)
EPS = float(np.finfo(np.float64).eps)  # museval's ridge on the normal equations: absolute, not relative
LEVINSON_RESIDUAL = 1e-9  # relative residual of the filters' solve above which they are not `stable`
FALLBACK_RESIDUAL = 1e-6  # relative residual above which the recursion broke down: a dense LU solves instead
CONDITION_LIMIT = 1e10  # `spectral_range` spread of the references' Gram matrix above which it is not `stable`
TRACKSTORE_DECIMALS = 5  # museval.TrackStore._q quantises every value to 0.00001
CORRELATION_FFT = 16384  # FFT size of the blocks that accumulate the track's correlations
PROJECTION_FFT = 8192  # FFT size of the blocks that convolve each window with the filters
SAMPLES_PER_BATCH = 1 << 20  # samples per row transformed at once in the correlations (bounds memory)
WINDOWS_PER_BATCH = 1  # evaluation windows projected at once, per thread (in cache, and one task each)

Audio = Tensor | np.ndarray
_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


class SilentSourceError(ValueError):
    """museval refuses a track in which a reference or estimated source is all zeros: scores are undefined."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class FrameMetrics:
    """Per-window metrics in dB, each (sources, windows) float64: museval's `bss_eval` outputs.

    `stable` is False where the references' Gram matrix is singular to working precision (see
    `distortion_filters`): museval's ISR, SIR and SAR are then rounding noise - they change by dB between
    LAPACK builds - and ours come from ridge-regularised filters; SDR is exact either way."""

    sdr: Tensor
    isr: Tensor
    sir: Tensor
    sar: Tensor
    stable: bool = True


@dataclass(frozen=True)
class StemMetrics:
    """One source's track scores in dB: medians over windows as museval's TrackStore computes them."""

    sdr: float
    isr: float
    sir: float
    sar: float


def track_metrics(
    references: Audio, estimates: Audio, window: int = WINDOW, hop: int = HOP, filters_len: int = FILTERS_LEN
) -> list[StemMetrics]:
    """`museval.eval_mus_track`'s scores, one per source: (sources, samples, channels) arrays in.

    The estimates are cut or zero-padded to the references' length first, as `museval.evaluate` does.
    """
    refs = _as_sources(references)
    ests = pad_or_truncate(_as_sources(estimates).to(refs.device), refs.shape[1])
    return aggregate(bss_eval_v4(refs, ests, window, hop, filters_len))


def pad_or_truncate(estimates: Tensor, length: int) -> Tensor:
    """`museval.pad_or_truncate`: zeros appended to, or samples cut from, the end (axis 1) of the estimates."""
    missing = length - estimates.shape[1]
    if missing > 0:
        return F.pad(estimates, (0, 0, 0, missing))
    return estimates[:, :length]


def bss_eval_v4(
    references: Audio, estimates: Audio, window: int = WINDOW, hop: int = HOP, filters_len: int = FILTERS_LEN
) -> FrameMetrics:
    """museval's `bss_eval(..., compute_permutation=False, framewise_filters=False,
    bsseval_sources_version=False)` on (sources, samples, channels) arrays of equal shape; float64 inside."""
    refs = _as_sources(references)
    ests = _as_sources(estimates).to(refs.device)
    _validate(refs, ests, window, hop, filters_len)
    sources, length, channels = refs.shape
    signals = _samples_first(refs, ests)
    _refuse_silent_sources(signals, sources)
    every, own, stable = distortion_filters(signals, channels, filters_len)
    width, count = min(window, length), frame_count(length, window, hop)
    size = min(_block_fft(PROJECTION_FFT, filters_len), _fft_size(width + filters_len - 1))
    # the filters' frequency responses, (bins, ref rows, 2 x est rows): all references' filters, then the own
    # source's (block diagonal), so that one product per bin makes both projections
    filters = np.concatenate([every, own], axis=2)
    response = np.fft.rfft(filters, n=size, axis=0)
    layout = _Layout(width=width, hop=hop, taps=filters_len, size=size, sources=sources)
    batches = [range(start, min(start + WINDOWS_PER_BATCH, count)) for start in range(0, count, WINDOWS_PER_BATCH)]
    parts = _parallel_map(lambda windows: _window_metrics(signals, response, layout, windows), batches)
    sdr, isr, sir, sar = (torch.cat([part[k] for part in parts], dim=1).to(refs.device) for k in range(4))
    return FrameMetrics(sdr=sdr, isr=isr, sir=sir, sar=sar, stable=stable)


def aggregate(frames: FrameMetrics) -> list[StemMetrics]:
    """museval.TrackStore: values rounded to 5 decimals, +-inf -> NaN, then `np.nanmedian` over the windows."""
    stacked = torch.stack([frames.sdr, frames.isr, frames.sir, frames.sar])
    medians = nanmedian(trackstore_values(stacked)).cpu().tolist()
    return [StemMetrics(sdr=sdr, isr=isr, sir=sir, sar=sar) for sdr, isr, sir, sar in zip(*medians, strict=True)]


def trackstore_values(values: Tensor) -> Tensor:
    """What `TrackStore._q` keeps of each value: NaN for +-inf, else the value rounded to 5 decimals."""
    scale = 10.0**TRACKSTORE_DECIMALS
    return torch.where(torch.isinf(values), torch.nan, torch.round(values * scale) / scale)


def nanmedian(values: Tensor) -> Tensor:
    """`np.nanmedian` over the last axis: NaNs ignored, the mean of the two middle values for an even count,
    NaN where nothing is left. (`torch.nanmedian` returns the lower middle value instead.)"""
    ordered = torch.sort(values, dim=-1).values  # NaN sorts last
    count = (~torch.isnan(values)).sum(dim=-1, keepdim=True)
    low = ordered.gather(-1, ((count - 1).clamp(min=0)) // 2)
    high = ordered.gather(-1, (count // 2).clamp(max=values.shape[-1] - 1))
    middle = (low + high) / 2
    return torch.where(count > 0, middle, torch.nan).squeeze(-1)


def frame_count(length: int, window: int, hop: int) -> int:
    """museval's `Framing.nwin`: whole windows only; one window (the whole track) if it is shorter."""
    return (length - window + hop) // hop if window < length else 1


def distortion_filters(signals: np.ndarray, channels: int, filters_len: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Least-squares FIR filters onto each estimate row, both (taps, reference rows, estimate rows), from
    `signals`, (samples, reference rows and then as many estimate rows), samples first: from all
    the references (museval's C), and from the estimate's own source only (museval's Cj, block diagonal: zero
    from another source's rows); and whether they are museval's (`FrameMetrics.stable`): the references' Gram
    matrix well conditioned and both systems solved to the residual a dense solve reaches.

    Each goes through the block Levinson recursion: the full system (p = rows) once for all estimates, the
    own-source ones (each source's c x c diagonal blocks: museval's per-source solves) as a batch of p = c
    systems, which costs a fraction of the full one (the recursion's work grows with p^2 to p^3). Where the
    Gram matrix is singular to working precision (`spectral_range` spread above CONDITION_LIMIT), or the
    recursion breaks down, both are solved with a ridge of (largest eigenvalue) / CONDITION_LIMIT added to the
    diagonal instead: museval's filters are rounding noise in the null directions there (its ISR, SIR and SAR
    move by tens of dB between LAPACK builds), and the ridge gives a well-defined answer at the recursion's
    cost, not a dense solve's. Rows are source-major: source * channels + channel."""
    rows = signals.shape[1] // 2
    correlations = _lagged_products(signals[:, :rows], signals, filters_len)
    blocks, rhs = correlations[..., :rows].copy(), correlations[..., rows:]
    blocks[0] += EPS * np.eye(rows)
    # (systems, L, p, p) and (systems, L, p, q): the full one, then one per source
    systems = [(blocks[None], rhs[None]), (_source_blocks(blocks, channels), _source_blocks(rhs, channels))]
    smallest, largest = spectral_range(blocks)
    if smallest * CONDITION_LIMIT >= largest:
        solutions = [_levinson(t, r) for t, r in systems]
        residual = max(float(_residuals(t, x, r).max()) for (t, r), x in zip(systems, solutions, strict=True))
        if residual <= FALLBACK_RESIDUAL:  # (False where NaN: a solution is not finite)
            return solutions[0][0], _block_diagonal(solutions[1]), residual <= LEVINSON_RESIDUAL
    solutions = [_ridged_solve(t, r, largest / CONDITION_LIMIT) for t, r in systems]
    return solutions[0][0], _block_diagonal(solutions[1]), False


def _ridged_solve(blocks: np.ndarray, rhs: np.ndarray, ridge: float) -> np.ndarray:
    """`_levinson` with `ridge` added to the diagonal; a dense LU of the system without it (museval's method)
    where the recursion breaks down even so."""
    ridged = blocks.copy()
    ridged[..., 0, :, :] += ridge * np.eye(blocks.shape[-1])
    solution = _levinson(ridged, rhs)
    failed = ~(_residuals(ridged, solution, rhs) <= FALLBACK_RESIDUAL)
    if failed.any():
        solution[failed] = solve_dense(torch.from_numpy(blocks[failed]), torch.from_numpy(rhs[failed])).numpy()
    return solution


def _source_blocks(matrices: np.ndarray, channels: int) -> np.ndarray:
    """(sources, ..., c, c): each source's c x c block on the diagonal of (..., rows, rows) matrices."""
    sources = matrices.shape[-1] // channels
    spans = [slice(s * channels, (s + 1) * channels) for s in range(sources)]
    return np.stack([matrices[..., span, span] for span in spans])


def _block_diagonal(blocks: np.ndarray) -> np.ndarray:
    """(..., rows, rows) from (sources, ..., c, c): `_source_blocks`' inverse, zero off the diagonal blocks."""
    sources, channels = blocks.shape[0], blocks.shape[-1]
    matrices = np.zeros((*blocks.shape[1:-2], sources * channels, sources * channels))
    for s in range(sources):
        matrices[..., s * channels : (s + 1) * channels, s * channels : (s + 1) * channels] = blocks[s]
    return matrices


def spectral_range(blocks: np.ndarray) -> tuple[float, float]:
    """The smallest and largest eigenvalues of T. Chan's optimal block-circulant approximation of the block
    Toeplitz Gram matrix (block (m, n) = blocks[m - n]): the range of the references' cross-power spectra at
    the filters' frequency resolution, a solver-independent estimate of how singular the normal equations are
    (real clips: ~1e7 apart on lossless and well-behaved AAC stems, ~5e12 on a band-limited AAC one)."""
    lags = blocks.shape[-3]
    weights = np.arange(lags)[:, None, None]
    wrapped = np.concatenate([np.zeros_like(blocks[:1]), np.swapaxes(blocks[:0:-1], -1, -2)])  # blocks[k - L]
    circulant = ((lags - weights) * blocks + weights * wrapped) / lags
    eigenvalues = np.linalg.eigvalsh(np.fft.fft(circulant, axis=0))
    return float(eigenvalues.min()), float(eigenvalues.max())


def _residuals(blocks: np.ndarray, solution: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """|T x - rhs| / |rhs| per system of the batch (NaN where x is not finite).

    A dense LU reaches ~1e-12 on these systems; Levinson is only weakly stable, and where the Gram matrix is
    singular to working precision its residual grows well above that."""
    flat = lambda x: x.reshape(*x.shape[:-3], -1)  # noqa: E731
    residual = flat(toeplitz_matmul(blocks, solution) - rhs)
    ratio = np.linalg.norm(residual, axis=-1) / np.linalg.norm(flat(rhs), axis=-1)
    return np.where(np.isfinite(flat(solution)).all(axis=-1), ratio, np.nan)


def toeplitz_matmul(blocks: np.ndarray, x: np.ndarray) -> np.ndarray:
    """T @ x for the block Toeplitz T of `block_levinson` (block (m, n) = blocks[m - n]), by FFT over the lags."""
    lags = blocks.shape[-3]
    size = 1 << (2 * lags - 1).bit_length()
    # kernel[k] = blocks[k] for k >= 0 and blocks[-k]^T at k < 0, laid out circularly
    kernel = np.zeros((*blocks.shape[:-3], size, *blocks.shape[-2:]))
    kernel[..., :lags, :, :] = blocks
    kernel[..., size - lags + 1 :, :, :] = np.swapaxes(blocks[..., :0:-1, :, :], -1, -2)
    spectrum = np.fft.rfft(kernel, axis=-3) @ np.fft.rfft(x, n=size, axis=-3)
    return np.fft.irfft(spectrum, n=size, axis=-3)[..., :lags, :, :]


def lagged_products(x: Tensor, y: Tensor, lags: int) -> Tensor:
    """(lags, rows of x, rows of y): sum over u of x[a, u] * y[b, u + m], m = 0..lags-1, signals zero outside.

    Accumulated block by block with FFTs of CORRELATION_FFT samples (x in blocks, y in blocks that run lags - 1
    samples further), SAMPLES_PER_BATCH at a time, so that memory does not grow with the track; the cross-
    spectra are summed over the blocks by one matrix product per frequency bin, (bins, x rows, blocks) @
    (bins, blocks, y rows). That product wants each bin's spectra together, and the FFT of torch (like any
    along the last axis) leaves them a block apart: the transposing copies cost more than the FFTs. So the
    blocks are transformed by numpy along the *first* axis of samples-first views (`x.T`, `y.T`: free where
    the caller's rows are columns of a samples-first array, as `bss_eval_v4`'s are), which gives the spectra
    bin-major with no copy, on the CPU whatever the device. Each x block is transformed time-reversed (a
    negative-stride view), which makes the correlation a convolution; lag m is then sample block - 1 + m."""
    x_samples, y_samples = (rows.detach().cpu().to(torch.float64).numpy().T for rows in (x, y))
    return torch.from_numpy(_lagged_products(x_samples, y_samples, lags)).to(x.device)


def _lagged_products(x_samples: np.ndarray, y_samples: np.ndarray, lags: int) -> np.ndarray:
    """`lagged_products` of samples-first signals (samples, rows), any strides."""
    size = _block_fft(CORRELATION_FFT, lags)
    block = size - lags + 1
    length = x_samples.shape[0]
    count = -(-length // block)
    whole = min(length // block, max(0, (length - size) // block + 1))  # blocks of x and y inside the signals
    # batches of whole blocks (at least one per thread), then the blocks that run past the end, from a
    # zero-padded copy of the tail
    per_batch = max(1, min(SAMPLES_PER_BATCH // size, -(-whole // _threads())))
    batches = [
        (x_samples[start * block : min(start + per_batch, whole) * block], y_samples[start * block :])
        for start in range(0, whole, per_batch)
    ]
    if whole < count:
        tail = count * block + lags - 1 - whole * block
        x_tail, y_tail = (_zero_padded(signal[whole * block :], tail) for signal in (x_samples, y_samples))
        batches.append((x_tail[: (count - whole) * block], y_tail))
    total = sum(_parallel_map(lambda batch: _cross_spectra(*batch, block, size), batches))
    return np.fft.irfft(total, n=size, axis=0)[block - 1 : block - 1 + lags]


def _cross_spectra(x: np.ndarray, y: np.ndarray, block: int, size: int) -> np.ndarray:
    """Sum over blocks b of X_b(f)^T Y_b(f), (bins, x rows, y rows): x (blocks x block samples, x rows) and y
    (samples, y rows) samples first, y read from the start of each x block for `size` samples (lags - 1 past
    its end)."""
    count = x.shape[0] // block
    x_blocks = x.reshape(count, block, -1)[:, ::-1].transpose(1, 0, 2)  # (block, count, rows), time-reversed
    y_blocks = as_strided(y, (size, count, y.shape[1]), (y.strides[0], block * y.strides[0], y.strides[1]))
    x_spectra = np.fft.rfft(x_blocks, n=size, axis=0)  # (bins, blocks, x rows)
    y_spectra = np.fft.rfft(y_blocks, axis=0)
    return np.swapaxes(x_spectra, 1, 2) @ y_spectra


def _zero_padded(signal: np.ndarray, length: int) -> np.ndarray:
    """The first `length` samples of a samples-first signal, zeros past its end."""
    padded = np.zeros((length, signal.shape[1]))
    padded[: min(length, signal.shape[0])] = signal[:length]
    return padded


def block_levinson(blocks: Tensor, rhs: Tensor) -> Tensor:
    """Solve T X = rhs for the symmetric block Toeplitz T whose block (m, n) is blocks[m - n], where
    blocks[-k] = blocks[k]^T. blocks: (..., L, p, p), rhs: (..., L, p, q); returns X, (..., L, p, q).

    The Levinson-Wiggins-Robinson recursion in its reflection form (Whittle's): monic forward predictors A
    (T_k A = [Vf 0 .. 0]^T, first block I) and backward ones B (T_k B = [0 .. 0 Vb]^T, last block I) grow one
    block per step by two p x p reflection updates each, and the solution with them. Its L - 1 steps are a
    dozen products of small matrices each, so much of the time goes to per-call overhead, which numpy's is a
    fraction of torch's: it runs in numpy on the CPU whatever the device (the inputs are only L x p x (p + q)
    numbers). A singular prediction-error matrix gives NaN (the caller's residual check then sends the system
    to `solve_dense`)."""
    t = blocks.detach().cpu().to(torch.float64).numpy()
    b_rhs = rhs.detach().cpu().to(torch.float64).numpy()
    return torch.from_numpy(_levinson(t, b_rhs)).to(device=rhs.device, dtype=rhs.dtype)


@np.errstate(all="ignore")  # a singular prediction-error matrix: NaN, not warnings
def _levinson(blocks: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """`block_levinson` on numpy arrays: X, (..., L, p, q); NaN where a prediction-error matrix is singular.

    X grows with the predictors: X_k+1 = [X_k; 0] + B_k+1 Vb^-1 (rhs_k - row k of T_k+1 [X_k; 0]). Everything
    that grows is stored transposed, (p, L p), so that the elementwise updates run along long contiguous rows
    (on (L p, p) column slices numpy loops p elements at a time: the loop ran 30% slower so), B aligned to the
    end of its buffer so that the shift of each step costs nothing; the updates go through preallocated
    buffers. (T is symmetric, so the backward inner product, row 0 of T_k+1 [0; B], equals the transpose of
    the forward one in exact arithmetic; on ill-conditioned systems the shortcut's rounding leaves residuals
    of 1e-7 instead of 1e-10, so it is computed.)"""
    *batch, lags, p, q = rhs.shape
    end = lags * p
    columns = np.ascontiguousarray(np.swapaxes(blocks[..., ::-1, :, :], -1, -2)).reshape(*batch, end, p)
    stacked = np.ascontiguousarray(blocks).reshape(*batch, end, p)  # stacked[.., j p + b, a] = blocks[j][b, a]
    forward_x = np.zeros((*batch, p + q, end))  # [:p] forward predictor A^T, [p:] solution X^T
    backward = np.zeros((*batch, p, end))  # backward predictor B^T, aligned to the end
    scratch = np.empty((*batch, 2, p * end))
    errors = np.empty((*batch, p + q, p))  # (row k of T_k+1 [A | X; 0])^T
    inner = np.empty((*batch, 2, p, p))  # [Vf, Vb]
    forward_x[..., :p, :p] = np.eye(p)
    backward[..., :, end - p :] = np.eye(p)
    inner[..., 0, :, :] = inner[..., 1, :, :] = blocks[..., 0, :, :]
    try:
        inverse = np.linalg.inv(inner)
        forward_x[..., p:, :p] = np.swapaxes(inverse[..., 1, :, :] @ rhs[..., 0, :, :], -1, -2)
        for k in range(1, lags):
            grown = (k + 1) * p
            np.matmul(forward_x[..., : k * p], columns[..., end - grown : end - p, :], out=errors)
            delta = errors[..., :p, :].mT  # row k of T_k+1 [A; 0]
            back = (backward[..., end - k * p :] @ stacked[..., p:grown, :]).mT  # row 0, [0; B]
            reflect_forward = inverse[..., 1, :, :] @ delta
            reflect_backward = inverse[..., 0, :, :] @ back
            a, b = forward_x[..., :p, :grown], backward[..., end - grown :]
            a_update = scratch[..., 0, : p * grown].reshape(*batch, p, grown)
            b_update = scratch[..., 1, : p * grown].reshape(*batch, p, grown)
            np.matmul(reflect_forward.mT, b, out=a_update)
            np.matmul(reflect_backward.mT, a, out=b_update)
            a -= a_update
            b -= b_update
            inner[..., 0, :, :] -= back @ reflect_forward
            inner[..., 1, :, :] -= delta @ reflect_backward
            inverse = np.linalg.inv(inner)
            gain = inverse[..., 1, :, :] @ (rhs[..., k, :, :] - errors[..., p:, :].mT)
            forward_x[..., p:, :grown] += gain.mT @ b
    except np.linalg.LinAlgError:
        return np.full(rhs.shape, np.nan)
    return np.swapaxes(forward_x[..., p:, :], -1, -2).reshape(*batch, lags, p, q)


def solve_dense(blocks: Tensor, rhs: Tensor) -> Tensor:
    """The same system as `block_levinson`, assembled and solved densely (LU, as museval does).

    One system at a time: torch's batched LU on CPU runs the batch's `getrf`s on several threads at once, which
    MKL does not survive once `torch.set_num_threads` has been called (pytorch/pytorch#142815: 'Parameter 6
    was incorrect on entry to DLASWP', then a RuntimeError), and the pipeline sets the thread count."""
    *batch, lags, p, q = rhs.shape
    # every block of T in order of m - n, from -(L - 1) to L - 1, reversed: row m of T is a window of it
    diagonals = torch.cat([blocks[..., 1:, :, :].flip(-3).transpose(-1, -2), blocks], dim=-3).flip(-3)
    rows = diagonals.unfold(-3, lags, 1).flip(-4)  # (..., m, a, b, n) = T[m p + a, n p + b]
    dense = rows.permute(*range(len(batch)), -4, -3, -1, -2).reshape(-1, lags * p, lags * p)
    flat_rhs = rhs.reshape(-1, lags * p, q)
    solutions = [torch.linalg.solve(matrix, right) for matrix, right in zip(dense, flat_rhs, strict=True)]
    return torch.stack(solutions).reshape(*batch, lags, p, q)


@dataclass(frozen=True)
class _Layout:
    """Window length and hop, filter taps, the FFT size of the projections' blocks (> taps), sources."""

    width: int
    hop: int
    taps: int
    size: int
    sources: int


def _window_metrics(
    signals: np.ndarray, response: np.ndarray, layout: _Layout, windows: range
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SDR, ISR, SIR, SAR (each (sources, windows)) of some windows: museval's `_bss_decomp_mtifilt` and
    `_bss_crit` for all sources at once. signals: (samples, reference rows + estimate rows), samples first;
    response: the filters' spectra, (bins, reference rows, 2 x estimate rows). The window's references, zero
    outside it, go through the filters; the projections run taps - 1 samples past the window, where the
    reference and the estimate are zero. Samples first throughout, in numpy: the FFTs run along the first
    axis, which leaves each bin's spectra together for the product with the filters (no transposing copy),
    and the energies are sums along that axis."""
    rows, width, sources, taps, size = response.shape[1], layout.width, layout.sources, layout.taps, layout.size
    step = signals.strides[0]
    framed = as_strided(  # (width, windows, 2 x rows): the windows, as a view
        signals[windows.start * layout.hop :],
        (width, len(windows), 2 * rows),
        (step, layout.hop * step, signals.strides[1]),
        writeable=False,
    )
    refs, ests = framed[..., :rows], framed[..., rows:]
    projected = _project(refs, response, taps, size)  # (width + taps - 1, windows, 2 x rows)
    every, own = projected[..., :rows], projected[..., rows:]  # on all references; on the own source's

    def energy(part: np.ndarray) -> np.ndarray:  # summed over samples and channels: (sources, windows)
        per_row = np.einsum("twr,twr->rw", part, part)
        return per_row.reshape(sources, -1, per_row.shape[1]).sum(axis=1)

    s_energy = energy(refs)
    sdr = _db(s_energy, energy(ests - refs))
    sir = _db(energy(own), energy(every - own))
    own[:width] -= refs  # own - s over the whole span (s is zero past the window)
    isr = _db(s_energy, energy(own))
    every_energy = energy(every)
    every[:width] -= ests  # every - e, likewise
    sar = _db(every_energy, energy(every))
    # museval's `_any_source_silent`, on references and estimates: a source's channel sum zero at every sample
    silent = ~(_source_sums(framed.transpose(1, 0, 2), 2 * sources) != 0).any(axis=1).all(axis=-1)
    scored = [torch.from_numpy(np.where(silent, np.nan, metric)) for metric in (sdr, isr, sir, sar)]
    return scored[0], scored[1], scored[2], scored[3]


def _project(refs: np.ndarray, response: np.ndarray, taps: int, size: int) -> np.ndarray:
    """The windows' references (width, windows, rows) through the filters, zero outside the window: (width +
    taps - 1, windows, filter columns), a new array. Overlap-add of blocks of size - taps + 1 samples, each
    convolved by FFT, one product per bin with the filters' spectra for all blocks and windows (a window in
    one block needs no adding: then size >= width + taps - 1; with several, size >= 2 taps)."""
    width, count, rows = refs.shape
    block = size - taps + 1
    whole, rest = divmod(width, block)
    blocks = whole + (rest > 0)
    spectra = np.empty((size // 2 + 1, count, blocks, rows), dtype=np.complex128)
    if whole:  # the whole blocks, as a view: (block, windows, blocks, rows)
        strides = (refs.strides[0], refs.strides[1], block * refs.strides[0], refs.strides[2])
        spectra[:, :, :whole] = np.fft.rfft(as_strided(refs, (block, count, whole, rows), strides), n=size, axis=0)
    if rest:
        spectra[:, :, whole] = np.fft.rfft(refs[whole * block :], n=size, axis=0)
    products = spectra.reshape(spectra.shape[0], -1, rows) @ response
    pieces = np.fft.irfft(products, n=size, axis=0).reshape(size, count, blocks, -1)
    if blocks == 1:
        return pieces[: width + taps - 1, :, 0]
    projected = np.empty((blocks * block + taps - 1, count, pieces.shape[-1]))
    heads = projected[: blocks * block].reshape(blocks, block, count, -1)
    heads[:] = pieces[:block].transpose(2, 0, 1, 3)
    heads[1:, : taps - 1] += pieces[block:, :, :-1].transpose(2, 0, 1, 3)  # each tail onto the next head
    projected[blocks * block :] = pieces[block:, :, -1]
    return projected[: width + taps - 1]


def _db(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """museval's `_safe_db`: +inf where the denominator is exactly 0, else 10 log10(num / den)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den == 0, np.inf, 10 * np.log10(num / den))


def _threads() -> int:
    """The threads to use: torch's setting (the caller's: the pipeline sets it), as for torch's own work."""
    return max(1, torch.get_num_threads())


def _parallel_map(function: Callable[[_Item], _Result], items: list[_Item]) -> list[_Result]:
    """[function(item) for item in items], on `_threads()` threads: numpy's FFTs, products and elementwise
    loops release the GIL, and they are most of the work (the windows' metrics on 2 cores: 1.9x)."""
    workers = min(len(items), _threads())
    if workers <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(function, items))


def _block_fft(preferred: int, taps: int) -> int:
    """The FFT size of block convolutions and correlations with `taps`-long filters: `preferred`, or the power
    of two that leaves blocks of at least `taps` samples. Blocks of thousands of samples make the per-bin
    products matrix products of a useful size (one block per window makes 22,501 tiny ones per window)."""
    return max(preferred, 1 << (2 * taps - 1).bit_length())


def _fft_size(length: int) -> int:
    """The smallest 2^a 3^b 5^c >= length: fast for FFT libraries, and at most ~10% above `length`."""
    best = 1 << (length - 1).bit_length()
    five = 1
    while five < best:
        three = five
        while three < best:
            two = three
            while two < length:
                two *= 2
            best = min(best, two)
            three *= 3
        five *= 5
    return best


def _as_sources(audio: Audio) -> Tensor:
    """(sources, samples, channels); 1-D and 2-D inputs get unit axes, like museval's `np.atleast_3d`. float32
    or float64 as given (`bss_eval_v4` converts to float64 as it copies), other types as float64."""
    tensor = torch.as_tensor(audio)
    if tensor.ndim == 1:
        tensor = tensor[None, :, None]
    elif tensor.ndim == 2:
        tensor = tensor[:, :, None]
    if tensor.ndim != 3:
        raise ValueError(f"expected (sources, samples, channels) audio, got shape {tuple(tensor.shape)}")
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.to(torch.float64)


def _validate(refs: Tensor, ests: Tensor, window: int, hop: int, filters_len: int) -> None:
    """museval's `validate` on shapes (silence: `_refuse_silent_sources`), with its reasons; plus what museval
    never checks but needs (positive sizes)."""
    if refs.shape != ests.shape:
        raise ValueError(f"references {tuple(refs.shape)} and estimates {tuple(ests.shape)} differ in shape")
    if refs.numel() == 0:
        raise ValueError(f"nothing to evaluate: audio of shape {tuple(refs.shape)}")
    if min(window, hop, filters_len) < 1:
        raise ValueError(f"window ({window}), hop ({hop}) and filters_len ({filters_len}) must be positive")


def _samples_first(refs: Tensor, ests: Tensor) -> np.ndarray:
    """Every reference channel, then every estimate channel, as the columns of one float64 array, (samples,
    2 x sources x channels), rows source-major (source * channels + channel), in one copy that converts on the
    way. The FFTs of the correlations and projections run along its first axis (see `lagged_products`), and
    everything from here runs in numpy on the CPU, where torch's CPU calls cost more per call and its FFTs
    leave each bin's spectra apart."""
    length = refs.shape[1]
    signals = np.empty((length, 2, *refs.shape[::2]))
    for index, audio in enumerate((refs, ests)):
        signals[:, index] = audio.detach().cpu().numpy().transpose(1, 0, 2)
    return signals.reshape(length, -1)


def _source_sums(signals: np.ndarray, sources: int) -> np.ndarray:
    """(..., samples, sources): each source's channels summed, from (..., samples, sources x channels), source-
    major. As strided additions: numpy's sum over a last axis of 2 runs many times slower."""
    channels = signals.shape[-1] // sources
    total = signals[..., ::channels].copy()
    for channel in range(1, channels):
        total += signals[..., channel::channels]
    return total


def _refuse_silent_sources(signals: np.ndarray, sources: int) -> None:
    """museval's `validate` on silence: a source whose channels sum to zero at every sample is refused."""
    heard = (_source_sums(signals, 2 * sources) != 0).any(axis=0)
    for name, silent in zip(("reference", "estimated"), ~heard.reshape(2, sources), strict=True):
        if silent.any():
            raise SilentSourceError(
                f"{name} source(s) {np.flatnonzero(silent).tolist()} are all zeros: museval refuses such a track, "
                "since an all-zero source makes the metrics undefined"
            )
