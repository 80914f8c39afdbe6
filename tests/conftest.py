"""Shared fixtures: a tiny real-architecture HTDemucs repo, synthetic and real audio, a Prefect harness."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.engine.model_repo import write_random_htdemucs

TESTDATA = Path(__file__).resolve().parents[2] / "shared" / "testdata"
MODEL_NAME = "tiny"


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Demucs local model repository holding `tiny`: HTDemucs with random weights."""
    repo = tmp_path_factory.mktemp("models")
    write_random_htdemucs(repo, MODEL_NAME, "tiny", seed=0)
    return repo


@pytest.fixture(scope="session")
def testdata() -> Path:
    if not TESTDATA.is_dir():
        pytest.skip(f"shared test data not found at {TESTDATA}")
    return TESTDATA


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API server (SQLite) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(autouse=True)
def _isolated_work_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEMWORKS_WORK_DIR", str(tmp_path / "work"))
