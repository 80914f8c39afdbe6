"""CPU: where BSSEval v4's time goes in `tasks.steps.evaluate.bsseval`, stage by stage, on one MUSDB18 clip.

The whole `bss_eval_v4` call and each of its stages alone, best of `--repeats` after a warm-up: the samples-first
copy, the silence check, the lagged correlations, the conditioning estimate, the block Levinson solves (all
references; each source's own), the residual check, and the windows' projections and energies (in parallel, as
`bss_eval_v4` runs them). Then the FFT work inside one `bss_eval_v4` call on one thread: how many points its
transforms have and the CPU time they take, the part of the total that only a faster FFT could shrink. What to
attack next for the 50x-museval goal of `benchmarks/bsseval_speed.py`.

    python benchmarks/bsseval_stages.py --out benchmarks/results/bsseval_stages.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import TESTDATA, load, machine
from tasks.steps.evaluate import bsseval
from tests.helpers.bsseval_reference import MUSDB_CLIPS, REAL_ESTIMATES, read_stem_file

ESTIMATES = "reference + in-band noise + leak"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--clip", default=MUSDB_CLIPS[2], help="an NI stem file in ../shared/testdata/musdb7")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results") / "bsseval_stages.json")
    args = parser.parse_args()
    load_before = load()
    stems = read_stem_file(TESTDATA / "musdb7" / args.clip)
    refs, ests = torch.from_numpy(stems[1:]), torch.from_numpy(REAL_ESTIMATES[ESTIMATES](stems))
    best = lambda function: _best(function, args.repeats)  # noqa: E731
    signals = bsseval._samples_first(refs, ests)
    sources, length, channels = refs.shape
    rows = sources * channels
    correlations = bsseval._lagged_products(signals[:, :rows], signals, bsseval.FILTERS_LEN)
    blocks, rhs = correlations[..., :rows].copy(), correlations[..., rows:]
    blocks[0] += bsseval.EPS * np.eye(rows)
    own = (bsseval._source_blocks(blocks, channels), bsseval._source_blocks(rhs, channels))
    full = bsseval._levinson(blocks[None], rhs[None])
    every, own_filters, _ = bsseval.distortion_filters(signals, channels, bsseval.FILTERS_LEN)
    width, count = min(bsseval.WINDOW, length), bsseval.frame_count(length, bsseval.WINDOW, bsseval.HOP)
    size = min(
        bsseval._block_fft(bsseval.PROJECTION_FFT, bsseval.FILTERS_LEN),
        bsseval._fft_size(width + bsseval.FILTERS_LEN - 1),
    )
    response = np.fft.rfft(np.concatenate([every, own_filters], axis=2), n=size, axis=0)
    layout = bsseval._Layout(width=width, hop=bsseval.HOP, taps=bsseval.FILTERS_LEN, size=size, sources=sources)
    windows = [range(w, w + 1) for w in range(count)]
    stages = {
        "total (bss_eval_v4)": best(lambda: bsseval.bss_eval_v4(refs, ests)),
        "samples-first copy": best(lambda: bsseval._samples_first(refs, ests)),
        "silence check": best(lambda: bsseval._refuse_silent_sources(signals, sources)),
        "lagged correlations": best(lambda: bsseval._lagged_products(signals[:, :rows], signals, bsseval.FILTERS_LEN)),
        "conditioning (spectral_range)": best(lambda: bsseval.spectral_range(blocks)),
        "Levinson, all references": best(lambda: bsseval._levinson(blocks[None], rhs[None])),
        "Levinson, each source's own": best(lambda: bsseval._levinson(*own)),
        "residual check": best(lambda: bsseval._residuals(blocks[None], full, rhs[None])),
        "filter responses": best(lambda: np.fft.rfft(np.concatenate([every, own_filters], axis=2), n=size, axis=0)),
        "windows: projections and energies": best(
            lambda: bsseval._parallel_map(
                lambda window: bsseval._window_metrics(signals, response, layout, window), windows
            )
        ),
    }
    report: dict[str, Any] = {
        "machine": machine(),
        "command": " ".join(["python", "benchmarks/bsseval_stages.py", *sys.argv[1:]]),
        "load": {"before": load_before, "after": load()},
        "clip": args.clip,
        "seconds": round(length / 44100, 2),
        "windows": count,
        "stages_ms": {name: round(seconds * 1000, 1) for name, seconds in stages.items()},
        "fft_one_thread": _fft_work(lambda: bsseval.bss_eval_v4(refs, ests), args.repeats),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


def _fft_work(function: Callable[[], object], repeats: int) -> dict[str, float]:
    """The real FFTs inside `function()` with one thread: points transformed (real samples in or out) and their
    time, best of `repeats`, beside the whole call's time on one thread."""
    spent = {"seconds": 0.0, "points": 0.0}

    def timed(transform: Callable[..., np.ndarray], inverse: bool) -> Callable[..., np.ndarray]:
        def wrapper(a: np.ndarray, n: int | None = None, axis: int = -1) -> np.ndarray:
            started = time.perf_counter()
            result = transform(a, n=n, axis=axis)
            spent["seconds"] += time.perf_counter() - started
            length = result.shape[axis] if inverse else (n or a.shape[axis])
            spent["points"] += result.size // result.shape[axis] * length
            return result

        return wrapper

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bsseval's thread count: its FFTs then run one at a time
    try:
        with mock.patch.multiple(np.fft, rfft=timed(np.fft.rfft, False), irfft=timed(np.fft.irfft, True)):
            runs = []
            for _ in range(repeats):
                spent.update(seconds=0.0, points=0.0)
                started = time.perf_counter()
                function()
                runs.append((time.perf_counter() - started, spent["seconds"], spent["points"]))
    finally:
        torch.set_num_threads(threads)
    total, fft, points = min(runs)
    return {"total_ms": round(total * 1000, 1), "fft_ms": round(fft * 1000, 1), "fft_points_m": round(points / 1e6, 2)}


def _best(function: Callable[[], object], repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


if __name__ == "__main__":
    main()
