"""DuckDB catalog of runs, tracks and stems. Importing it does nothing but define names."""

from __future__ import annotations

import os
from pathlib import Path

from catalog.errors import CatalogError, CatalogValidationError
from catalog.store import Catalog

__all__ = ["Catalog", "CatalogError", "CatalogValidationError", "default_catalog_path"]


def default_catalog_path() -> Path:
    """$STEMWORKS_CATALOG if set, else ./stemworks.duckdb (relative to the working directory)."""
    return Path(os.environ.get("STEMWORKS_CATALOG") or "stemworks.duckdb")
