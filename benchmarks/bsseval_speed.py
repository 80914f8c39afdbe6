"""CPU: BSSEval v4 by `tasks.steps.evaluate.bsseval` against museval 0.4.1 on the same inputs, in one run.

The three MUSDB18 preview clips in ../shared/testdata/musdb7 (4 stems each, ~6-7 s), with estimates made
from the references (no trained model here): each stem plus noise of its own spectrogram at -15 dB plus 0.1 x
another stem. Per clip: museval's `bss_eval` (museval.evaluate's settings: 1 s windows and hops, 512 taps,
v4) once, and ours after one warm-up call, best of `--repeats`. Prints wall seconds for each, the ratio, and the
largest absolute difference in dB, per window and per track median (museval's TrackStore aggregation): over
every metric where the references' Gram matrix is well conditioned, and over SDR alone on the clip where it is
not (there museval's own ISR/SIR/SAR are rounding noise; see tasks/steps/evaluate/bsseval.py).

    python benchmarks/bsseval_speed.py --out benchmarks/results/bsseval_speed.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import TESTDATA, load, machine
from tasks.steps.evaluate.bsseval import bss_eval_v4
from tests.helpers.bsseval_reference import (
    METRICS,
    MUSDB_CLIPS,
    REAL_ESTIMATES,
    as_array,
    medians_array,
    museval_frames,
    museval_medians,
    read_stem_file,
)

ESTIMATES = "reference + in-band noise + leak"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results") / "bsseval_speed.json")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    load_before = load()
    clips = [_clip(name, args.repeats) for name in MUSDB_CLIPS]
    museval_s = sum(clip["museval_s"] for clip in clips)
    ours_s = sum(clip["ours_s"] for clip in clips)
    stable = [clip for clip in clips if clip["stable"]]
    report = {
        "machine": machine(),
        "command": " ".join(["python", "benchmarks/bsseval_speed.py", *sys.argv[1:]]),
        "load": {"before": load_before, "after": load()},
        "estimates": ESTIMATES,
        "clips": clips,
        "museval_s": round(museval_s, 3),
        "ours_s": round(ours_s, 3),
        "speedup": round(museval_s / ours_s, 1),
        "max_abs_diff_db": {
            "all_metrics_well_conditioned_clips": _worst(stable, slice(None)),
            "sdr_all_clips": _worst(clips, slice(0, 1)),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


def _clip(name: str, repeats: int) -> dict[str, Any]:
    stems = read_stem_file(TESTDATA / "musdb7" / name)
    refs, ests = stems[1:], REAL_ESTIMATES[ESTIMATES](stems)
    started = time.perf_counter()
    expected = museval_frames(refs, ests)
    museval_s = time.perf_counter() - started
    bss_eval_v4(torch.from_numpy(refs), torch.from_numpy(ests))  # warm-up: first-call allocations
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        frames = bss_eval_v4(torch.from_numpy(refs), torch.from_numpy(ests))
        times.append(time.perf_counter() - started)
    windows, medians = as_array(frames), medians_array(frames)
    return {
        "clip": name,
        "seconds": round(refs.shape[1] / 44100, 2),
        "stable": frames.stable,
        "museval_s": round(museval_s, 3),
        "ours_s": round(min(times), 3),
        "speedup": round(museval_s / min(times), 1),
        "diff_db": {"window": _diffs(windows, expected), "median": _diffs(medians, museval_medians(expected))},
    }


def _diffs(ours: np.ndarray, museval: np.ndarray) -> dict[str, float]:
    finite = np.isfinite(ours) & np.isfinite(museval)
    diff = np.where(finite, np.abs(ours - museval), 0.0)
    axes = tuple(range(1, diff.ndim))
    return {metric: float(value) for metric, value in zip(METRICS, diff.max(axis=axes), strict=True)}


def _worst(clips: list[dict[str, Any]], metrics: slice) -> dict[str, float]:
    return {
        level: max(
            (value for clip in clips for value in list(clip["diff_db"][level].values())[metrics]), default=float("nan")
        )
        for level in ("window", "median")
    }


if __name__ == "__main__":
    main()
