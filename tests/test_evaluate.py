"""Evaluation against reference stems: dataset discovery, reference checks, the oracle anchors, and
`stemworks evaluate` end to end (real CLI processes, a real Prefect API, the tiny random-weight HTDemucs,
the MUSDB18 clips of ../shared/testdata)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import duckdb
import numpy as np
import pytest

from tasks.core.settings import Limits, OutputSettings, SeparationSettings, job_key
from tasks.io.claims import Claim, release, try_claim
from tasks.steps.evaluate.datasets import (
    ReferencesError,
    check_references,
    discover,
    load_references,
    reference_parts,
)
from tasks.steps.evaluate.nsdr import DELTA
from tasks.steps.evaluate.scoring import score_arrays
from tests.helpers.audiogen import music, reference_folder, write_audio
from tests.helpers.bsseval_reference import read_stem_file
from tests.helpers.cli import stemworks as run_cli
from tests.helpers.constants import MODEL_NAME

STEMS = ["drums", "bass", "other", "vocals"]
ALAC = "The Easton Ellises - Falcon 69 (NI ALAC).stem.m4a"  # lossless: decoded the same everywhere
RATE = 44100


def musdb_folder(folder: Path, clip: Path, seconds: float) -> Path:
    """The MUSDB18-HQ layout made from an NI stem file's streams (its first `seconds`)."""
    streams = read_stem_file(clip, seconds)
    for name, audio in zip(["mixture", *STEMS], streams, strict=True):
        write_audio(folder / f"{name}.wav", audio.T)
    return folder


# ---------------------------------------------------------------- discovery and references (no Prefect)


@pytest.mark.testdata
def test_discovers_ni_stem_files_and_reference_folders(testdata: Path, tmp_path: Path) -> None:
    found = discover([str(testdata / "musdb7")])
    assert [i.name for i in found.items] == [
        "musdb7/Music Delta - 80s Rock",
        "musdb7/The Easton Ellises - Falcon 69 (NI ALAC)",
        "musdb7/The Easton Ellises - Falcon 69",
    ]
    assert {i.layout for i in found.items} == {"ni-stems"}
    falcon = found.items[1]
    assert {s: r.stream_index for s, r in falcon.references.items()} == {"drums": 1, "bass": 2, "other": 3, "vocals": 4}

    root = tmp_path / "set"
    reference_folder(root / "train" / "Song A")
    (root / "train" / "Song A" / "notes.txt").write_text("ignored")
    reference_folder(root / "test" / "Song B")
    found = discover([str(root), str(root / "test" / "Song B")])  # the same item twice is listed once
    assert [(i.name, i.layout) for i in found.items] == [("set/test/Song B", "folder"), ("set/train/Song A", "folder")]
    assert sorted(found.items[1].references) == sorted(STEMS)

    assert discover([str(testdata / "music")]).items == []
    assert discover([str(tmp_path / "nowhere")]).problems == [(str(tmp_path / "nowhere"), "no such file or folder")]


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({"skip": "vocals"}, "no reference for stem 'vocals': expected {folder}/vocals.<wav|flac|...>"),
        ({"bass": {"seconds": 1.0}}, "reference 'bass' ({folder}/bass.wav) is 1.000 s long, the mixture 2.000 s"),
        ({"other": {"rate": 48000}}, "reference 'other' ({folder}/other.wav) is at 48000 Hz, the mixture at 44100 Hz"),
        ({"drums": {"channels": 1}}, "reference 'drums' ({folder}/drums.wav) has 1 channel(s), the mixture 2"),
    ],
)
def test_mismatched_references_are_refused_naming_file_and_reason(layout: dict, message: str, tmp_path: Path) -> None:
    folder = reference_folder(tmp_path / "item", **layout)
    (item,) = discover([str(folder)]).items
    with pytest.raises(ReferencesError) as caught:
        check_references(item, STEMS, Limits())
    assert caught.value.reason.startswith(message.format(folder=folder)), caught.value.reason
    assert caught.value.source == "item"


def test_a_length_the_headers_hide_is_caught_on_the_samples(tmp_path: Path) -> None:
    folder = reference_folder(tmp_path / "item")
    (item,) = discover([str(folder)]).items
    info = check_references(item, STEMS, Limits())
    write_audio(folder / "bass.wav", music(1.5) * 0.25)  # replaced after the check: only decoding can tell
    with pytest.raises(ReferencesError, match=r"reference 'bass' .* is 1\.500 s long, the mixture 2\.000 s"):
        load_references(item, info, reference_parts(item, STEMS), RATE, Limits())


def test_a_file_named_like_a_stem_file_without_its_streams_fails_alone(tmp_path: Path) -> None:
    write_audio(tmp_path / "plain.stem.m4a", music(1.0), kind="m4a")
    (item,) = discover([str(tmp_path)]).items
    with pytest.raises(ReferencesError, match=r"an NI stem file has 5 audio streams .* this one has 1"):
        check_references(item, STEMS, Limits())


def test_two_stems_score_the_complement_against_the_sum_of_the_other_references(tmp_path: Path) -> None:
    folder = reference_folder(tmp_path / "item")
    (item,) = discover([str(folder)]).items
    parts = reference_parts(item, ["vocals", "no_vocals"])
    assert parts == {"vocals": ["vocals"], "no_vocals": ["bass", "drums", "other"]}
    info = check_references(item, ["vocals", "no_vocals"], Limits())
    refs = load_references(item, info, parts, RATE, Limits())
    single = load_references(item, info, {s: [s] for s in STEMS}, RATE, Limits())
    np.testing.assert_allclose(refs[1], single[0] + single[1] + single[2], atol=1e-6)


# ---------------------------------------------------------------- anchors: the oracle and mixture / 4


@pytest.mark.testdata
def test_oracle_ceiling_and_the_mixture_quarter_baseline(testdata: Path) -> None:
    """The references scored against themselves give the ceiling: SDR is infinite in every window, which
    museval's TrackStore stores as NaN (no value), SIR/ISR/SAR are over 100 dB (rounding), and nSDR is
    10 log10(|s|^2 / 1e-7 + 1). mixture / 4 as every
    estimate gives the low baseline; its SDRs are the plain ratios computed here independently."""
    streams = read_stem_file(testdata / "musdb7" / ALAC, 3.5)
    mixture, refs = streams[0], streams[1:].astype(np.float64)

    oracle = score_arrays(refs, refs, STEMS, RATE)
    energy = (refs**2).sum(axis=(1, 2))
    for score, e in zip(oracle, energy, strict=True):
        assert score.sdr is None  # inf in every window: museval stores NaN, a median of nothing
        # The projections are exact up to museval's eps ridge and float64 rounding: SIR, ISR and SAR are capped there.
        assert min(score.sir or 0, score.isr or 0, score.sar or 0) > 100
        assert score.nsdr == pytest.approx(10 * np.log10((e + DELTA) / DELTA), abs=1e-9)
        assert score.nsdr > 60

    quarter = np.repeat(mixture[None].astype(np.float64) / 4, 4, axis=0)
    baseline = score_arrays(refs, quarter, STEMS, RATE)
    error = ((refs - quarter) ** 2).sum(axis=(1, 2))
    windows = refs[:, : 3 * RATE].reshape(4, 3, RATE, 2), (refs - quarter)[:, : 3 * RATE].reshape(4, 3, RATE, 2)
    window_sdr = 10 * np.log10((windows[0] ** 2).sum(axis=(2, 3)) / (windows[1] ** 2).sum(axis=(2, 3)))
    for i, score in enumerate(baseline):
        assert score.nsdr == pytest.approx(10 * np.log10((energy[i] + DELTA) / (error[i] + DELTA)), abs=1e-9)
        assert score.sdr == pytest.approx(np.median(np.round(window_sdr[i], 5)), abs=1e-5)
        assert -15 < score.sdr < 10 and score.sdr < oracle[i].nsdr - 50


# ---------------------------------------------------------------- `stemworks evaluate` end to end


def stemworks(*args: str, api_url: str) -> subprocess.CompletedProcess:
    return run_cli(*args, env={**os.environ, "PREFECT_API_URL": api_url})


@pytest.fixture(scope="module")
def api_url(prefect_harness) -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@pytest.mark.slow
def test_no_recognisable_items_exits_two_naming_the_layouts(tmp_path: Path) -> None:
    write_audio(tmp_path / "song.wav", music(0.5))
    result = run_cli("evaluate", str(tmp_path), "--model", MODEL_NAME, env=dict(os.environ))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"no recognisable items in {tmp_path}" in result.stderr
    assert "accepted layouts: NI stem files (*.stem.mp4" in result.stderr and "mixture.wav beside" in result.stderr
    assert result.stdout == ""


@pytest.mark.slow
def test_datasets_that_cannot_be_listed_are_each_named_with_the_reason() -> None:
    # No network is touched: an http(s) dataset and a scheme the source policy refuses are turned away before any
    # request. (A local path that does not exist is refused earlier, on its own: "no such file or folder".)
    datasets = ["http://127.0.0.1:9/set", "gs://bucket/set"]
    result = run_cli("evaluate", *datasets, "--model", MODEL_NAME, env=dict(os.environ))
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert "  http://127.0.0.1:9/set: an http(s) URL cannot be listed: give a local path or an object-store URL" in (
        result.stderr
    )
    refused = "  gs://bucket/set: refused: URL scheme 'gs' is not allowed"
    assert any(line.startswith(refused) and "STEMWORKS_ALLOWED_SCHEMES" in line for line in lines), result.stderr
    assert result.stdout == ""


@pytest.mark.slow
@pytest.mark.testdata
@pytest.mark.prefect_server
def test_evaluate_scores_records_reports_and_compares_settings(
    testdata: Path, tmp_path: Path, model_repo: Path, api_url: str
) -> None:
    dataset = tmp_path / "refs"
    dataset.mkdir()
    shutil.copy(testdata / "musdb7" / ALAC, dataset / "falcon.stem.m4a")
    musdb_folder(dataset / "musdb" / "Falcon cut", testdata / "musdb7" / ALAC, 3.0)
    reference_folder(dataset / "bad" / "no vocals", skip="vocals")
    reference_folder(dataset / "bad" / "short bass", bass={"seconds": 1.0})
    out, catalog = tmp_path / "stems", tmp_path / "catalog.duckdb"
    common = ["--model", MODEL_NAME, "--model-repo", str(model_repo), "--out", str(out), "--catalog", str(catalog)]

    first = stemworks("evaluate", str(dataset), *common, "--shifts", "0", api_url=api_url)
    assert first.returncode == 1, first.stdout + first.stderr
    assert "2 evaluated, 2 failed" in first.stdout
    assert "shifts=0 overlap=0.25 fp32 wav16 (this run)" in first.stdout
    assert all(stem in first.stdout for stem in STEMS)
    assert f"FAILED refs/bad/no vocals: no reference for stem 'vocals': expected {dataset}/bad/no vocals/vocals." in (
        first.stdout
    )
    assert "FAILED refs/bad/short bass: reference 'bass' (" in first.stdout and "is 1.000 s long" in first.stdout
    with duckdb.connect(str(catalog), read_only=True) as con:
        rows = con.execute(
            "SELECT item, stem, sdr, nsdr, model_name, evaluator_version, parameters FROM evaluations ORDER BY ALL"
        ).fetchall()
        failures = con.execute("SELECT step, reason FROM failures ORDER BY reason").fetchall()
        (run_id, flow_run_id, status) = con.execute("SELECT run_id, flow_run_id, status FROM runs").fetchone()
    assert [(r[0], r[1]) for r in rows] == [
        (i, s) for i in ("refs/falcon", "refs/musdb/Falcon cut") for s in sorted(STEMS)
    ]
    assert all(np.isfinite(r[3]) and r[4] == MODEL_NAME and "museval 0.4.1" in r[5] for r in rows)
    assert '"shifts": 0' in rows[0][6]
    assert [f[0] for f in failures] == ["validate", "validate"] and status == "failed"
    report = out / "_evaluations" / run_id
    assert (report / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (report / "report.md").read_text()
    assert "| configuration | stem | items | SDR median |" in markdown and "report.png)" in markdown
    assert "no vocals" in markdown
    assert _artifact_keys(flow_run_id) >= {"evaluation-report"}

    # Another setting: its scores appear beside the first run's, in the CLI's table and in the comparison view.
    second = stemworks("evaluate", str(dataset / "falcon.stem.m4a"), *common, "--shifts", "1", api_url=api_url)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "shifts=1 overlap=0.25 fp32 wav16 (this run)" in second.stdout
    assert "shifts=0 overlap=0.25 fp32 wav16\n" in second.stdout
    with duckdb.connect(str(catalog), read_only=True) as con:
        pairs = con.execute(
            "SELECT config_a, config_b, stem, items FROM evaluation_pairs WHERE run_a = ? ORDER BY stem", [run_id]
        ).fetchall()
        configs = con.execute("SELECT config, count(*), sum(items) FROM evaluation_configs GROUP BY 1").fetchall()
    assert [(p[2], p[3]) for p in pairs] == [(s, 1) for s in sorted(STEMS)]
    assert all("shifts=0" in p[0] and "shifts=1" in p[1] for p in pairs)
    assert sorted((c[1], c[2]) for c in configs) == [(4, 4), (4, 8)]

    # The first setting again: the stems published by the first run are reused (skipped, not separated), and
    # score exactly as before.
    third = stemworks("evaluate", str(dataset / "musdb"), *common, "--shifts", "0", api_url=api_url)
    assert third.returncode == 0, third.stdout + third.stderr
    with duckdb.connect(str(catalog), read_only=True) as con:
        (last,) = con.execute("SELECT run_id FROM runs ORDER BY started_at DESC LIMIT 1").fetchone()
        statuses = con.execute("SELECT status FROM tracks WHERE run_id = ?", [last]).fetchall()
        again = con.execute(
            "SELECT a.stem, a.sdr, b.sdr, a.nsdr, b.nsdr FROM evaluations a "
            "JOIN evaluations b USING (content_sha256, stem) WHERE a.run_id = ? AND b.run_id = ?",
            [run_id, last],
        ).fetchall()
    assert statuses == [("skipped",)]
    assert len(again) == 4 and all(r[1] == r[2] and r[3] == r[4] for r in again)

    # A lost catalog: the scores come back from the evaluations files beside the reports, with a run row for
    # the third run, which published nothing.
    rebuilt = tmp_path / "rebuilt.duckdb"
    result = run_cli("catalog", "rebuild", "--from", str(out), "--catalog", str(rebuilt), env=dict(os.environ))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 runs, 3 tracks, 12 stems, 16 evaluation rows" in result.stdout
    rows = "SELECT run_id, item, content_sha256, stem, config, parameters, sdr, sir, isr, sar, nsdr FROM evaluations"
    with duckdb.connect(str(catalog), read_only=True) as before, duckdb.connect(str(rebuilt), read_only=True) as after:
        assert after.execute(f"{rows} ORDER BY ALL").fetchall() == before.execute(f"{rows} ORDER BY ALL").fetchall()
        assert after.execute("SELECT run_id FROM runs WHERE run_id = ?", [last]).fetchall() == [(last,)]
        configs = "SELECT config, stem, items, median_sdr FROM evaluation_configs ORDER BY ALL"
        assert after.execute(configs).fetchall() == before.execute(configs).fetchall()

    # A job that another run holds (a worker elsewhere separating the same mixture with the same settings): the
    # item fails alone, naming the holder, and is not separated here.
    with duckdb.connect(str(catalog), read_only=True) as con:
        sha, signature = con.execute(
            "SELECT content_sha256, model_signature FROM evaluations WHERE run_id = ? AND item = 'refs/falcon'",
            [run_id],
        ).fetchone()
    key = job_key(sha, signature, SeparationSettings(model=MODEL_NAME, shifts=2), OutputSettings())
    claim = try_claim(str(out), key, run_id="run-elsewhere", source="falcon on another host", lease_s=3600)
    assert isinstance(claim, Claim)
    try:
        held = stemworks("evaluate", str(dataset / "falcon.stem.m4a"), *common, "--shifts", "2", api_url=api_url)
    finally:
        release(claim)
    assert held.returncode == 1, held.stdout + held.stderr
    assert "0 evaluated, 1 failed" in held.stdout
    assert "not separated here (being separated by run run-elsewhere" in held.stdout
    assert "evaluate it again" in held.stdout
    with duckdb.connect(str(catalog), read_only=True) as con:
        (last,) = con.execute("SELECT run_id FROM runs ORDER BY started_at DESC LIMIT 1").fetchone()
        assert con.execute("SELECT status FROM tracks WHERE run_id = ?", [last]).fetchall() == [("skipped",)]
        assert con.execute("SELECT count(*) FROM evaluations WHERE run_id = ?", [last]).fetchone() == (0,)


def _artifact_keys(flow_run_id: str) -> set[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read() -> set[str]:
        async with get_client() as client:
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
            )
            return {a.key for a in artifacts if a.key}

    return asyncio.run(read())
