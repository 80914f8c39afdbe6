"""The `stemworks` command as a user runs it: a real process, its exit status, its summary."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from tests.helpers.audiogen import audio_file
from tests.helpers.cli import stemworks as run_cli
from tests.helpers.constants import MODEL_NAME

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # every test runs `stemworks` as a process


def stemworks(*args: str, api_url: str | None = None, home: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    else:  # ephemeral mode: the CLI starts its own temporary API server
        env.pop("PREFECT_API_URL", None)
        env["PREFECT_HOME"] = str(home)
    return run_cli(*args, env=env)


@pytest.fixture(scope="module")
def api_url(prefect_harness) -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@pytest.fixture
def library(tmp_path: Path) -> Path:
    music = tmp_path / "music"
    audio_file(music / "x", "same name.wav", "wav", seconds=1.5, seed=1)
    audio_file(music / "y", "same name.wav", "wav", seconds=1.5, seed=2)
    audio_file(music, "ünïcødé 🎵.mp3", "mp3", seconds=1.5)
    (music / "corrupt.flac").write_bytes(b"fLaC" + b"\x00" * 64)
    (music / "text.ogg").write_text("definitely not vorbis")
    return music


@pytest.mark.prefect_server
def test_library_run_then_identical_rerun(library: Path, tmp_path: Path, model_repo: Path, api_url: str) -> None:
    out, catalog = tmp_path / "stems", tmp_path / "catalog.duckdb"
    args = [
        "separate",
        str(library),
        "--model-repo",
        str(model_repo),
        "--model",
        MODEL_NAME,
        "--out",
        str(out),
        "--catalog",
        str(catalog),
        "--shifts",
        "0",
    ]
    first = stemworks(*args, api_url=api_url)
    assert first.returncode == 1, first.stdout + first.stderr
    assert "3 succeeded, 0 skipped, 2 failed" in first.stdout
    assert "corrupt.flac" in first.stdout and "text.ogg" in first.stdout and "not readable as audio" in first.stdout
    manifests = sorted(out.glob("*/manifest.json"))
    assert len(manifests) == 3
    stems_before = sorted(p for p in out.rglob("*.wav"))
    assert len(stems_before) == 12

    second = stemworks(*args, api_url=api_url)
    assert second.returncode == 1
    assert "0 succeeded, 3 skipped, 2 failed" in second.stdout
    assert sorted(p for p in out.rglob("*.wav")) == stems_before
    with duckdb.connect(str(catalog), read_only=True) as con:
        statuses = con.execute("SELECT status, count(*) FROM tracks GROUP BY ALL ORDER BY 1").fetchall()
        reasons = con.execute("SELECT source, error FROM tracks WHERE status = 'failed'").fetchall()
    assert statuses == [("failed", 4), ("skipped", 3), ("succeeded", 3)]
    assert all(error for _, error in reasons)

    query = stemworks(
        "catalog",
        "query",
        "SELECT count(*) AS n FROM stems",
        "--catalog",
        str(catalog),
        "--format",
        "csv",
        api_url=api_url,
    )
    assert query.returncode == 0 and query.stdout.split() == ["n", "12"]


@pytest.mark.prefect_server
def test_several_runs_started_at_once_without_a_server_all_complete(tmp_path: Path, model_repo: Path) -> None:
    """As users run it: no PREFECT_API_URL, one PREFECT_HOME, three processes at once on one catalog and output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    runs = []
    for index in range(3):
        source = audio_file(tmp_path / f"music{index}", f"song{index}.wav", "wav", seconds=1.0, seed=index)
        command = [
            sys.executable,
            "-m",
            "flows.cli",
            "separate",
            str(source),
            "--model-repo",
            str(model_repo),
            "--model",
            MODEL_NAME,
            "--out",
            str(tmp_path / "stems"),
            "--catalog",
            str(tmp_path / "c.duckdb"),
            "--shifts",
            "0",
        ]
        runs.append(
            subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    results = [(run.wait(timeout=900), *run.communicate()) for run in runs]
    for code, out, err in results:
        assert code == 0, out + err
        assert "1 succeeded, 0 skipped, 0 failed" in out
    with duckdb.connect(str(tmp_path / "c.duckdb"), read_only=True) as con:
        assert con.execute("SELECT status, count(*) FROM runs GROUP BY ALL").fetchall() == [("completed", 3)]
    assert len(list((tmp_path / "stems").glob("*/manifest.json"))) == 3


@pytest.mark.prefect_server
def test_all_good_exits_zero_in_ephemeral_mode(tmp_path: Path, model_repo: Path) -> None:
    source = audio_file(tmp_path, "fine.flac", "flac", seconds=1.0)
    result = stemworks(
        "separate",
        str(source),
        "--model-repo",
        str(model_repo),
        "--model",
        MODEL_NAME,
        "--out",
        str(tmp_path / "o"),
        "--catalog",
        str(tmp_path / "c.duckdb"),
        "--format",
        "flac",
        "--bit-depth",
        "24",
        "--two-stems",
        "vocals",
        home=tmp_path / "prefect-home",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in (tmp_path / "o").rglob("*.flac")) == ["no_vocals.flac", "vocals.flac"]


@pytest.mark.prefect_server
@pytest.mark.parametrize(
    "args,message",
    [
        (["--format", "ogg"], "invalid choice"),
        (["--format", "flac", "--bit-depth", "32"], "flac stores 16 or 24 bits"),
        (["--overlap", "1.5"], "overlap"),
        (["--model", "missing_model"], "could not load model 'missing_model'"),
        (["--two-stems", "kazoo"], "two_stems 'kazoo' is not a source"),
    ],
)
def test_bad_usage_exits_two(args: list[str], message: str, tmp_path: Path, model_repo: Path, api_url: str) -> None:
    source = audio_file(tmp_path, "a.wav", "wav", seconds=0.5)
    base = [
        "separate",
        str(source),
        "--model-repo",
        str(model_repo),
        "--model",
        MODEL_NAME,
        "--out",
        str(tmp_path / "o"),
        "--catalog",
        str(tmp_path / "c.duckdb"),
    ]
    result = stemworks(*base, *args, api_url=api_url)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stdout + result.stderr
    assert not (tmp_path / "o").exists()  # rejected before any work started


def test_random_model_command_writes_a_loadable_repo(tmp_path: Path) -> None:
    result = stemworks("model", "random", str(tmp_path / "repo"), "--name", "demo", home=tmp_path / "h")
    assert result.returncode == 0
    (model_file,) = (tmp_path / "repo").glob("demo-*.th")
    from demucs.pretrained import get_model

    assert get_model("demo", repo=tmp_path / "repo").sources == ["drums", "bass", "other", "vocals"]
    assert len(model_file.stem.split("-")[1]) == 8
