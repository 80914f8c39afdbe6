"""What the `evaluate` flow costs beyond separation, per second of audio; and the anchors of its scores.

Dataset: the three MUSDB18 clips of ../shared/testdata/musdb7 (NI stem files) and one reference folder (MUSDB18-HQ
layout) of `--long` seconds, made by repeating the lossless clip's streams. The flow runs twice in this process
(temporary Prefect API), with the tiny random-weight HTDemucs on the CPU:

1. first run: separates every mixture, publishes, then scores; `evaluate_s` per item is the time spent beyond
   separation (decoding references and published stems, BSSEval v4 and nSDR);
2. second run, same settings: every mixture is skipped (its stems are published), so its whole wall time is what
   evaluating published stems costs, Prefect and the catalog included.

Anchors (no model): each clip's references scored against themselves (the ceiling) and mixture / 4 as every
stem's estimate (the low baseline), per stem.

    python benchmarks/evaluate_cost.py --work /tmp/bench-eval --out benchmarks/results/evaluate_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import TESTDATA, load, machine

MODEL = "tiny"
STEMS = ("drums", "bass", "other", "vocals")
LOSSLESS = "The Easton Ellises - Falcon 69 (NI ALAC).stem.m4a"


def long_reference_folder(folder: Path, seconds: float) -> Path:
    from tests.helpers.audiogen import write_audio
    from tests.helpers.bsseval_reference import read_stem_file

    streams = read_stem_file(TESTDATA / "musdb7" / LOSSLESS)  # (5, samples, 2)
    repeats = int(np.ceil(seconds * 44100 / streams.shape[1]))
    tiled = np.concatenate([streams] * repeats, axis=1)[:, : int(seconds * 44100)]
    for name, audio in zip(["mixture", *STEMS], tiled, strict=True):
        write_audio(folder / f"{name}.wav", audio.T)
    return folder


def anchors() -> dict[str, Any]:
    from tasks.steps.evaluate.scoring import score_arrays
    from tests.helpers.bsseval_reference import read_stem_file

    result: dict[str, Any] = {}
    for clip in sorted((TESTDATA / "musdb7").glob("*.stem.*")):
        streams = read_stem_file(clip).astype(np.float64)
        mixture, refs = streams[0], streams[1:]
        oracle = score_arrays(refs, refs, list(STEMS), 44100)
        quarter = score_arrays(refs, np.repeat(mixture[None] / 4, 4, axis=0), list(STEMS), 44100)
        result[clip.name] = {
            s.stem: {
                "oracle_nsdr": round(s.nsdr, 2),
                "oracle_sdr": s.sdr,
                "oracle_sir_isr_sar_min": round(min(s.sir or 0, s.isr or 0, s.sar or 0), 1),
                "mixture4_sdr": None if q.sdr is None else round(q.sdr, 2),
                "mixture4_nsdr": round(q.nsdr, 2),
            }
            for s, q in zip(oracle, quarter, strict=True)
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/stemworks-bench-eval"))
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results") / "evaluate_cost.json")
    parser.add_argument("--long", type=float, default=60.0, help="seconds of the long reference folder")
    args = parser.parse_args()

    from flows.evaluate import EvaluationSummary, evaluate, evaluation_summary
    from tasks.core.settings import Limits, OutputSettings, SeparationSettings
    from tasks.engine.model_repo import write_random_htdemucs

    args.work.mkdir(parents=True, exist_ok=True)
    dataset = args.work / "dataset"
    long_reference_folder(dataset / "long", args.long)
    for clip in (TESTDATA / "musdb7").glob("*.stem.*"):
        target = dataset / clip.name
        if not target.exists():
            target.symlink_to(clip)
    repo = args.work / "models"
    if not list(repo.glob(f"{MODEL}-*.th")):
        write_random_htdemucs(repo, name=MODEL, size="tiny")
    run_name = str(int(time.time()))
    settings = {
        "separation": SeparationSettings(model=MODEL, model_repo=str(repo), device="cpu", shifts=0),
        "output": OutputSettings(out=str(args.work / f"out-{run_name}")),
        "limits": Limits(),
        "catalog": str(args.work / f"catalog-{run_name}.duckdb"),
        "work_root": str(args.work / "tmp"),
    }

    def timed_run() -> tuple[EvaluationSummary, float]:
        started = time.perf_counter()
        summary = evaluation_summary(evaluate([str(dataset)], return_state=True, **settings))
        return summary, time.perf_counter() - started

    load_before = load()
    first, first_wall = timed_run()
    second, second_wall = timed_run()
    audio = sum(i.seconds or 0 for i in first.items)
    per_item = {
        i.item: {"seconds": i.seconds, "evaluate_s": i.evaluate_s, "evaluate_s_per_audio_s": _ratio(i.evaluate_s, i)}
        for i in first.items
    }
    report = {
        "machine": machine(),
        "model": "tiny HTDemucs (random weights), CPU, shifts 0",
        "command": " ".join(["python", "benchmarks/evaluate_cost.py", *sys.argv[1:]]),
        "load": {"before": load_before, "after": load()},
        "items": len(first.items),
        "audio_seconds": round(audio, 3),
        "first_run": {
            "wall_s": round(first_wall, 2),
            "evaluate_s_total": round(sum(i.evaluate_s or 0 for i in first.items), 3),
            "evaluate_s_per_audio_s": round(sum(i.evaluate_s or 0 for i in first.items) / audio, 4),
            "per_item": per_item,
        },
        "second_run_all_skipped": {
            "wall_s": round(second_wall, 2),
            "wall_s_per_audio_s": round(second_wall / audio, 4),
            "evaluate_s_per_audio_s": round(sum(i.evaluate_s or 0 for i in second.items) / audio, 4),
            "separations": [i.separation_status for i in second.items],
        },
        "median_item_evaluate_s_per_audio_s": statistics.median(
            v["evaluate_s_per_audio_s"] for v in per_item.values() if v["evaluate_s_per_audio_s"] is not None
        ),
        "anchors": anchors(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("anchors", "machine")}, indent=2))
    print(json.dumps(report["anchors"], indent=2))


def _ratio(value: float | None, item: Any) -> float | None:
    return round(value / item.seconds, 4) if value is not None and item.seconds else None


if __name__ == "__main__":
    main()
