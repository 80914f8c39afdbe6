"""Which catalog a location names: a DuckDB file (the default, one machine) or a DuckLake (many hosts).

--catalog PATH                           a DuckDB file (`$STEMWORKS_CATALOG`, else ./stemworks.duckdb)
--catalog 'ducklake:postgres:dbname=... host=... port=... user=...'
          [--catalog-data-path DIR|s3://bucket/prefix]   (`$STEMWORKS_CATALOG_DATA_PATH`)
"""

from __future__ import annotations

import os
from pathlib import Path

from catalog.ducklake import DuckLakeCatalog, DuckLakeLocation, is_ducklake, redact_location
from catalog.errors import CatalogError
from catalog.store import DEFAULT_BUSY_TIMEOUT_S, Catalog

__all__ = [
    "catalog_data_path",
    "catalog_location",
    "describe",
    "is_ducklake",
    "open_catalog",
    "open_existing",
    "shown_location",
]

DEFAULT_FILE = "stemworks.duckdb"


def catalog_location(explicit: str | os.PathLike[str] | None = None) -> str:
    """`explicit`, else $STEMWORKS_CATALOG, else ./stemworks.duckdb. Empty strings count as unset
    (deployment variables that were not set arrive as '')."""
    return str(explicit or os.environ.get("STEMWORKS_CATALOG") or DEFAULT_FILE)


def catalog_data_path(explicit: str | None = None) -> str | None:
    """Where a DuckLake catalog's data files go: `explicit`, else $STEMWORKS_CATALOG_DATA_PATH, else None."""
    return explicit or os.environ.get("STEMWORKS_CATALOG_DATA_PATH") or None


def shown_location(location: str | os.PathLike[str]) -> str:
    """The location as run summaries and the Prefect UI show it: a DuckLake without its password."""
    return redact_location(str(location)) if is_ducklake(location) else str(location)


def describe(location: str | os.PathLike[str]) -> str:
    """How to show a location: a DuckLake without its password, a file as an absolute path."""
    text = str(location)
    return redact_location(text) if is_ducklake(text) else str(Path(text).resolve())


def open_catalog(
    location: str | os.PathLike[str] | None = None,
    data_path: str | None = None,
    *,
    busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
) -> Catalog:
    """The catalog at `location` (defaults as in `catalog_location`), created or upgraded if needed."""
    where = catalog_location(location)
    if is_ducklake(where):
        return DuckLakeCatalog(where, catalog_data_path(data_path), busy_timeout_s=busy_timeout_s)
    if data_path:
        raise CatalogError(
            f"--catalog-data-path is for DuckLake catalogs ('ducklake:postgres:...'); {where} is a DuckDB file: "
            f"drop the data path or pass a DuckLake location"
        )
    return Catalog(where, busy_timeout_s=busy_timeout_s)


def open_existing(location: str | os.PathLike[str] | None = None, data_path: str | None = None) -> Catalog:
    """A catalog that must already exist (query, export): a missing file or an empty lake is a CatalogError."""
    where = catalog_location(location)
    if is_ducklake(where):
        return DuckLakeCatalog(where, catalog_data_path(data_path), read_only=True)
    if not Path(where).exists():
        raise CatalogError(f"no catalog at {where}; pass --catalog PATH or set STEMWORKS_CATALOG")
    return Catalog(where)


def parse_ducklake(location: str, data_path: str | None = None) -> DuckLakeLocation:
    return DuckLakeLocation.parse(location, catalog_data_path(data_path))
