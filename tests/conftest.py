"""Shared fixtures (a tiny real-architecture HTDemucs repo, real test data, a Prefect harness), the check that
tests using them carry their markers, and the opt-in --strict-warnings. Helpers live in tests/helpers/."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.engine.model_repo import write_random_htdemucs
from tests.helpers.constants import MODEL_NAME, TESTDATA

# A test using the fixture on the left must carry the marker on the right, so that `-m "not prefect_server"`
# really starts no Prefect server and `-m "not testdata"` really needs no ../shared/testdata.
FIXTURE_MARKERS = {"prefect_harness": "prefect_server", "testdata": "testdata"}
# With --strict-warnings, these become errors; the third-party filters in pyproject.toml still apply.
STRICT_WARNINGS = ("error::DeprecationWarning", "error::PendingDeprecationWarning", "error::FutureWarning")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--strict-warnings",
        action="store_true",
        help="turn deprecation warnings into errors, except those pyproject.toml filters by name",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--strict-warnings"):
        # Later filters win: the errors go first, then the known third-party filters again, on top of them.
        # (`-W error::DeprecationWarning` would override every filter in pyproject.toml.)
        known = list(config.getini("filterwarnings"))
        for line in (*STRICT_WARNINGS, *known):
            config.addinivalue_line("filterwarnings", line)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unmarked = [
        f"{item.nodeid} uses the {fixture!r} fixture but is not marked {marker!r}"
        for item in items
        for fixture, marker in FIXTURE_MARKERS.items()
        if fixture in getattr(item, "fixturenames", ()) and item.get_closest_marker(marker) is None
    ]
    if unmarked:
        raise pytest.UsageError("\n".join(["missing markers (see conftest.FIXTURE_MARKERS):", *unmarked]))


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
