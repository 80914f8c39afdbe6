"""Catalog errors, typed like the rest of the pipeline so flows can report the failing step."""

from __future__ import annotations

from tasks.core.errors import StemworksError


class CatalogError(StemworksError):
    """The catalog file or its contents do not allow the operation (unknown run, duplicate run, newer schema)."""

    step = "catalog"


class CatalogValidationError(CatalogError):
    """A record broke the catalog schema; the message names the table, column and check. Nothing was written."""


class CatalogBusyError(CatalogError):
    """Other processes kept the catalog file locked for longer than the wait allowed. Nothing was written."""

    default_retryable = True
