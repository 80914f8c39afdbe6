"""How fast `stemworks separate` answers a command-line mistake (goal: exit 2 within 3 s on this machine).

Each case runs the real CLI in a fresh process, several times; the figure is the median wall time.
The reference in the same run is `stemworks --help` (interpreter start and the CLI's own imports),
so the ratio says what a check costs on top of starting Python at all. No Prefect server is running
and the machine has no network: the model hub cannot be reached (the "no network" case).

    python benchmarks/usage_errors.py --work /tmp/bench-usage --out benchmarks/results/usage_errors.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import ROOT, load, machine


def cases(work: Path) -> dict[str, list[str]]:
    models, source = work / "models", work / "a.wav"
    repo = ["--model-repo", str(models), "--model", "tiny"]
    return {
        "--help (reference)": ["--help"],
        "source does not exist": ["separate", str(work / "missing.wav"), *repo],
        "--format flac --bit-depth 32": ["separate", str(source), "--format", "flac", "--bit-depth", "32"],
        "--device cuda without CUDA": ["separate", str(source), *repo, "--device", "cuda"],
        "unknown --model in --model-repo": ["separate", str(source), "--model-repo", str(models), "--model", "nope"],
        "--model-repo not a folder": ["separate", str(source), "--model-repo", str(work / "nowhere")],
        "--two-stems guitar": ["separate", str(source), *repo, "--two-stems", "guitar"],
        "htdemucs without network": ["separate", str(source)],
        "--catalog not a DuckDB file": ["separate", str(source), *repo, "--catalog", str(source)],
    }


def run_once(args: list[str], work: Path) -> tuple[float, int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_API_URL", None)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=work, env=env, capture_output=True, check=False
    )
    return time.perf_counter() - started, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder")
    parser.add_argument("--runs", type=int, default=5, help="runs per case (median reported)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    from tasks.engine.model_repo import write_random_htdemucs
    from tests.helpers.audiogen import audio_file

    write_random_htdemucs(args.work / "models", "tiny", "tiny")
    audio_file(args.work, "a.wav", "wav", seconds=1.0)
    timings = {
        name: [run_once(command, args.work) for _ in range(args.runs)] for name, command in cases(args.work).items()
    }
    reference = statistics.median(t for t, _ in timings["--help (reference)"])
    results: dict[str, dict[str, object]] = {}
    print(f"{'case':34} {'median s':>9} {'max s':>7} {'x --help':>9}  exit")
    for name, runs in timings.items():
        median, worst = statistics.median(t for t, _ in runs), max(t for t, _ in runs)
        codes = sorted({code for _, code in runs})
        results[name] = {
            "median_s": round(median, 2),
            "max_s": round(worst, 2),
            "exit_codes": codes,
            "ratio_to_help": round(median / reference, 2),
        }
        print(f"{name:34} {median:9.2f} {worst:7.2f} {median / reference:9.2f}  {codes}")
    report = {"machine": machine(), "load_before": load(), "runs_per_case": args.runs, "cases": results}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
