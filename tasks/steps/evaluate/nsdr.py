"""The simple signal-to-distortion ratio of the Music/Sound Demixing challenges and the Demucs papers ("nSDR").

MDX 2021 (AIcrowd's music-demixing-challenge-starter-kit) and Demucs (`demucs.evaluate.new_sdr`, which says it
is adapted from that kit) score a source over the whole track, without BSSEval's projections:

    SDR = 10 log10((sum ref^2 + 1e-7) / (sum (ref - est)^2 + 1e-7))

summed over samples and channels, in float64 (Demucs casts to double first). A track's score is the mean
over its sources, a test set's the mean over tracks (Demucs also reports the median over tracks).

`chunk_nsdr` is the same ratio in chunks (1 s by default), and `median_chunk_nsdr` their median per source:
the "chunk-level SDR" (cSDR) that papers report next to the whole-track "utterance-level" one, and which is
what BSSEval v4's SDR track median reduces to (in v4, SDR needs no projection; see `bsseval`). Chunks are
museval's windows - whole chunks only, or the whole track when it is shorter than one - and the 1e-7 keeps
silent chunks finite, so the median is a plain median (of the two middle values' mean for an even count).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from tasks.steps.evaluate.bsseval import HOP, WINDOW, frame_count

DELTA = 1e-7  # the challenges' and Demucs's guard against log(0) and division by zero

Audio = Tensor | np.ndarray


def nsdr(references: Audio, estimates: Audio) -> Tensor:
    """(sources,) whole-track SDR in dB of (sources, samples, channels) arrays: MDX 2021's and Demucs's."""
    refs, ests = _pair(references, estimates)
    return _ratio_db(refs.square().sum(dim=(1, 2)), (refs - ests).square().sum(dim=(1, 2)))


def chunk_nsdr(references: Audio, estimates: Audio, chunk: int = WINDOW, hop: int = HOP) -> Tensor:
    """(sources, chunks): the same SDR in each chunk of `chunk` samples, `hop` apart (museval's windows)."""
    refs, ests = _pair(references, estimates)
    if min(chunk, hop) < 1:
        raise ValueError(f"chunk ({chunk}) and hop ({hop}) must be positive")
    length = refs.shape[1]
    width, count = min(chunk, length), frame_count(length, chunk, hop)
    ref_chunks = refs.unfold(1, width, hop)[:, :count]  # (sources, chunks, channels, width)
    err_chunks = (refs - ests).unfold(1, width, hop)[:, :count]
    return _ratio_db(ref_chunks.square().sum(dim=(2, 3)), err_chunks.square().sum(dim=(2, 3)))


def median_chunk_nsdr(references: Audio, estimates: Audio, chunk: int = WINDOW, hop: int = HOP) -> Tensor:
    """(sources,): the median over chunks of `chunk_nsdr` (numpy's median: the middle values' mean)."""
    values = torch.sort(chunk_nsdr(references, estimates, chunk, hop), dim=-1).values
    count = values.shape[-1]
    return (values[:, (count - 1) // 2] + values[:, count // 2]) / 2


def _ratio_db(signal: Tensor, error: Tensor) -> Tensor:
    return 10 * torch.log10((signal + DELTA) / (error + DELTA))


def _pair(references: Audio, estimates: Audio) -> tuple[Tensor, Tensor]:
    """float64 (sources, samples, channels) tensors of one shape (estimates are not padded: say what is wrong)."""
    refs = torch.as_tensor(references).to(torch.float64)
    ests = torch.as_tensor(estimates).to(device=refs.device, dtype=torch.float64)
    if refs.ndim != 3 or refs.shape != ests.shape:
        raise ValueError(
            f"expected (sources, samples, channels) references and estimates of one shape, got "
            f"{tuple(refs.shape)} and {tuple(ests.shape)}"
        )
    if refs.shape[1] == 0:
        raise ValueError("nothing to evaluate: the references have no samples")
    return refs, ests
