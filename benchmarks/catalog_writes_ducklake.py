"""Benchmark: catalog write latency per track, DuckLake (metadata in PostgreSQL, data in a local folder)
against the DuckDB file catalog, with 1 and with N writer processes at once.

    python benchmarks/catalog_writes_ducklake.py [--tracks 50] [--writers 1 4]

Starts its own PostgreSQL (tests/helpers/postgres.py: needs the server binaries, `apt-get install
postgresql`). Each writer is `python -m tests.helpers.lake_writer`: it records one run, `--tracks` tracks
(1 in 5 failed, the others with 4 stems each; one transaction per track) and the run's summary. Latency
is `Catalog.record_track` as the writer sees it (validate, transaction, commit; DuckLake conflict
retries and file-lock waits included). Not a test: numbers depend on the machine.
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
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import duckdb

from catalog.backend import open_catalog
from tests.helpers.postgres import SKIP_REASON, PostgresServer, postgres_bin


def run_writers(location: str, data_path: str, writers: int, tracks: int, folder: Path) -> dict:
    open_catalog(location, data_path or None)  # created before the clock starts
    go = folder / f"go-{uuid.uuid4().hex}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.lake_writer", location, data_path, f"w{i}", str(tracks), str(go)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(writers)
    ]
    time.sleep(3.0 + writers)  # let every writer import and open the catalog before the start signal
    began = time.perf_counter()
    go.touch()
    results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    wall = time.perf_counter() - began
    latencies = sorted(x for r in results for x in r["latencies_s"])
    landed = open_catalog(location).query("SELECT count(*) FROM tracks")[1][0][0]
    return {
        "wall_s": wall,
        "median_ms": 1000 * statistics.median(latencies),
        "p95_ms": 1000 * latencies[int(0.95 * (len(latencies) - 1))],
        "tracks_per_s": writers * tracks / wall,
        "landed": landed,
        "expected": writers * tracks,
        "retries": sum(r["retries"] for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tracks", type=int, default=50)
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    bindir = postgres_bin()
    if bindir is None:
        sys.exit(SKIP_REASON)
    server = PostgresServer(bindir).start()
    print(
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"duckdb {duckdb.__version__}, PostgreSQL {bindir.parent.name} on loopback (fsync off), "
        f"{args.tracks} tracks per writer\n"
    )
    print("| catalog | writers | median ms/track | p95 ms/track | tracks/s (all writers) | rows landed | retries |")
    print("|---|---|---|---|---|---|---|")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            for writers in args.writers:
                for kind in ("file", "ducklake"):
                    if kind == "file":
                        location, data = str(folder / f"file-{writers}.duckdb"), ""
                    else:
                        location = "ducklake:postgres:" + server.create_database(f"bench_{writers}")
                        data = str(folder / f"lake-{writers}")
                    r = run_writers(location, data, writers, args.tracks, folder)
                    print(
                        f"| {kind} | {writers} | {r['median_ms']:.1f} | {r['p95_ms']:.1f} | {r['tracks_per_s']:.1f} "
                        f"| {r['landed']} of {r['expected']} | {r['retries']} |",
                        flush=True,
                    )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
