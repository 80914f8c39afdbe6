"""BSSEval v4 in torch: SDR, ISR, SIR and SAR as museval 0.4.1 computes them for SiSEC 2018 and MUSDB18.

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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
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
WINDOWS_PER_BATCH = 8  # evaluation windows projected at once (bounds memory on long tracks)

Audio = Tensor | np.ndarray


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
    ref_rows = refs.permute(0, 2, 1).reshape(sources * channels, length)
    est_rows = ests.permute(0, 2, 1).reshape(sources * channels, length)
    _refuse_silent_sources(ref_rows, est_rows, sources)
    every, own, stable = distortion_filters(ref_rows, est_rows, channels, filters_len)
    width, count = min(window, length), frame_count(length, window, hop)
    size = min(_block_fft(PROJECTION_FFT, filters_len), _fft_size(width + filters_len - 1))
    # the filters' frequency responses, (bins, ref rows, 2 x est rows): all references' filters, then the own
    # source's (block diagonal), so that one product per bin makes both projections
    filters = torch.cat([every, own], dim=2)
    response = torch.fft.rfft(filters, n=size, dim=0).contiguous()
    layout = _Layout(width=width, hop=hop, taps=filters_len, size=size, sources=sources)
    parts = [
        _window_metrics(ref_rows, est_rows, response, layout, range(start, min(start + WINDOWS_PER_BATCH, count)))
        for start in range(0, count, WINDOWS_PER_BATCH)
    ]
    sdr, isr, sir, sar = (torch.cat([part[k] for part in parts], dim=1) for k in range(4))
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


def distortion_filters(
    ref_rows: Tensor, est_rows: Tensor, channels: int, filters_len: int
) -> tuple[Tensor, Tensor, bool]:
    """Least-squares FIR filters onto each estimate row, both (taps, reference rows, estimate rows): from all
    the references (museval's C), and from the estimate's own source only (museval's Cj, block diagonal: zero
    from another source's rows); and whether they are museval's (`FrameMetrics.stable`): the references' Gram
    matrix well conditioned and both systems solved to the residual a dense solve reaches.

    Both systems go through one batched block Levinson recursion: the own-source system is the full one with
    every block masked to its same-source c x c blocks (museval's per-source solves, all at once). Where the
    Gram matrix is singular to working precision (`spectral_range` spread above CONDITION_LIMIT), or the
    recursion breaks down, both are solved with a ridge of (largest eigenvalue) / CONDITION_LIMIT added to the
    diagonal instead: museval's filters are rounding noise in the null directions there (its ISR, SIR and SAR
    move by tens of dB between LAPACK builds), and the ridge gives a well-defined answer at the recursion's
    cost, not a dense solve's. Rows are source-major: source * channels + channel."""
    rows = ref_rows.shape[0]
    correlations = lagged_products(ref_rows, torch.cat([ref_rows, est_rows]), filters_len)
    blocks, rhs = correlations[..., :rows].clone(), correlations[..., rows:]
    blocks[0] += EPS * torch.eye(rows, dtype=blocks.dtype, device=blocks.device)
    source = torch.arange(rows, device=blocks.device) // channels
    same_source = (source[:, None] == source[None, :]).to(blocks.dtype)
    systems, targets = torch.stack([blocks, blocks * same_source]), torch.stack([rhs, rhs * same_source])
    smallest, largest = spectral_range(blocks)
    conditioned = smallest * CONDITION_LIMIT >= largest
    if conditioned:
        solution = block_levinson(systems, targets)
        residual = float(_residuals(systems, solution, targets).max())  # NaN where not finite
        if residual <= LEVINSON_RESIDUAL:
            return solution[0], solution[1], True
        if residual <= FALLBACK_RESIDUAL:
            return solution[0], solution[1], False
    ridged = systems.clone()
    ridged[:, 0] += (largest / CONDITION_LIMIT) * torch.eye(rows, dtype=blocks.dtype, device=blocks.device)
    solution = block_levinson(ridged, targets)
    failed = ~(_residuals(ridged, solution, targets) <= FALLBACK_RESIDUAL)
    if bool(failed.any()):  # the recursion broke down even so: a dense LU, museval's method
        solution[failed] = solve_dense(systems[failed], targets[failed])
    return solution[0], solution[1], False


def spectral_range(blocks: Tensor) -> tuple[float, float]:
    """The smallest and largest eigenvalues of T. Chan's optimal block-circulant approximation of the block
    Toeplitz Gram matrix (block (m, n) = blocks[m - n]): the range of the references' cross-power spectra at
    the filters' frequency resolution, a solver-independent estimate of how singular the normal equations are
    (real clips: ~1e7 apart on lossless and well-behaved AAC stems, ~5e12 on a band-limited AAC one)."""
    lags = blocks.shape[-3]
    weights = torch.arange(lags, dtype=blocks.dtype, device=blocks.device)[:, None, None]
    wrapped = torch.cat([torch.zeros_like(blocks[:1]), blocks[1:].flip(0).transpose(-1, -2)])  # blocks[k - L]
    circulant = ((lags - weights) * blocks + weights * wrapped) / lags
    eigenvalues = torch.linalg.eigvalsh(torch.fft.fft(circulant, dim=0))
    return float(eigenvalues.min()), float(eigenvalues.max())


def _residuals(blocks: Tensor, solution: Tensor, rhs: Tensor) -> Tensor:
    """|T x - rhs| / |rhs| per system of the batch (NaN where x is not finite).

    A dense LU reaches ~1e-12 on these systems; Levinson is only weakly stable, and where the Gram matrix is
    singular to working precision its residual grows well above that."""
    residual = toeplitz_matmul(blocks, solution) - rhs
    ratio = torch.linalg.vector_norm(residual, dim=(-3, -2, -1)) / torch.linalg.vector_norm(rhs, dim=(-3, -2, -1))
    finite = torch.isfinite(solution).flatten(start_dim=-3).all(dim=-1)
    return torch.where(finite, ratio, torch.nan)


def toeplitz_matmul(blocks: Tensor, x: Tensor) -> Tensor:
    """T @ x for the block Toeplitz T of `block_levinson` (block (m, n) = blocks[m - n]), by FFT over the lags."""
    lags = blocks.shape[-3]
    size = 1 << (2 * lags - 1).bit_length()
    # kernel[k] = blocks[k] for k >= 0 and blocks[-k]^T at k < 0, laid out circularly
    kernel = torch.cat(
        [
            blocks,
            blocks.new_zeros(*blocks.shape[:-3], size - 2 * lags + 1, *blocks.shape[-2:]),
            blocks[..., 1:, :, :].flip(-3).transpose(-1, -2),
        ],
        dim=-3,
    )
    spectrum = torch.fft.rfft(kernel, dim=-3) @ torch.fft.rfft(x, n=size, dim=-3)
    return torch.fft.irfft(spectrum, n=size, dim=-3)[..., :lags, :, :]


def lagged_products(x: Tensor, y: Tensor, lags: int) -> Tensor:
    """(lags, rows of x, rows of y): sum over u of x[a, u] * y[b, u + m], m = 0..lags-1, signals zero outside.

    Accumulated block by block with FFTs of CORRELATION_FFT samples (x in blocks, y in blocks that run lags - 1
    samples further), SAMPLES_PER_BATCH at a time, so that memory does not grow with the track. Each x block
    is transformed time-reversed, which makes the correlation a convolution (no conjugate: a conjugated or
    strided operand makes torch's batched complex product copy each bin's matrices one by one, many times
    slower), and the cross-spectra are summed over the blocks by one matrix product per frequency bin:
    (bins, x rows, blocks) @ (bins, blocks, y rows). Lag m is then sample block - 1 + m of the convolution."""
    size = _block_fft(CORRELATION_FFT, lags)
    block = size - lags + 1
    count = -(-x.shape[-1] // block)
    x_blocks = F.pad(x, (0, count * block - x.shape[-1])).reshape(x.shape[0], count, block).flip(-1)
    y_blocks = F.pad(y, (0, count * block + lags - 1 - y.shape[-1])).unfold(-1, block + lags - 1, block)
    total = torch.zeros(size // 2 + 1, x.shape[0], y.shape[0], dtype=torch.complex128, device=x.device)
    per_batch = max(1, SAMPLES_PER_BATCH // size)
    for start in range(0, count, per_batch):
        stop = start + per_batch
        x_spec = torch.fft.rfft(x_blocks[:, start:stop], n=size).permute(2, 0, 1).contiguous()
        y_spec = torch.fft.rfft(y_blocks[:, start:stop], n=size).permute(2, 1, 0).contiguous()
        total += x_spec @ y_spec
    return torch.fft.irfft(total, n=size, dim=0)[block - 1 : block - 1 + lags]


def block_levinson(blocks: Tensor, rhs: Tensor) -> Tensor:
    """Solve T X = rhs for the symmetric block Toeplitz T whose block (m, n) is blocks[m - n], where
    blocks[-k] = blocks[k]^T. blocks: (..., L, p, p), rhs: (..., L, p, q); returns X, (..., L, p, q).

    The Levinson-Wiggins-Robinson recursion in its reflection form (Whittle's): monic forward predictors A
    (T_k A = [Vf 0 .. 0]^T, first block I) and backward ones B (T_k B = [0 .. 0 Vb]^T, last block I) grow one
    block per step by two p x p reflection updates each, and the solution with them. B is kept aligned to the
    end of its buffer so that the shift of each step costs nothing. Its L - 1 steps are a dozen products of
    small matrices each, so the time goes to per-call overhead, which numpy's is a fraction of torch's: it
    runs in numpy on the CPU whatever the device (the inputs are only L x p x (p + q) numbers). A singular
    prediction-error matrix gives NaN (the caller's residual check then sends the system to `solve_dense`)."""
    *batch, lags, p, q = rhs.shape
    t = blocks.detach().cpu().to(torch.float64).numpy()
    b_rhs = rhs.detach().cpu().to(torch.float64).numpy()
    try:
        with np.errstate(all="ignore"):
            solution = _levinson(t, b_rhs, lags, p, q)
    except np.linalg.LinAlgError:
        solution = np.full((*batch, lags * p, q), np.nan)
    return torch.from_numpy(solution.reshape(*batch, lags, p, q)).to(device=rhs.device, dtype=rhs.dtype)


def _levinson(blocks: np.ndarray, rhs: np.ndarray, lags: int, p: int, q: int) -> np.ndarray:
    """`block_levinson` on numpy arrays, with block rows stacked: returns X as (..., L * p, q)."""
    batch = blocks.shape[:-3]
    # rows[.., a, (L-1-j) p + b] = blocks[j][a, b]; cols[.., a, j p + b] = blocks[j][b, a]
    rows = np.ascontiguousarray(np.swapaxes(blocks[..., ::-1, :, :], -3, -2)).reshape(*batch, p, lags * p)
    cols = np.ascontiguousarray(np.swapaxes(np.swapaxes(blocks, -1, -2), -3, -2)).reshape(*batch, p, lags * p)
    end = lags * p
    forward_x = np.zeros((*batch, end, p + q))  # [:, :p] forward predictor A, [:, p:] solution X
    backward = np.zeros((*batch, end, p))  # backward predictor B, aligned to the end
    forward_x[..., :p, :p] = np.eye(p)
    backward[..., end - p :, :] = np.eye(p)
    forward_error = blocks[..., 0, :, :].copy()  # Vf
    backward_inverse = np.linalg.inv(forward_error)  # Vb^-1 (Vb = Vf at the start)
    forward_inverse = backward_inverse
    forward_x[..., :p, p:] = backward_inverse @ rhs[..., 0, :, :]
    backward_error = forward_error
    for k in range(1, lags):
        span, grown = k * p, (k + 1) * p
        errors = rows[..., end - grown : end - p] @ forward_x[..., :span, :]  # row k of T_k+1 [A | X; 0]
        back = cols[..., p:grown] @ backward[..., end - span :, :]  # row 0 of T_k+1 [0; B]
        reflect_forward = backward_inverse @ errors[..., :p]
        reflect_backward = forward_inverse @ back
        a = forward_x[..., :grown, :p]
        b = backward[..., end - grown :, :]
        shifted = b @ reflect_forward
        b -= a @ reflect_backward
        a -= shifted
        forward_error = forward_error - back @ reflect_forward
        backward_error = backward_error - errors[..., :p] @ reflect_backward
        forward_inverse, backward_inverse = np.linalg.inv(forward_error), np.linalg.inv(backward_error)
        forward_x[..., :grown, p:] += b @ (backward_inverse @ (rhs[..., k, :, :] - errors[..., p:]))
    return forward_x[..., p:]


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
    ref_rows: Tensor, est_rows: Tensor, response: Tensor, layout: _Layout, windows: range
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SDR, ISR, SIR, SAR (each (sources, windows)) of some windows: museval's `_bss_decomp_mtifilt` and
    `_bss_crit` for all sources at once. The window's references, zero outside it, go through the filters;
    the projections run taps - 1 samples past the window, where the reference and the estimate are zero."""
    rows, width, sources, taps, size = ref_rows.shape[0], layout.width, layout.sources, layout.taps, layout.size
    refs = ref_rows.unfold(-1, width, layout.hop)[:, windows.start : windows.stop]  # (rows, windows, width)
    ests = est_rows.unfold(-1, width, layout.hop)[:, windows.start : windows.stop]
    # overlap-add: the window in blocks of size - taps + 1 samples, each convolved by FFT, tails added on (a
    # window in one block needs none: then size >= width + taps - 1; with several, size >= 2 taps)
    block = size - taps + 1
    blocks = -(-width // block)
    cut = F.pad(refs, (0, blocks * block - width)).reshape(rows, -1, block)  # (rows, windows x blocks, block)
    spectra = torch.fft.rfft(cut, n=size).permute(2, 1, 0).contiguous()  # (bins, windows x blocks, rows)
    pieces = torch.fft.irfft((spectra @ response).permute(2, 1, 0), n=size)
    pieces = pieces.reshape(2 * rows, len(windows), blocks, size)
    span = width + taps - 1
    if blocks == 1:
        projected = pieces[:, :, 0, :span]
    else:  # each block's head in place, its tail added onto the next block's head (the last one's appended)
        projected = pieces.new_empty(2 * rows, len(windows), blocks * block + taps - 1)
        projected[..., : blocks * block] = pieces[..., :block].reshape(2 * rows, len(windows), blocks * block)
        projected[..., blocks * block :] = pieces[:, :, -1, block:]
        following = projected[..., block : blocks * block].unflatten(-1, (blocks - 1, block))
        following[..., : taps - 1] += pieces[:, :, :-1, block:]
        projected = projected[..., :span]
    every = projected[:rows]  # (rows, windows, span): on all references
    own = projected[rows:]  # on the estimate's own reference

    def energy(*parts: Tensor) -> Tensor:  # summed over channels and samples, per source and window
        total = sum(torch.linalg.vector_norm(part, dim=-1).square() for part in parts)
        assert isinstance(total, Tensor)
        return total.reshape(sources, -1, total.shape[-1]).sum(dim=1)

    s_energy = energy(refs)
    metrics = (
        _db(s_energy, energy(ests - refs)),
        _db(s_energy, energy(own[..., :width] - refs, own[..., width:])),
        _db(energy(own), energy(every - own)),
        _db(energy(every), energy(ests - every[..., :width], every[..., width:])),
    )
    silent = _silent_windows(refs, sources) | _silent_windows(ests, sources)
    sdr, isr, sir, sar = (torch.where(silent, torch.nan, metric) for metric in metrics)
    return sdr, isr, sir, sar


def _silent_windows(windows: Tensor, sources: int) -> Tensor:
    """(windows,) True where some source's channel sum is zero at every sample (museval's `_any_source_silent`)."""
    per_source = windows.reshape(sources, -1, *windows.shape[1:]).sum(dim=1)
    return (per_source == 0).all(dim=-1).any(dim=0)


def _db(num: Tensor, den: Tensor) -> Tensor:
    """museval's `_safe_db`: +inf where the denominator is exactly 0, else 10 log10(num / den)."""
    return torch.where(den == 0, torch.inf, 10 * torch.log10(num / den))


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
    """float64 (sources, samples, channels); 1-D and 2-D inputs get unit axes, like museval's `np.atleast_3d`."""
    tensor = torch.as_tensor(audio)
    if tensor.ndim == 1:
        tensor = tensor[None, :, None]
    elif tensor.ndim == 2:
        tensor = tensor[:, :, None]
    if tensor.ndim != 3:
        raise ValueError(f"expected (sources, samples, channels) audio, got shape {tuple(tensor.shape)}")
    return tensor.to(torch.float64)


def _validate(refs: Tensor, ests: Tensor, window: int, hop: int, filters_len: int) -> None:
    """museval's `validate` on shapes (silence: `_refuse_silent_sources`), with its reasons; plus what museval
    never checks but needs (positive sizes)."""
    if refs.shape != ests.shape:
        raise ValueError(f"references {tuple(refs.shape)} and estimates {tuple(ests.shape)} differ in shape")
    if refs.numel() == 0:
        raise ValueError(f"nothing to evaluate: audio of shape {tuple(refs.shape)}")
    if min(window, hop, filters_len) < 1:
        raise ValueError(f"window ({window}), hop ({hop}) and filters_len ({filters_len}) must be positive")


def _refuse_silent_sources(ref_rows: Tensor, est_rows: Tensor, sources: int) -> None:
    """museval's `validate` on silence: a source whose channels sum to zero at every sample is refused."""
    for name, rows in (("reference", ref_rows), ("estimated", est_rows)):
        silent = (rows.reshape(sources, -1, rows.shape[-1]).sum(dim=1) == 0).all(dim=1).nonzero().flatten().tolist()
        if silent:
            raise SilentSourceError(
                f"{name} source(s) {silent} are all zeros: museval refuses such a track, "
                "since an all-zero source makes the metrics undefined"
            )
