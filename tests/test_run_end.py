"""How a run that stops before finishing is closed in the catalog (`StartedRun.stopped`), without Prefect: a
real catalog file and the tiny random-weight model. Ctrl-C end to end: tests/test_crash.py; a Prefect
cancellation of a fanned-out run and its shard runs: tests/test_fanout.py."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from prefect.exceptions import TerminationSignal

from catalog import Catalog
from flows.pipeline.runs import start_run, stopped_status
from tasks.core.settings import Limits, OutputSettings, SeparationSettings
from tests.helpers.constants import MODEL_NAME


def test_what_stopped_a_run_decides_its_status() -> None:
    assert stopped_status(KeyboardInterrupt()) == "cancelled"
    assert stopped_status(TerminationSignal(signal.SIGTERM)) == "crashed"  # no flow run being cancelled
    assert stopped_status(RuntimeError("the catalog went away")) == "failed"


@pytest.mark.slow  # loads the model
def test_a_run_stopped_by_an_error_is_closed_as_failed_and_stays_so(tmp_path: Path, model_repo: Path) -> None:
    catalog = tmp_path / "catalog.duckdb"
    started = start_run(
        "separate-library",
        [str(tmp_path / "music")],
        SeparationSettings(model=MODEL_NAME, model_repo=str(model_repo), shifts=0),
        OutputSettings(out=str(tmp_path / "stems")),
        Limits(),
        str(catalog),
        str(tmp_path / "work"),
    )
    try:
        started.stopped(RuntimeError("boom"))
        started.stopped(KeyboardInterrupt())  # a second end changes nothing: the row is closed once
    finally:
        started.close()
    rows = Catalog(catalog).query("SELECT status, tracks_total, finished_at IS NOT NULL FROM runs")[1]
    assert rows == [("failed", 0, True)]
    assert not any((tmp_path / "work").iterdir())  # its work folder is gone
