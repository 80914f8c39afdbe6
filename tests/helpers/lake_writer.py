"""One writer process for the shared-catalog tests and benchmark: records a run with TRACKS tracks.

    python -m tests.helpers.lake_writer LOCATION DATA_PATH NAME TRACKS GO_FILE

Opens the catalog (a DuckLake or a file), waits until GO_FILE exists (so every writer starts at once),
records one run, its tracks (each with four stems) and the run's summary, then prints one JSON line:
{"run_id", "track_ids", "latencies_s", "retries"}.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

from catalog.backend import open_catalog
from tasks.core.records import RunSummary
from tests.helpers.records import T0, make_failed, make_run, make_succeeded


def main(location: str, data_path: str, name: str, tracks: int, go: Path) -> None:
    catalog = open_catalog(location, data_path or None)
    deadline = time.monotonic() + 300
    while not go.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{go} never appeared")
        time.sleep(0.01)
    run = make_run(uuid.uuid4().hex, hostname=name)
    catalog.start_run(run)
    track_ids, latencies = [], []
    for i in range(tracks):
        outcome = make_failed(f"{name}-{i}") if i % 5 == 4 else make_succeeded(f"{name}-{i}")
        began = time.perf_counter()
        track_ids.append(catalog.record_track(run.run_id, outcome))
        latencies.append(time.perf_counter() - began)
    failed = sum(1 for i in range(tracks) if i % 5 == 4)
    catalog.finish_run(
        RunSummary(
            run_id=run.run_id,
            finished_at=T0 + timedelta(hours=1),
            status="failed" if failed else "completed",
            tracks_total=tracks,
            tracks_succeeded=tracks - failed,
            tracks_failed=failed,
            tracks_skipped=0,
            audio_seconds=30.0 * (tracks - failed),
        )
    )
    retries = getattr(catalog, "retries", 0)
    print(json.dumps({"run_id": run.run_id, "track_ids": track_ids, "latencies_s": latencies, "retries": retries}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), Path(sys.argv[5]))
