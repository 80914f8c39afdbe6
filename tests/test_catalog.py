"""The DuckDB catalog, exercised on a real file: what analysts see after runs are recorded."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import pytest

from catalog import Catalog, CatalogError, CatalogValidationError
from catalog.backend import catalog_location
from catalog.schema import SCHEMA_VERSION, STEPS, TABLES, column_types, create_table_statements
from tasks.core.records import RunSummary, TrackOutcome
from tests.helpers.records import (
    OUT,
    STEM_NAMES,
    T0,
    make_failed,
    make_run,
    make_skipped,
    make_succeeded,
    read_plain,
    recorded_library,
    sha,
)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "dir" / "catalog.duckdb"  # parents do not exist yet


@pytest.fixture
def catalog(path: Path) -> Catalog:
    return Catalog(path)


@pytest.fixture
def started(catalog: Catalog) -> Catalog:
    catalog.start_run(make_run())
    return catalog


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> tuple[Catalog, dict[str, str]]:
    """One recorded library shared by the tests that only read it (keeps the suite fast)."""
    catalog = Catalog(tmp_path_factory.mktemp("library") / "catalog.duckdb")
    return catalog, recorded_library(catalog)


def as_dicts(catalog: Catalog, sql: str) -> list[dict]:
    columns, rows = catalog.query(sql)
    return [dict(zip(columns, row, strict=True)) for row in rows]


# -- a whole run -----------------------------------------------------------------------------------


def test_new_file_has_every_table_empty_but_the_version(path: Path, catalog: Catalog) -> None:
    assert path.is_file()
    assert catalog.counts() == {
        "schema_version": 1,
        "runs": 0,
        "tracks": 0,
        "stems": 0,
        "removals": 0,
        "evaluations": 0,
    }
    assert catalog.query("SELECT version FROM schema_version") == (["version"], [(SCHEMA_VERSION,)])


def test_library_run_rows_and_counts(library: tuple[Catalog, dict[str, str]]) -> None:
    catalog, ids = library
    path = catalog.path

    assert catalog.counts() == {
        "schema_version": 1,
        "runs": 1,
        "tracks": 4,
        "stems": 8,
        "removals": 0,
        "evaluations": 0,
    }
    assert len(set(ids.values())) == 4 and all(len(i) == 32 for i in ids.values())
    assert read_plain(path, "SELECT status, count(*) FROM tracks GROUP BY status ORDER BY status") == [
        ("failed", 1),
        ("skipped", 1),
        ("succeeded", 2),
    ]
    assert read_plain(path, "SELECT track_id, count(*), sum(bytes) FROM stems GROUP BY track_id ORDER BY 1") == sorted(
        (ids[n], 4, 4006) for n in ("a", "b")
    )


def test_succeeded_track_row_flattens_the_outcome(library: tuple[Catalog, dict[str, str]]) -> None:
    catalog, ids = library
    [row] = as_dicts(catalog, f"SELECT * FROM tracks WHERE track_id = '{ids['a']}'")

    assert row == {
        "run_id": "run-1",
        "track_id": ids["a"],
        "source": "/music/a.mp3",
        "content_sha256": sha("a"),
        "job_key": "job-a",
        "status": "succeeded",
        "error": None,
        "error_step": None,
        "started_at": T0,
        "finished_at": T0 + timedelta(seconds=9),
        "fetch_s": 1.0,
        "validate_s": 2.0,
        "decode_s": 3.0,
        "separate_s": 4.0,
        "score_s": 5.0,
        "publish_s": 6.0,
        "audio_seconds": 30.0,
        "container": "mp3",
        "codec": "mp3",
        "sample_rate": 44100,
        "channels": 2,
        "is_stem_file": False,
        "origin": '{"path": "/music/a.mp3", "title": null}',
        "residual_db": -42.5,
        "manifest_uri": f"{OUT}/a/manifest.json",
        "track_uri": f"{OUT}/a",
        "flow_run_id": "flow-run-1",
        "hostname": None,
        "worker": None,
        "shard": None,
        "skip_reason": None,
    }


def test_failed_and_skipped_rows_keep_error_and_leave_unrun_steps_null(library: tuple[Catalog, dict[str, str]]) -> None:
    rows = read_plain(
        library[0].path,
        """
        SELECT source, status, error, error_step, fetch_s, validate_s, decode_s, publish_s, container,
               manifest_uri, (SELECT count(*) FROM stems s WHERE s.track_id = t.track_id)
        FROM tracks t WHERE status <> 'succeeded' ORDER BY source""",
    )

    assert rows == [
        ("/music/again.mp3", "skipped", None, None, 0.5, None, None, None, None, None, 0),
        ("/music/broken.mp3", "failed", "not audio: no audio stream", "validate", 0.5, 0.25, None, None, None, None, 0),
    ]


def test_stem_rows_join_quality_by_stem_name(library: tuple[Catalog, dict[str, str]]) -> None:
    catalog, ids = library
    rows = as_dicts(catalog, f"SELECT * FROM stems WHERE track_id = '{ids['b']}' ORDER BY bytes")

    assert [r["stem"] for r in rows] == list(STEM_NAMES)
    assert rows[1] == {
        "run_id": "run-1",
        "track_id": ids["b"],
        "content_sha256": sha("b"),
        "job_key": "job-b",
        "stem": "bass",
        "uri": f"{OUT}/b/bass.flac",
        "sha256": sha("bbass"),
        "seconds": 30.0,
        "bytes": 1001,
        "format": "flac",
        "peak_dbfs": -2.0,
        "rms_dbfs": -21.0,
        "silence_ratio": 0.1,
        "clipped_ratio": 0.0,
        "energy_share_db": -7.0,
    }


def test_stem_without_quality_gets_null_metrics(started: Catalog) -> None:
    # Published in a different order than scored, and 'vocals' was never scored.
    outcome = make_succeeded("a", stems=("vocals", "drums"), scored=("drums", "bass"))
    track_id = started.record_track("run-1", outcome)

    assert started.query(
        f"SELECT stem, peak_dbfs, silence_ratio FROM stems WHERE track_id = '{track_id}' ORDER BY stem"
    ) == (["stem", "peak_dbfs", "silence_ratio"], [("drums", -1.0, 0.0), ("vocals", None, None)])


def test_timestamps_are_stored_in_utc(started: Catalog) -> None:
    paris = timezone(timedelta(hours=1))
    outcome = make_succeeded("a", start=datetime(2025, 3, 1, 13, 0, tzinfo=paris))
    started.record_track("run-1", outcome)

    assert started.query("SELECT started_at FROM tracks")[1] == [(T0,)]


# -- runs ------------------------------------------------------------------------------------------


def test_started_run_is_running_with_null_outcome(started: Catalog) -> None:
    [row] = as_dicts(started, "SELECT * FROM runs")

    assert row == {
        "run_id": "run-1",
        "flow_run_id": "flow-run-1",
        "flow_name": "separate-library",
        "started_at": T0,
        "finished_at": None,
        "status": "running",
        "parameters": '{"model": "htdemucs", "shifts": 1}',
        "sources": '["/music"]',
        "out": OUT,
        "model_name": "htdemucs",
        "model_signature": "955717e8",
        "device": "cpu",
        "code_version": "0.1.0",
        "hostname": "box",
        "tracks_total": None,
        "tracks_succeeded": None,
        "tracks_failed": None,
        "tracks_skipped": None,
        "audio_seconds": None,
        "rebuilt_from": None,
        "pid": None,
        "parent_run_id": None,
        "shard": None,
    }


@pytest.mark.parametrize("status", ["completed", "failed"])
def test_finish_run_sets_status_and_counts(path: Path, catalog: Catalog, status: str) -> None:
    recorded_library(catalog)
    end = T0 + timedelta(minutes=5)
    catalog.finish_run(
        RunSummary(
            run_id="run-1",
            finished_at=end,
            status=status,
            tracks_total=4,
            tracks_succeeded=2,
            tracks_failed=1,
            tracks_skipped=1,
            audio_seconds=60.0,
        )
    )

    assert read_plain(
        path,
        "SELECT status, finished_at, tracks_total, tracks_succeeded, tracks_failed, "
        "tracks_skipped, audio_seconds, flow_name FROM runs",
    ) == [(status, end, 4, 2, 1, 1, 60.0, "separate-library")]
    assert catalog.counts()["runs"] == 1


def test_start_run_twice_is_refused(started: Catalog) -> None:
    with pytest.raises(CatalogError, match="already recorded"):
        started.start_run(make_run(hostname="other"))
    assert started.query("SELECT hostname FROM runs")[1] == [("box",)]


def test_unknown_run_is_refused_and_nothing_written(catalog: Catalog) -> None:
    with pytest.raises(CatalogError, match="never started"):
        catalog.record_track("nope", make_succeeded("a"))
    with pytest.raises(CatalogError, match="never started"):
        catalog.finish_run(
            RunSummary(
                run_id="nope",
                finished_at=T0,
                status="completed",
                tracks_total=0,
                tracks_succeeded=0,
                tracks_failed=0,
                tracks_skipped=0,
                audio_seconds=0,
            )
        )
    assert catalog.counts() == {
        "schema_version": 1,
        "runs": 0,
        "tracks": 0,
        "stems": 0,
        "removals": 0,
        "evaluations": 0,
    }


def test_invalid_summary_leaves_run_running(started: Catalog) -> None:
    summary = RunSummary(
        run_id="run-1",
        finished_at=T0 + timedelta(minutes=1),
        status="completed",
        tracks_total=1,
        tracks_succeeded=2,
        tracks_failed=0,
        tracks_skipped=0,
        audio_seconds=1.0,
    )
    with pytest.raises(CatalogValidationError, match=r"runs: failed tracks_succeeded \+ tracks_failed"):
        started.finish_run(summary)
    assert started.query("SELECT status, tracks_total FROM runs")[1] == [("running", None)]


# -- validation: a bad record raises and writes nothing ------------------------------------------------


def _bad_stem_sha(outcome: TrackOutcome) -> TrackOutcome:
    stems = [outcome.published.stems[0].model_copy(update={"sha256": "not-a-sha"}), *outcome.published.stems[1:]]
    return outcome.model_copy(update={"published": outcome.published.model_copy(update={"stems": stems})})


def _duplicate_stem(outcome: TrackOutcome) -> TrackOutcome:
    stems = [*outcome.published.stems, outcome.published.stems[0]]
    return outcome.model_copy(update={"published": outcome.published.model_copy(update={"stems": stems})})


def _bad_silence(outcome: TrackOutcome) -> TrackOutcome:
    stems = [outcome.quality.stems[0].model_copy(update={"silence_ratio": 1.5}), *outcome.quality.stems[1:]]
    return outcome.model_copy(update={"quality": outcome.quality.model_copy(update={"stems": stems})})


BAD_OUTCOMES = {
    "stem sha256 not hex": (lambda: _bad_stem_sha(make_succeeded("a")), r"stems\.sha256: failed str_matches"),
    "failed without error": (
        lambda: make_failed().model_copy(update={"error": None}),
        "tracks: failed a failed track has a non-empty error",
    ),
    "failed with empty error": (
        lambda: make_failed().model_copy(update={"error": ""}),
        "a failed track has a non-empty error",
    ),
    "succeeded with error": (lambda: make_succeeded("a", error="boom"), "a succeeded track has no error"),
    "succeeded unpublished": (lambda: make_succeeded("a", published=None), "a succeeded track has"),
    "uppercase content sha": (
        lambda: make_succeeded("a", content_sha256=sha("a").upper()),
        r"tracks\.content_sha256: failed str_matches",
    ),
    "negative step seconds": (
        lambda: make_succeeded("a", step_seconds={"fetch": -1.0}),
        r"tracks\.fetch_s: failed greater_than_or_equal_to\(0\)",
    ),
    "unknown status": (lambda: make_skipped().model_copy(update={"status": "done"}), r"tracks\.status: failed isin"),
    "finished before started": (
        lambda: make_succeeded("a", finished_at=T0 - timedelta(seconds=1)),
        "tracks: failed finished_at >= started_at",
    ),
    "naive datetime": (
        lambda: make_failed().model_copy(update={"started_at": datetime(2025, 3, 1)}),  # noqa: DTZ001 - naive on purpose
        "tracks.started_at: naive datetime",
    ),
    "silence ratio above 1": (lambda: _bad_silence(make_succeeded("a")), r"stems\.silence_ratio: failed in_range"),
    "stem published twice": (lambda: _duplicate_stem(make_succeeded("a")), "stems: failed"),
}


@pytest.fixture(scope="module")
def one_good_track(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    """Shared by the bad-record tests: each must leave it exactly as it is (one run, one track, 4 stems)."""
    catalog = Catalog(tmp_path_factory.mktemp("guarded") / "catalog.duckdb")
    catalog.start_run(make_run())
    catalog.record_track("run-1", make_succeeded("ok"))
    return catalog


@pytest.mark.parametrize("make_outcome, message", BAD_OUTCOMES.values(), ids=BAD_OUTCOMES.keys())
def test_bad_track_raises_and_writes_nothing(one_good_track: Catalog, make_outcome, message: str) -> None:
    started = one_good_track
    before = started.counts()
    outcome = make_outcome()

    with pytest.raises(CatalogValidationError, match=message) as raised:
        started.record_track("run-1", outcome)

    assert (
        started.counts()
        == before
        == {"schema_version": 1, "runs": 1, "tracks": 1, "stems": 4, "removals": 0, "evaluations": 0}
    )
    assert raised.value.step == "catalog" and raised.value.source == outcome.source


def test_an_unknown_step_cannot_even_be_recorded_in_an_outcome() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"fetch.*validate.*decode.*separate.*score.*publish"):
        make_succeeded("a", step_seconds={"upload": 1.0})


def test_validation_error_is_a_stemworks_error() -> None:
    from tasks.core.errors import StemworksError
    from tasks.io.faults import is_transient

    error = CatalogValidationError("tracks.x: failed")
    assert isinstance(error, StemworksError) and isinstance(error, CatalogError)
    assert error.step == "catalog" and not is_transient(error)


# -- the file ------------------------------------------------------------------------------------------


def test_reopening_keeps_rows_and_version(path: Path, catalog: Catalog) -> None:
    ids = recorded_library(catalog)
    reopened = Catalog(path)

    assert reopened.counts() == {
        "schema_version": 1,
        "runs": 1,
        "tracks": 4,
        "stems": 8,
        "removals": 0,
        "evaluations": 0,
    }
    assert reopened.record_track("run-1", make_succeeded("c")) not in ids.values()
    assert Catalog(path).counts()["tracks"] == 5


def test_newer_schema_is_refused(path: Path, catalog: Catalog) -> None:
    with duckdb.connect(str(path)) as con:
        con.execute("INSERT INTO schema_version VALUES (99, now())")
    with pytest.raises(CatalogError, match="schema 99"):
        Catalog(path)


def test_no_connection_is_held_between_calls(path: Path, started: Catalog) -> None:
    # A read-write connection from this process would block a read-only one to the same file.
    assert read_plain(path, "SELECT count(*) FROM runs") == [(1,)]
    started.record_track("run-1", make_failed())
    assert read_plain(path, "SELECT count(*) FROM tracks") == [(1,)]


def test_default_catalog_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("STEMWORKS_CATALOG", raising=False)
    assert catalog_location() == "stemworks.duckdb"
    monkeypatch.setenv("STEMWORKS_CATALOG", str(tmp_path / "c.duckdb"))
    assert catalog_location() == str(tmp_path / "c.duckdb")
    assert catalog_location("explicit.duckdb") == "explicit.duckdb"


# -- the DDL comes from the pandera models ------------------------------------------------------------


def test_every_pandera_column_is_a_duckdb_column(path: Path, catalog: Catalog) -> None:
    stored = read_plain(
        path,
        "SELECT table_name, column_name, data_type, is_nullable "
        "FROM information_schema.columns JOIN information_schema.tables USING (table_name) "
        "WHERE table_type = 'BASE TABLE'",
    )
    expected = {
        (table, column, sql_type, "YES" if nullable else "NO")
        for table, model in TABLES.items()
        for column, (sql_type, nullable) in column_types(model).items()
    }
    assert {(t, c, d.replace("TIMESTAMP WITH TIME ZONE", "TIMESTAMPTZ"), n) for t, c, d, n in stored} == expected


@pytest.mark.parametrize(
    "table, column, sql_type",
    [
        ("runs", "tracks_total", "BIGINT"),
        ("runs", "started_at", "TIMESTAMPTZ"),
        ("tracks", "origin", "VARCHAR"),
        ("tracks", "is_stem_file", "BOOLEAN"),
        ("stems", "seconds", "DOUBLE"),
        ("stems", "bytes", "BIGINT"),
    ],
)
def test_dtype_mapping(table: str, column: str, sql_type: str) -> None:
    assert column_types(TABLES[table])[column][0] == sql_type


def test_every_step_has_a_column() -> None:
    assert {f"{step}_s" for step in STEPS} <= set(column_types(TABLES["tracks"]))


def test_keys_are_declared() -> None:
    statements = "\n".join(create_table_statements())
    assert 'PRIMARY KEY ("run_id")' in statements and 'PRIMARY KEY ("track_id", "stem")' in statements
    assert 'FOREIGN KEY ("track_id") REFERENCES "tracks" ("track_id")' in statements


# -- skip detection --------------------------------------------------------------------------------


def test_recorded_manifest_uri_finds_latest_succeeded_under_prefix(started: Catalog) -> None:
    later = T0 + timedelta(hours=1)
    started.record_track("run-1", make_succeeded("old-name", job_key="job-x"))
    started.record_track("run-1", make_succeeded("new-name", job_key="job-x", start=later))
    started.record_track(
        "run-1", make_succeeded("elsewhere", job_key="job-x", out="/data/out-old", start=later + timedelta(hours=1))
    )
    failed = make_failed("ignored").model_copy(update={"job_key": "job-y"})
    started.record_track("run-1", failed)

    assert started.recorded_manifest_uri("job-x", OUT) == f"{OUT}/new-name/manifest.json"
    assert started.recorded_manifest_uri("job-x", OUT + "/") == f"{OUT}/new-name/manifest.json"
    assert started.recorded_manifest_uri("job-x", "/data/out-old") == "/data/out-old/elsewhere/manifest.json"
    assert started.recorded_manifest_uri("job-x", "/data/o") is None  # a folder prefix, not a string prefix
    assert started.recorded_manifest_uri("job-x", "/elsewhere") is None
    assert started.recorded_manifest_uri("job-y", OUT) is None  # failed tracks never count
    assert started.recorded_manifest_uri("job-z", OUT) is None


def test_recorded_manifest_uri_prefix_is_literal(started: Catalog) -> None:
    started.record_track("run-1", make_succeeded("a", job_key="job-x", out="/data/my_out"))

    assert started.recorded_manifest_uri("job-x", "/data/my_out") == "/data/my_out/a/manifest.json"
    assert started.recorded_manifest_uri("job-x", "/data/my%") is None
    assert started.recorded_manifest_uri("job-x", "/data/myXout") is None
