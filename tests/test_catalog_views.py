"""What analysts read besides the tables: the views, exports, old files upgraded, waiting on a busy file."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from datetime import date, timedelta
from pathlib import Path

import duckdb
import pytest

from catalog import Catalog, CatalogError
from catalog.errors import CatalogBusyError
from catalog.schema import SCHEMA_VERSION, TABLES
from catalog.views import VIEWS
from tasks.core.records import RunSummary
from tasks.io.faults import is_transient
from tests.helpers.records import T0, make_failed, make_run, make_succeeded, read_plain, recorded_library, sha

V1_DDL = Path(__file__).parent / "data" / "catalog_v1.sql"


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    """run-1: a, b succeeded, broken failed, again skipped; run-2 (a day later, on cuda): a fails, and two
    files fail with the same error that names each file."""
    catalog = Catalog(tmp_path_factory.mktemp("views") / "catalog.duckdb")
    recorded_library(catalog)
    later = T0 + timedelta(days=1)
    catalog.start_run(make_run("run-2", flow_run_id="flow-run-2", device="cuda", started_at=later))
    catalog.record_track(
        "run-2",
        make_failed("a").model_copy(
            update={"content_sha256": sha("a"), "started_at": later, "finished_at": later + timedelta(seconds=1)}
        ),
    )
    for name in ("x", "y"):
        failed = make_failed(name)
        catalog.record_track(
            "run-2", failed.model_copy(update={"error": f"{failed.source}: truncated file", "error_step": "decode"})
        )
    catalog.record_track("run-2", make_succeeded("c", start=later))
    return catalog


def view(catalog: Catalog, sql: str) -> list[dict]:
    columns, rows = catalog.query(sql)
    return [dict(zip(columns, row, strict=True)) for row in rows]


def test_lineage_traces_each_stem_file_to_source_model_code_and_runs(history: Catalog) -> None:
    rows = view(history, "SELECT * FROM lineage ORDER BY stem_uri")

    assert len(rows) == 12 == history.counts()["stems"]
    [bass_of_a] = [r for r in rows if r["stem_uri"] == "/data/out/a/bass.flac"]
    assert {
        k: bass_of_a[k]
        for k in (
            "stem",
            "stem_sha256",
            "source",
            "content_sha256",
            "model_name",
            "model_signature",
            "code_version",
            "run_id",
            "flow_run_id",
            "track_flow_run_id",
            "manifest_uri",
            "rebuilt_from",
        )
    } == {
        "stem": "bass",
        "stem_sha256": sha("abass"),
        "source": "/music/a.mp3",
        "content_sha256": sha("a"),
        "model_name": "htdemucs",
        "model_signature": "955717e8",
        "code_version": "0.1.0",
        "run_id": "run-1",
        "flow_run_id": "flow-run-1",
        "track_flow_run_id": "flow-run-1",
        "manifest_uri": "/data/out/a/manifest.json",
        "rebuilt_from": None,
    }
    assert json.loads(bass_of_a["parameters"]) == {"model": "htdemucs", "shifts": 1}
    assert json.loads(bass_of_a["origin"]) == {"path": "/music/a.mp3", "title": None}


def test_track_latest_is_one_row_per_content_with_its_newest_outcome(history: Catalog) -> None:
    rows = view(history, "SELECT content_sha256, status, run_id, outcomes, times_succeeded FROM track_latest")
    latest = {r["content_sha256"]: r for r in rows}

    assert len(rows) == len(latest) == 7  # a (twice), b, broken, again, x, y, c: each once
    assert {k: latest[sha("a")][k] for k in ("status", "run_id", "outcomes", "times_succeeded")} == {
        "status": "failed",
        "run_id": "run-2",
        "outcomes": 2,
        "times_succeeded": 1,
    }
    assert latest[sha("b")]["status"] == "succeeded" and latest[sha("again")]["status"] == "skipped"


def test_failures_group_the_same_reason_across_files(history: Catalog) -> None:
    rows = view(history, "SELECT step, reason, reason_count, source FROM failures ORDER BY source")

    assert rows == [
        {"step": "validate", "reason": "not audio: no audio stream", "reason_count": 2, "source": "/music/a.mp3"},
        {"step": "validate", "reason": "not audio: no audio stream", "reason_count": 2, "source": "/music/broken.mp3"},
        {"step": "decode", "reason": "<source>: truncated file", "reason_count": 2, "source": "/music/x.mp3"},
        {"step": "decode", "reason": "<source>: truncated file", "reason_count": 2, "source": "/music/y.mp3"},
    ]


def test_throughput_by_day_model_and_device_with_time_per_step(history: Catalog) -> None:
    rows = view(history, "SELECT * FROM throughput ORDER BY day")

    assert rows == [
        {
            "day": date(2025, 3, 1),
            "model_name": "htdemucs",
            "model_signature": "955717e8",
            "device": "cpu",
            "tracks": 2,
            "audio_seconds": 60.0,
            "wall_seconds": 18.0,
            "audio_s_per_wall_s": pytest.approx(60 / 18),
            "mean_fetch_s": 1.0,
            "mean_validate_s": 2.0,
            "mean_decode_s": 3.0,
            "mean_separate_s": 4.0,
            "mean_score_s": 5.0,
            "mean_publish_s": 6.0,
        },
        {
            "day": date(2025, 3, 2),
            "model_name": "htdemucs",
            "model_signature": "955717e8",
            "device": "cuda",
            "tracks": 1,
            "audio_seconds": 30.0,
            "wall_seconds": 9.0,
            "audio_s_per_wall_s": pytest.approx(30 / 9),
            "mean_fetch_s": 1.0,
            "mean_validate_s": 2.0,
            "mean_decode_s": 3.0,
            "mean_separate_s": 4.0,
            "mean_score_s": 5.0,
            "mean_publish_s": 6.0,
        },
    ]


def test_views_work_from_a_plain_read_only_duckdb_connection(history: Catalog) -> None:
    assert read_plain(history.path, "SELECT count(*) FROM lineage") == [(12,)]
    assert read_plain(history.path, "SELECT sum(reason_count) FROM failures") == [(8,)]


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_export_writes_every_table_and_view(history: Catalog, tmp_path: Path, fmt: str) -> None:
    files = history.export(tmp_path / "export", fmt)

    assert sorted(f.name for f in files) == sorted(f"{name}.{fmt}" for name in [*TABLES, *VIEWS])
    reader = "read_parquet" if fmt == "parquet" else "read_csv_auto"
    with duckdb.connect() as con:
        for file in files:
            name = file.stem
            assert (
                con.execute(f"SELECT count(*) FROM {reader}('{file}')").fetchone()[0]
                == history.query(f'SELECT count(*) FROM "{name}"')[1][0][0]
            ), name
        exported = con.execute(f"SELECT list_sort(list(stem_uri)) FROM {reader}('{tmp_path}/export/lineage.{fmt}')")
        assert exported.fetchone()[0] == sorted(r[0] for r in history.query("SELECT stem_uri FROM lineage")[1])


def test_export_refuses_unknown_format(history: Catalog, tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="'xlsx' is not one of"):
        history.export(tmp_path, "xlsx")


def test_stems_recorded_knows_which_manifests_have_their_stems(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "c.duckdb")
    catalog.start_run(make_run())
    catalog.record_track("run-1", make_succeeded("a"))
    bare = make_succeeded("b")  # e.g. a skip that found the manifest but recorded no stems
    catalog.record_track(
        "run-1",
        bare.model_copy(update={"status": "skipped", "published": bare.published.model_copy(update={"stems": []})}),
    )

    assert catalog.stems_recorded("/data/out/a/manifest.json")
    assert not catalog.stems_recorded("/data/out/b/manifest.json")
    assert not catalog.stems_recorded("/data/out/c/manifest.json")


# -- schema evolution ----------------------------------------------------------------------------------


def test_version_1_file_opens_upgraded_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "v1.duckdb"
    with duckdb.connect(str(path)) as con:  # a catalog exactly as the first release wrote it
        con.execute(V1_DDL.read_text())
        con.execute("INSERT INTO schema_version VALUES (1, TIMESTAMPTZ '2025-01-01 00:00:00+00')")
        con.execute(
            "INSERT INTO runs VALUES ('old-run', NULL, 'separate-library', TIMESTAMPTZ '2025-01-01 00:00:00+00',"
            " NULL, 'running', '{}', '[]', '/data/out', 'htdemucs', 'sig', 'cpu', '0.1.0', 'box',"
            " NULL, NULL, NULL, NULL, NULL)"
        )

    catalog = Catalog(path)

    assert catalog.query("SELECT version FROM schema_version ORDER BY version")[1] == [
        (v,) for v in range(1, SCHEMA_VERSION + 1)
    ]
    assert catalog.query("SELECT run_id, status, rebuilt_from FROM runs")[1] == [("old-run", "running", None)]
    track_id = catalog.record_track("old-run", make_succeeded("a"))  # the new code writes into the old run
    catalog.finish_run(
        RunSummary(
            run_id="old-run",
            finished_at=T0,
            status="completed",
            tracks_total=1,
            tracks_succeeded=1,
            tracks_failed=0,
            tracks_skipped=0,
            audio_seconds=30.0,
        )
    )
    assert catalog.query("SELECT count(*), min(track_id) FROM lineage")[1] == [(4, track_id)]
    assert Catalog(path).counts() == {
        "schema_version": SCHEMA_VERSION,
        "runs": 1,
        "tracks": 1,
        "stems": 4,
        "removals": 0,
        "evaluations": 0,
    }


# -- a file another process keeps open -------------------------------------------------------------------

HOLD_LOCK = textwrap.dedent("""
    import sys, time, duckdb
    con = duckdb.connect(sys.argv[1], read_only=sys.argv[3] == "read-only")
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    con.close()
""")


def _hold_lock(path: Path, seconds: float, mode: str = "read-write") -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(path), str(seconds), mode], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


@pytest.mark.slow
def test_current_file_is_opened_and_read_beside_an_analysts_session(tmp_path: Path) -> None:
    path = tmp_path / "c.duckdb"
    Catalog(path)
    analyst = _hold_lock(path, 2, "read-only")  # e.g. `duckdb -readonly` left open: a shared lock
    try:
        assert Catalog(path, busy_timeout_s=0).counts()["runs"] == 0  # opening a current file needs no write lock
    finally:
        analyst.wait()


@pytest.mark.slow
def test_writer_waits_for_a_locked_file_then_writes(tmp_path: Path) -> None:
    path = tmp_path / "c.duckdb"
    catalog = Catalog(path)
    holder = _hold_lock(path, 1.5)
    started = time.monotonic()
    try:
        catalog.start_run(make_run())  # would raise "Could not set lock" at once without the wait
    finally:
        holder.wait()
    assert time.monotonic() - started > 1.0  # it did wait for the other process
    assert catalog.query("SELECT run_id FROM runs")[1] == [("run-1",)]


@pytest.mark.slow
def test_writer_gives_up_after_its_timeout_with_a_retryable_error_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "c.duckdb"
    Catalog(path).start_run(make_run())
    impatient = Catalog(path, busy_timeout_s=0.3)
    holder = _hold_lock(path, 3)
    try:
        with pytest.raises(CatalogBusyError, match=r"stayed locked by other processes for 0.3 s") as raised:
            impatient.record_track("run-1", make_succeeded("a"))
    finally:
        holder.wait()
    assert is_transient(raised.value) and raised.value.step == "catalog"
    assert Catalog(path).counts()["tracks"] == 0
