"""Benchmark: what recording a track in the catalog costs, alone and with N writer processes at once.

    python benchmarks/catalog_writes.py [--tracks 200] [--writers 1 2 4 8] > benchmarks/catalog_writes.md

Measures, on a real DuckDB file:
1. cost per track of `Catalog.record_track` (validate, open, insert 1 track + 4 stems, commit, close),
   against a reference measured here: the same validated rows inserted over one connection held open
   (what a single-writer design would pay);
2. N processes recording at once (each its own run, `--tracks` tracks): wall time, tracks/s, per-write
   latency (includes waiting for the lock), and a check that exactly N x tracks rows landed;
3. with 4 writers busy, how often a plain `duckdb.connect(read_only=True)` (no retry, like the `duckdb`
   CLI) meets the lock, and how long `Catalog.query` (which waits) takes.
Not a test: numbers depend on the machine; ratios are what to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import duckdb

from catalog import Catalog, rows
from catalog.store import _insert
from tests.helpers.records import make_run, make_succeeded  # the test suite's realistic records


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def single_writer(tracks: int, folder: Path) -> dict[str, float]:
    catalog = Catalog(folder / "single.duckdb")
    catalog.start_run(make_run("bench"))
    outcomes = [make_succeeded(f"t{i}") for i in range(tracks)]
    started = time.perf_counter()
    frames = [
        (rows.track_frame("bench", f"{i:032x}", o), rows.stem_frame("bench", f"{i:032x}", o))
        for i, o in enumerate(outcomes)
    ]
    validate = (time.perf_counter() - started) / tracks

    started = time.perf_counter()
    for outcome in outcomes:
        catalog.record_track("bench", outcome)
    record = (time.perf_counter() - started) / tracks

    reference = Catalog(folder / "reference.duckdb")
    reference.start_run(make_run("bench"))
    con = duckdb.connect(str(reference.path))
    started = time.perf_counter()
    for track, stems in frames:  # pre-validated: measures only the held-open insert + commit
        con.execute("BEGIN TRANSACTION")
        _insert(con, "tracks", track)
        _insert(con, "stems", stems)
        con.execute("COMMIT")
    held = (time.perf_counter() - started) / tracks
    con.close()
    return {"validate": validate, "record": record, "held": held}


def worker(path: str, run_id: str, tracks: int, start_at: float, pause: float) -> None:
    catalog = Catalog(path)
    catalog.start_run(make_run(run_id))
    outcomes = [make_succeeded(f"{run_id}-{i}") for i in range(tracks)]
    time.sleep(max(0.0, start_at - time.time()))
    latencies = []
    for outcome in outcomes:
        began = time.perf_counter()
        catalog.record_track(run_id, outcome)
        latencies.append(time.perf_counter() - began)
        time.sleep(pause)  # > 0: a writer that spends time separating between writes, like a real run
    print(json.dumps(latencies))


def concurrent(writers: int, tracks: int, folder: Path, probe: bool = False, pause: float = 0.0) -> dict:
    path = folder / f"writers{writers}{'-probed' if probe else ''}-{pause}.duckdb"
    Catalog(path)
    start_at = time.time() + 8  # after every worker has imported and validated its records
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(path), f"w{w}", str(tracks), str(start_at), str(pause)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for w in range(writers)
    ]
    reads = probe_reads(path, procs, start_at) if probe else None
    latencies = [x for p in procs for x in json.loads(p.communicate()[0])]
    assert all(p.returncode == 0 for p in procs)
    wall = max(0.0, time.time() - start_at)
    landed = Catalog(path).query("SELECT count(*), count(DISTINCT source) FROM tracks")[1][0]
    assert landed == (writers * tracks, writers * tracks), landed
    latencies.sort()
    return {
        "writers": writers,
        "tracks": writers * tracks,
        "wall": wall,
        "per_s": writers * tracks / wall,
        "median": statistics.median(latencies),
        "p95": latencies[int(0.95 * (len(latencies) - 1))],
        "max": latencies[-1],
        "reads": reads,
    }


def probe_reads(path: Path, procs: list[subprocess.Popen], start_at: float) -> dict:
    time.sleep(max(0.0, start_at - time.time()))
    plain_ok = plain_locked = 0
    waits = []
    catalog = Catalog(path)
    while any(p.poll() is None for p in procs):
        try:
            with duckdb.connect(str(path), read_only=True) as con:
                con.execute("SELECT count(*) FROM tracks").fetchall()
            plain_ok += 1
        except duckdb.IOException:
            plain_locked += 1
        began = time.perf_counter()
        catalog.query("SELECT count(*) FROM lineage")
        waits.append(time.perf_counter() - began)
        time.sleep(0.02)
    waits.sort()
    return {
        "plain_ok": plain_ok,
        "plain_locked": plain_locked,
        "query_median": statistics.median(waits),
        "query_max": waits[-1],
        "queries": len(waits),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tracks", type=int, default=200)
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--worker", nargs=5, metavar=("PATH", "RUN", "TRACKS", "START", "PAUSE"))
    args = parser.parse_args()
    if args.worker:
        path, run_id, tracks, start, pause = args.worker
        worker(path, run_id, int(tracks), float(start), float(pause))
        return
    print("# Catalog write benchmark\n")
    print(f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M UTC}")
    print(
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}, "
        f"Python {platform.python_version()}, duckdb {duckdb.__version__}"
    )
    print(
        f"- command: `python benchmarks/catalog_writes.py --tracks {args.tracks} --writers "
        f"{' '.join(map(str, args.writers))}`"
    )
    print("- one track = 1 `tracks` row + 4 `stems` rows\n")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        one = single_writer(args.tracks, folder)
        print("## One writer, per track\n")
        print("| step | time per track |\n|---|---|")
        print(f"| pandera validation (building the rows) | {ms(one['validate'])} |")
        print(f"| `Catalog.record_track` (validate + open + insert + commit + close) | {ms(one['record'])} |")
        print(f"| reference: insert + commit on a connection held open | {ms(one['held'])} |")
        print(f"\nrecord_track / held-open reference: **{one['record'] / one['held']:.1f}x**\n")
        print(f"## N writer processes at once ({args.tracks} tracks each)\n")
        print("| writers | tracks | wall | tracks/s | write latency median | p95 | max | median vs 1 writer |")
        print("|---|---|---|---|---|---|---|---|")
        base = None
        for n in args.writers:
            r = concurrent(n, args.tracks, folder)
            base = base or r["median"]
            print(
                f"| {n} | {r['tracks']} | {r['wall']:.1f} s | {r['per_s']:.0f} | {ms(r['median'])} | "
                f"{ms(r['p95'])} | {ms(r['max'])} | {r['median'] / base:.1f}x |"
            )
        for pause, title in ((0.0, "as fast as they can"), (0.5, "one track each per 0.5 s (a fast real run)")):
            r = concurrent(4, args.tracks, folder, probe=True, pause=pause)
            reads = r["reads"]
            share = reads["plain_locked"] / max(1, reads["plain_ok"] + reads["plain_locked"])
            print(f"\n## Readers while 4 writers record {title}\n")
            print(
                f"- plain `duckdb.connect(read_only=True)` without retry: {reads['plain_ok']} opened, "
                f"{reads['plain_locked']} met the lock ({share:.0%})"
            )
            print(
                f"- `Catalog.query` (waits for the lock): {reads['queries']} queries, median "
                f"{ms(reads['query_median'])}, max {ms(reads['query_max'])}; every one succeeded"
            )
            print(
                f"- writers meanwhile: {r['tracks']} tracks, all recorded once; write latency median "
                f"{ms(r['median'])}, max {ms(r['max'])}"
            )


if __name__ == "__main__":
    main()
