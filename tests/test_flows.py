"""separate-library end to end under a real Prefect API, with the tiny real-architecture model."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest

from flows.library import library_summary, separate_library
from flows.pipeline.runs import TracksFailed
from flows.track import TrackFailed, separate_track
from tasks.core.errors import ConfigurationError
from tasks.core.settings import Limits, OutputSettings, SeparationSettings
from tasks.core.vocabulary import STEPS
from tasks.prefect_tasks import track_label
from tasks.steps.validate import probe
from tests.helpers.audio import decode_to_array
from tests.helpers.audiogen import audio_file, float_wav_with_nan, stem_file
from tests.helpers.constants import MODEL_NAME
from tests.helpers.flows import library_run

pytestmark = [pytest.mark.prefect_server, pytest.mark.usefixtures("prefect_harness")]
STEMS = {"drums", "bass", "other", "vocals"}


def make_library(root: Path, testdata: Path) -> dict[str, list[str]]:
    """Mixed formats, odd names, duplicate names in different folders, real music, and broken files."""
    audio_file(root / "a", "song.wav", "wav", seconds=2.0, seed=1)
    audio_file(root / "b", "song.wav", "wav", seconds=2.5, seed=2)  # same name, other content
    audio_file(root, "Café – déjà vu (live) [2020].flac", "flac", seconds=1.5, sample_rate=48000)  # noqa: RUF001 - en dash on purpose
    audio_file(root, "mono 22k.mp3", "mp3", seconds=1.5, sample_rate=22050, channels=1)
    audio_file(root / "deep" / "er", "we..ird;name$ #1.ogg", "ogg", seconds=1.5)
    audio_file(root, "con.opus", "opus", seconds=1.5, sample_rate=48000)
    audio_file(root, "track.m4a", "m4a", seconds=1.5)
    stem_file(root / "native.stem.mp4", seconds=1.5)
    shutil.copy(testdata / "musdb7" / "The Easton Ellises - Falcon 69 (NI ALAC).stem.m4a", root / "falcon.stem.m4a")
    (root / "broken.mp3").write_bytes(b"ID3 this is not really an mp3" * 50)
    (root / "empty.flac").write_bytes(b"")
    float_wav_with_nan(root / "nan.wav")
    (root / "cover.jpg").write_bytes(b"\xff\xd8\xff not audio, and not listed")
    return {
        "valid": [
            "a/song.wav",
            "b/song.wav",
            "Café – déjà vu (live) [2020].flac",  # noqa: RUF001 - en dash on purpose
            "mono 22k.mp3",
            "deep/er/we..ird;name$ #1.ogg",
            "con.opus",
            "track.m4a",
            "native.stem.mp4",
            "falcon.stem.m4a",
        ],
        "broken": ["broken.mp3", "empty.flac", "nan.wav"],
    }


def run(sources: list[str], out: Path, catalog: Path, model_repo: Path, **output) -> object:
    return library_run(
        [str(s) for s in sources],
        separation=SeparationSettings(model=MODEL_NAME, model_repo=str(model_repo), shifts=0),
        output=OutputSettings(out=str(out), **output),
        limits=Limits(),
        catalog=str(catalog),
    )


def rows(catalog: Path, sql: str) -> list[tuple]:
    with duckdb.connect(str(catalog), read_only=True) as con:
        return con.execute(sql).fetchall()


def stem_files(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file() and p.name != "manifest.json")


# The tests that use first_run are marked slow: it separates a 12-track library (~20 s on 2 cores) for them.
@pytest.fixture(scope="module")
def first_run(tmp_path_factory, model_repo, testdata):
    root = tmp_path_factory.mktemp("library")
    names = make_library(root / "music", testdata)
    out, catalog = root / "stems", root / "catalog.duckdb"
    summary = run([root / "music"], out, catalog, model_repo)
    return {"root": root, "music": root / "music", "names": names, "out": out, "catalog": catalog, "summary": summary}


@pytest.mark.slow
@pytest.mark.testdata
def test_every_valid_track_gets_four_full_length_finite_stems(first_run) -> None:
    summary, music = first_run["summary"], first_run["music"]
    succeeded = {t.source for t in summary.tracks if t.status == "succeeded"}
    assert succeeded == {str(music / name) for name in first_run["names"]["valid"]}
    for track in summary.tracks:
        if track.status != "succeeded":
            continue
        manifest = json.loads(Path(track.manifest_uri).read_text())
        folder = Path(track.manifest_uri).parent
        assert {s["stem"] for s in manifest["stems"]} == STEMS
        assert sorted(p.name for p in folder.iterdir()) == sorted([*(f"{s}.wav" for s in STEMS), "manifest.json"])
        source = Path(track.source)
        mixture = decode_to_array(source, probe(source, Limits()), 44100, Limits())
        for entry in manifest["stems"]:
            path = folder / entry["file"]
            stem = decode_to_array(path, probe(path, Limits()), 44100, Limits())
            assert stem.shape == mixture.shape, (track.source, entry["stem"])
            assert np.isfinite(stem).all() and np.abs(stem).max() > 0
            assert entry["seconds"] == pytest.approx(mixture.shape[1] / 44100)
            assert entry["bytes"] == path.stat().st_size


@pytest.mark.slow
@pytest.mark.testdata
def test_manifests_carry_lineage(first_run) -> None:
    import hashlib

    for track in (t for t in first_run["summary"].tracks if t.status == "succeeded"):
        manifest = json.loads(Path(track.manifest_uri).read_text())
        assert manifest["source"] == track.source
        assert manifest["content_sha256"] == hashlib.sha256(Path(track.source).read_bytes()).hexdigest()
        assert manifest["model"]["name"] == MODEL_NAME and len(manifest["model"]["signature"]) == 16
        assert manifest["parameters"]["separation"]["shifts"] == 0
        assert manifest["code_version"].startswith("stemworks ")
        for entry in manifest["stems"]:
            data = (Path(track.manifest_uri).parent / entry["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == entry["sha256"]


@pytest.mark.slow
@pytest.mark.testdata
def test_same_name_in_different_folders_never_collide(first_run) -> None:
    folders = {Path(t.manifest_uri).parent.name for t in first_run["summary"].tracks if t.source.endswith("song.wav")}
    assert len(folders) == 2 and all(f.startswith("song-") for f in folders)


@pytest.mark.slow
@pytest.mark.testdata
def test_broken_files_fail_alone_with_readable_reasons(first_run) -> None:
    failed = {Path(t.source).name: t for t in first_run["summary"].tracks if t.status == "failed"}
    assert set(failed) == {"broken.mp3", "empty.flac", "nan.wav"}
    assert "not readable as audio" in failed["broken.mp3"].error
    assert failed["empty.flac"].error == "file is empty"
    assert "NaN" in failed["nan.wav"].error and failed["nan.wav"].error_step == "decode"


@pytest.mark.slow
@pytest.mark.testdata
def test_catalog_records_runs_tracks_and_stems(first_run) -> None:
    catalog, summary = first_run["catalog"], first_run["summary"]
    assert rows(catalog, "SELECT status, count(*) FROM tracks GROUP BY ALL ORDER BY 1") == [
        ("failed", 3),
        ("succeeded", 9),
    ]
    assert rows(catalog, "SELECT count(*), count(DISTINCT track_id) FROM stems") == [(36, 9)]
    run_row = rows(
        catalog,
        "SELECT run_id, flow_run_id, status, tracks_total, tracks_succeeded, tracks_failed, tracks_skipped FROM runs",
    )
    assert run_row == [(summary.run_id, summary.flow_run_id, "failed", 12, 9, 3, 0)]  # 3 tracks failed
    assert summary.flow_run_id is not None
    failed = rows(catalog, "SELECT error, error_step FROM tracks WHERE status = 'failed' AND error IS NOT NULL")
    assert len(failed) == 3
    timed = rows(
        catalog,
        "SELECT count(*) FROM tracks WHERE status = 'succeeded' AND fetch_s >= 0 AND "
        "validate_s >= 0 AND decode_s >= 0 AND separate_s > 0 AND score_s >= 0 AND publish_s > 0 "
        "AND audio_seconds > 1",
    )
    assert timed == [(9,)]
    joined = rows(
        catalog,
        "SELECT count(*) FROM stems s JOIN tracks t USING (track_id) "
        "WHERE s.content_sha256 = t.content_sha256 AND s.rms_dbfs IS NOT NULL "
        "AND s.peak_dbfs <= 20 AND s.silence_ratio BETWEEN 0 AND 1",
    )
    assert joined == [(36,)]


@pytest.mark.slow
@pytest.mark.testdata
def test_library_run_shows_each_tracks_steps_by_name_in_prefect(first_run) -> None:
    """One flow run for the library; its task runs say which step of which file they are."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    expected = {
        f"{step} · {track_label(name)}" for name in first_run["names"]["valid"] for step in STEPS
    }  # task names are the vocabulary's step names

    def names() -> set[str]:
        runs = FlowRunFilter(id=FlowRunFilterId(any_=[first_run["summary"].flow_run_id]))
        with get_client(sync_client=True) as client:
            return {run.name for run in client.read_task_runs(flow_run_filter=runs, limit=200)}

    deadline = time.monotonic() + 60  # task runs reach the API through events, a few seconds behind
    while not expected <= (seen := names()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert expected <= seen, sorted(expected - seen)
    assert {"publish · track.m4a", "separate · falcon.stem.m4a", "fetch · broken.mp3"} <= seen
    assert "separate · broken.mp3" not in seen  # it failed at validate


@pytest.mark.slow
def test_separate_track_flow_records_a_run_of_its_own_and_fails_its_run_on_bad_input(model_repo, tmp_path) -> None:
    good = audio_file(tmp_path / "in", "single.flac", "flac", seconds=1.5, seed=7)
    bad = tmp_path / "in" / "broken.mp3"
    bad.write_bytes(b"ID3 this is not really an mp3" * 50)
    settings = {
        "separation": SeparationSettings(model=MODEL_NAME, model_repo=str(model_repo), shifts=0),
        "output": OutputSettings(out=str(tmp_path / "stems")),
        "limits": Limits(),
        "catalog": str(tmp_path / "c.duckdb"),
        "work_root": str(tmp_path / "work"),
    }
    outcome = separate_track(str(good), **settings)
    assert outcome.status == "succeeded" and {s.stem for s in outcome.published.stems} == STEMS
    with pytest.raises(TrackFailed, match=r"broken.mp3") as failed:
        separate_track(str(bad), **settings)
    assert failed.value.outcome.error_step == "validate"
    assert rows(
        tmp_path / "c.duckdb",
        "SELECT flow_name, status, tracks_total, tracks_succeeded, tracks_failed FROM runs ORDER BY started_at",
    ) == [("separate-track", "completed", 1, 1, 0), ("separate-track", "failed", 1, 0, 1)]
    assert rows(
        tmp_path / "c.duckdb",
        "SELECT count(*) FROM tracks t JOIN runs r USING (run_id) WHERE t.flow_run_id = r.flow_run_id",
    ) == [(2,)]
    assert not any((tmp_path / "work").rglob("*.npy"))  # work areas removed, failed or not


@pytest.mark.slow
@pytest.mark.testdata
def test_identical_rerun_skips_everything_and_writes_nothing(first_run, model_repo) -> None:
    out = first_run["out"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    summary = run([first_run["music"]], out, first_run["catalog"], model_repo)
    assert sorted(t.status for t in summary.tracks) == ["failed"] * 3 + ["skipped"] * 9
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    assert rows(first_run["catalog"], f"SELECT count(*) FROM stems WHERE run_id = '{summary.run_id}'") == [(0,)]
    assert rows(first_run["catalog"], f"SELECT tracks_skipped FROM runs WHERE run_id = '{summary.run_id}'") == [(9,)]


@pytest.mark.slow
@pytest.mark.testdata
def test_renamed_copy_is_recognised_by_content(first_run, model_repo, tmp_path) -> None:
    renamed = tmp_path / "a completely different name.wav"
    shutil.copy(first_run["music"] / "a" / "song.wav", renamed)
    before = stem_files(first_run["out"])
    summary = run([renamed], first_run["out"], first_run["catalog"], model_repo)
    assert [t.status for t in summary.tracks] == ["skipped"]
    assert "song-" in summary.tracks[0].manifest_uri
    assert stem_files(first_run["out"]) == before


@pytest.mark.slow
@pytest.mark.testdata
def test_other_parameters_are_other_work(first_run, model_repo, tmp_path) -> None:
    source = first_run["music"] / "a" / "song.wav"
    out = tmp_path / "stems"
    summary = run([source], out, tmp_path / "c.duckdb", model_repo, format="flac", bit_depth=24)
    (track,) = summary.tracks
    assert track.status == "succeeded"
    assert sorted(p.name for p in Path(track.manifest_uri).parent.glob("*.flac")) == sorted(f"{s}.flac" for s in STEMS)
    assert Path(track.manifest_uri).parent.name not in {p.name for p in first_run["out"].iterdir()}


def test_two_stems(model_repo, tmp_path) -> None:
    source = audio_file(tmp_path, "x.wav", "wav", seconds=1.5)
    summary = separate_library(
        [str(source)],
        separation=SeparationSettings(model=MODEL_NAME, model_repo=str(model_repo), shifts=0, two_stems="vocals"),
        output=OutputSettings(out=str(tmp_path / "out")),
        catalog=str(tmp_path / "c.duckdb"),
    )
    manifest = json.loads(Path(summary.tracks[0].manifest_uri).read_text())
    assert sorted(s["stem"] for s in manifest["stems"]) == ["no_vocals", "vocals"]


@pytest.mark.slow
@pytest.mark.testdata
def test_real_music_full_length(model_repo, testdata, tmp_path) -> None:
    source = testdata / "music" / "Hungarian_Dance_number_5_-_Allegro_in_F_sharp_minor_(string_orchestra).hq.ogg"
    summary = run([source], tmp_path / "out", tmp_path / "c.duckdb", model_repo)
    (track,) = summary.tracks
    assert track.status == "succeeded" and track.audio_seconds == pytest.approx(45.84, abs=0.01)


def test_unknown_model_fails_the_run_before_any_track(model_repo, tmp_path) -> None:
    source = audio_file(tmp_path, "x.wav", "wav", seconds=1.0)
    with pytest.raises(ConfigurationError, match="could not load model 'nope'"):
        separate_library(
            [str(source)],
            separation=SeparationSettings(model="nope", model_repo=str(model_repo)),
            output=OutputSettings(out=str(tmp_path / "out")),
            catalog=str(tmp_path / "c.duckdb"),
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.testdata
def test_a_run_with_failed_tracks_ends_tracks_failed_with_the_counts(first_run) -> None:
    """Visible to an operator: a FAILED-type state named TracksFailed, its message the counts; runs.status failed."""
    from prefect.client.orchestration import get_client

    summary = first_run["summary"]
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(summary.flow_run_id).state
    assert state is not None and state.type.value == "FAILED" and state.name == "TracksFailed"
    assert state.message is not None and state.message.startswith("3 of 12 tracks failed (9 succeeded, 0 skipped")
    sql = f"SELECT status, tracks_failed, tracks_succeeded FROM runs WHERE run_id = '{summary.run_id}'"
    assert rows(first_run["catalog"], sql) == [("failed", 3, 9)]


def test_from_python_a_run_with_failed_tracks_raises_with_its_summary_and_a_clean_one_completes(
    model_repo, tmp_path
) -> None:
    good, broken = audio_file(tmp_path, "good.wav", "wav", seconds=1.0), tmp_path / "broken.mp3"
    broken.write_bytes(b"ID3 not really an mp3" * 40)
    settings = {
        "separation": SeparationSettings(model=MODEL_NAME, model_repo=str(model_repo), shifts=0),
        "output": OutputSettings(out=str(tmp_path / "out")),
        "catalog": str(tmp_path / "c.duckdb"),
    }
    with pytest.raises(TracksFailed, match=r"1 of 2 tracks failed") as raised:
        separate_library([str(good), str(broken)], **settings)
    assert {t.source: t.status for t in raised.value.summary.tracks} == {str(good): "succeeded", str(broken): "failed"}
    clean = separate_library([str(good)], return_state=True, **settings)
    assert clean.is_completed() and library_summary(clean).count("skipped") == 1
    assert rows(tmp_path / "c.duckdb", "SELECT status FROM runs ORDER BY started_at") == [("failed",), ("completed",)]
