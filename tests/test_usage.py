"""Command-line mistakes are answered before any work: exit 2, on stderr, with the next step, nothing created.

Real `stemworks` processes without a Prefect server (none is started: the checks come first). How fast
they answer is measured in benchmarks/usage_errors.py, not here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.audiogen import audio_file
from tests.helpers.cli import stemworks as run_cli
from tests.helpers.constants import MODEL_NAME

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # every test runs `stemworks` as a process


def stemworks(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PREFECT_HOME": str(cwd / ".prefect")}
    env.pop("PREFECT_API_URL", None)
    return run_cli(*args, env=env, cwd=cwd, timeout=300)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return audio_file(tmp_path, "a.wav", "wav", seconds=0.5)


def cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


CASES = {
    "missing source": (["{tmp}/missing.wav"], "no such file or folder: {tmp}/missing.wav", "check the path"),
    "flac at 32 bits": (["--format", "flac", "--bit-depth", "32"], "flac stores 16 or 24 bits", "use wav"),
    "unknown choice": (["--format", "ogg"], "invalid choice: 'ogg'", ""),
    "overlap out of range": (["--overlap", "1.5"], "--overlap: Input should be less than 1", ""),
    "unknown model": (["--model", "missing_model"], "could not load model 'missing_model' from repository", ""),
    "model repo not a folder": (
        ["--model-repo", "{tmp}/nowhere"],
        "model repository {tmp}/nowhere is not a directory",
        "",
    ),
    "two stems of no source": (["--two-stems", "kazoo"], "two_stems 'kazoo' is not a source of model 'tiny'", ""),
    "catalog not DuckDB": (
        ["--catalog", "{tmp}/a.wav"],
        "{tmp}/a.wav is not a DuckDB catalog file",
        "pass --catalog with a new file name",
    ),
    "out under a file": (
        ["--out", "{tmp}/a.wav/stems"],
        "--out {tmp}/a.wav/stems: {tmp}/a.wav is not a folder",
        "choose a folder you can write to",
    ),
    "cuda without CUDA": (["--device", "cuda"], "device 'cuda' was requested but no CUDA device is available", ""),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_usage_exits_two_on_stderr_before_anything_is_created(
    case: str, tmp_path: Path, source: Path, model_repo: Path
) -> None:
    if case == "cuda without CUDA" and cuda_present():
        pytest.skip("this machine has CUDA")
    arguments, message, next_step = CASES[case]
    extra = [argument.replace("{tmp}", str(tmp_path)) for argument in arguments]
    message, next_step = message.replace("{tmp}", str(tmp_path)), next_step.replace("{tmp}", str(tmp_path))
    sources = [] if case == "missing source" else [str(source)]
    args = [
        "separate",
        *sources,
        "--model-repo",
        str(model_repo),
        "--model",
        MODEL_NAME,
        "--out",
        str(tmp_path / "stems"),
        "--catalog",
        str(tmp_path / "catalog.duckdb"),
        *extra,
    ]
    result = stemworks(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""  # problems go to stderr, results to stdout
    assert message in result.stderr and next_step in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "stems").exists() and not (tmp_path / "catalog.duckdb").exists()
    assert not (tmp_path / ".prefect").exists()  # Prefect never started


def test_a_model_that_cannot_be_downloaded_says_how_to_work_offline(tmp_path: Path, source: Path) -> None:
    from tasks.engine.models import model_hub_reachable

    if model_hub_reachable():
        pytest.skip("the model hub is reachable from here: the default model would be downloaded")
    result = stemworks("separate", str(source), "--out", str(tmp_path / "stems"), cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "could not download model 'htdemucs'" in result.stderr
    assert "--model-repo DIR --model htdemucs" in result.stderr
    assert "stemworks model random models --name random_htdemucs --size full" in result.stderr
    assert "\n" not in result.stderr.split("stemworks: error: ", 1)[1].rstrip("\n")  # one unwrapped line
    assert not (tmp_path / "stemworks.duckdb").exists()


@pytest.mark.parametrize("location", ["missing", "empty"])
def test_rebuild_refuses_a_location_without_manifests_and_leaves_the_catalog_alone(
    location: str, tmp_path: Path
) -> None:
    from catalog import Catalog

    catalog = tmp_path / "catalog.duckdb"
    Catalog(catalog)  # a live catalog (empty, but a real file)
    before = catalog.read_bytes()
    out = tmp_path / "stems"
    if location == "empty":
        (out / "some-folder").mkdir(parents=True)
    result = stemworks("catalog", "rebuild", "--from", str(out), "--catalog", str(catalog), cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    expected = "does not exist" if location == "missing" else "no manifest.json under"
    assert expected in result.stderr and "--allow-empty" in result.stderr
    assert catalog.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("catalog")) == [
        "catalog.duckdb",
        "catalog.duckdb.lock",
    ]

    allowed = stemworks(
        "catalog", "rebuild", "--from", str(out), "--catalog", str(catalog), "--allow-empty", cwd=tmp_path
    )
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert "0 runs, 0 tracks, 0 stems" in allowed.stdout


def test_the_parser_loads_without_the_pipeline() -> None:
    """`--help` and the usage errors need argparse and the settings models only. The pipeline, Prefect, torch and
    the storage clients are imported by the commands that run flows (a module-level import of the temporary-server
    helper once pulled fsspec and asyncio into `--help`: 0.35-0.40 s instead of 0.25 s)."""
    heavy = ["asyncio", "catalog", "demucs", "duckdb", "flows.pipeline", "fsspec", "numpy", "prefect", "torch"]
    code = f"import sys, flows.cli.main; print([m for m in {heavy!r} if m in sys.modules])"
    command = [sys.executable, "-c", code]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
