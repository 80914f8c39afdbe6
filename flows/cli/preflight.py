"""Checks a `stemworks separate` command line can pass before any work starts, in about a second.

Everything that can be known locally is checked before Prefect starts or the catalog is touched:
sources that should exist, places that must be writable, the catalog file, the model and the device.
A failure is a usage error (exit 2) whose message names the problem and the next step.
"""

from __future__ import annotations

import contextlib
import glob
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from catalog.ducklake import is_ducklake
from catalog.errors import CatalogError
from tasks.core.settings import SeparationSettings
from tasks.io.locations import has_scheme, is_glob, normalise

# Every DuckDB database file carries this magic at byte 8 (DuckDB's storage header).
DUCKDB_MAGIC, DUCKDB_MAGIC_OFFSET = b"DUCK", 8


@dataclass(frozen=True)
class UsageError(Exception):
    """A command line that cannot work: `problem` says what is wrong, `fix` what to do instead."""

    problem: str
    fix: str = ""

    def __str__(self) -> str:
        return f"{self.problem}\n  {self.fix}" if self.fix else self.problem


def missing_sources(sources: list[str]) -> list[str]:
    """Local sources that name nothing: a path that does not exist, or a pattern that matches no file."""
    missing = []
    for source in sources:
        if has_scheme(source) and not source.startswith("file://"):
            continue  # URLs and stores are checked when they are listed or fetched
        path = normalise(source)
        found = glob.glob(path, recursive=True) if is_glob(source) else os.path.lexists(path)
        if not found:
            missing.append(source)
    return missing


def unwritable(location: str) -> str | None:
    """Why files cannot be created under local folder `location` (which may not exist yet), or None."""
    if has_scheme(location) and not location.startswith("file://"):
        return None  # object stores answer for themselves when the first track is published
    path = Path(normalise(location))
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is not a folder"
    try:  # an unnamed temporary file: the only test that also holds for root and read-only mounts
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        return f"{existing} is not writable ({exc.strerror or exc})"
    return None


def catalog_problem(path: Path) -> str | None:
    if path.exists():
        if not path.is_file():
            return f"{path} is not a file"
        with open(path, "rb") as handle:
            handle.seek(DUCKDB_MAGIC_OFFSET)
            if handle.read(len(DUCKDB_MAGIC)) != DUCKDB_MAGIC:
                return f"{path} is not a DuckDB catalog file"
        if not os.access(path, os.R_OK | os.W_OK):
            return f"{path} is not writable"
        return None
    return unwritable(str(path.parent))


def check(
    sources: list[str],
    separation: SeparationSettings,
    *,
    out: str,
    catalog: Path | str,
    work_dir: str,
    catalog_data_path: str | None = None,
    announce: Callable[[str], None] = lambda _: None,
) -> None:
    """Raise UsageError for the first thing that would make the run fail before its first track.

    Cheap checks first; the model (torch, and a download when it is not cached) last.
    """
    if missing := missing_sources(sources):
        raise UsageError(
            f"no such file or folder: {', '.join(missing)}",
            "check the path (quote globs so the shell does not expand them)",
        )
    for what, location in (("--out", out), ("--work-dir", work_dir)):
        if (problem := unwritable(location)) is not None:
            raise UsageError(f"{what} {location}: {problem}", f"choose a folder you can write to with {what}")
    if is_ducklake(catalog):
        check_ducklake(str(catalog), catalog_data_path, announce)
    elif catalog_data_path:
        raise UsageError(
            f"--catalog-data-path {catalog_data_path}: --catalog {catalog} is a DuckDB file, which keeps its data "
            f"in itself",
            "drop --catalog-data-path (and STEMWORKS_CATALOG_DATA_PATH), or pass a 'ducklake:postgres:...' --catalog",
        )
    elif (problem := catalog_problem(Path(catalog))) is not None:
        raise UsageError(
            f"--catalog {catalog}: {problem}", "pass --catalog with a new file name or an existing stemworks catalog"
        )
    check_model(separation, announce)


def check_ducklake(location: str, data_path: str | None, announce: Callable[[str], None]) -> None:
    """A malformed DuckLake location, or a PostgreSQL that cannot be reached, stops the run before any track."""
    from catalog.backend import catalog_data_path
    from catalog.ducklake import check_reachable, redact_location

    announce(f"connecting to the DuckLake catalog {redact_location(location)}")
    try:
        check_reachable(location, catalog_data_path(data_path))
    except CatalogError as exc:
        raise UsageError(
            f"--catalog: {exc.reason}",
            "check the DuckLake location ('ducklake:postgres:dbname=NAME host=HOST port=PORT user=USER'), that its "
            "PostgreSQL server is up and the database exists (createdb NAME)",
        ) from None


def check_model(separation: SeparationSettings, announce: Callable[[str], None]) -> None:
    """Device, model (from --model-repo, the local cache or a download) and --two-stems."""
    from tasks.core.errors import ConfigurationError  # torch and demucs load with the model module
    from tasks.engine.models import load_model, model_hub_reachable

    if separation.model_repo is None and not model_hub_reachable():
        # Offline: let the HuggingFace client answer from its cache at once instead of retrying for ~25 s.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    announce(f"loading model {separation.model} (device {separation.device})")
    try:
        with contextlib.redirect_stdout(sys.stderr):  # torch.hub prints download progress on stdout
            load_model(separation)
    except ConfigurationError as exc:
        raise UsageError(exc.reason) from None
