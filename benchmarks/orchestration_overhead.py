"""Orchestration cost per track: one `separate-track` subflow per track against `separate-library`.

`separate-library` runs every track's steps as task runs of its own flow run, preparing the next
track and publishing the previous one while one separates. The alternative it replaced called the
`separate-track` flow once per track, as a subflow. Both run here in one process, against the same
temporary Prefect API, on the same clips (cut from ../shared/testdata/music), with the tiny model so
that orchestration is not hidden behind separation. Per-track overhead = (wall - sum of the
catalog's separate_s) / tracks. A bare subflow with six no-op tasks is timed too, to show the cost
Prefect itself puts on a subflow.

    python benchmarks/orchestration_overhead.py --work /tmp/bench-orch \
        --out benchmarks/results/orchestration_overhead.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import cut_library, load, machine

MODEL = "tiny"


def separate_s(catalog: Path) -> float:
    with duckdb.connect(str(catalog), read_only=True) as con:
        row = con.execute("SELECT sum(separate_s) FROM tracks").fetchone()
        assert row is not None  # an aggregate always returns one row
        return float(row[0])


def measure(name: str, run: Callable[[], object], clips: list[Path], catalog: Path) -> dict:
    started = time.perf_counter()
    run()
    wall = time.perf_counter() - started
    model = separate_s(catalog)
    result = {
        "wall_s": round(wall, 2),
        "separate_s_total": round(model, 2),
        "overhead_s_per_track": round((wall - model) / len(clips), 3),
    }
    print(name, result, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/stemworks-bench-orch"))
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results") / "orchestration_overhead.json")
    parser.add_argument("--tracks", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()

    from prefect import flow, task

    from flows.library import separate_library
    from flows.track import separate_track
    from tasks.core.settings import Limits, OutputSettings, SeparationSettings
    from tasks.engine.model_repo import write_random_htdemucs

    args.work.mkdir(parents=True, exist_ok=True)
    clips = cut_library(args.work / "clips", args.tracks, args.seconds)
    repo = args.work / "models"
    if not list(repo.glob(f"{MODEL}-*.th")):
        write_random_htdemucs(repo, name=MODEL, size="tiny")
    separation = SeparationSettings(model=MODEL, model_repo=str(repo), device="cpu", shifts=0)

    def settings(tag: str) -> dict:
        return {
            "separation": separation,
            "output": OutputSettings(out=str(args.work / f"out-{tag}")),
            "limits": Limits(),
            "catalog": str(args.work / f"catalog-{tag}.duckdb"),
            "work_root": str(args.work / "tmp"),
        }

    @task
    def no_op(value: int) -> int:
        return value + 1

    @flow(name="bare-subflow")
    def bare(value: int) -> int:
        for _ in range(6):
            value = no_op(value)
        return value

    @flow(name="subflow-per-track")
    def subflow_per_track(sources: list[str], tag: str) -> None:
        for source in sources:
            try:
                separate_track(source, **settings(tag))
            except Exception as exc:  # noqa: BLE001 - a failed track raises TrackFailed; report, go on
                print("failed:", exc, flush=True)

    @flow(name="bare-subflows")
    def bare_subflows(count: int) -> float:
        started = time.perf_counter()
        for i in range(count):
            bare(i)
        return (time.perf_counter() - started) / count

    sources = [str(c) for c in clips]
    load_before = load()
    bare_s = bare_subflows(args.tracks)  # also starts the temporary API server, outside the timings below
    print(f"bare subflow with 6 no-op tasks: {bare_s:.3f} s", flush=True)
    results = {
        "subflow_per_track": measure(
            "subflow per track",
            lambda: subflow_per_track(sources, "subflows"),
            clips,
            args.work / "catalog-subflows.duckdb",
        ),
        "separate_library": measure(
            "separate-library",
            lambda: separate_library(sources, **settings("library")),
            clips,
            args.work / "catalog-library.duckdb",
        ),
    }
    report = {
        "machine": machine(),
        "tracks": args.tracks,
        "seconds_each": args.seconds,
        "model": "tiny HTDemucs",
        "command": " ".join(["python", "benchmarks/orchestration_overhead.py", *sys.argv[1:]]),
        "load": {"before": load_before, "after": load()},
        "bare_subflow_6_tasks_s": round(bare_s, 3),
        **results,
        "overhead_ratio": round(
            results["separate_library"]["overhead_s_per_track"] / results["subflow_per_track"]["overhead_s_per_track"],
            3,
        ),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
