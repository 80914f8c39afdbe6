"""The catalog of runs, tracks and stems: a DuckDB file, or a DuckLake every host shares
(`catalog.backend.open_catalog`). Importing it does nothing but define names."""

from __future__ import annotations

from catalog.errors import CatalogError, CatalogValidationError
from catalog.store import Catalog

__all__ = ["Catalog", "CatalogError", "CatalogValidationError"]
