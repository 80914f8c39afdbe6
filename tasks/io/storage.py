"""fsspec: one way to open local folders and remote stores by location."""

from __future__ import annotations

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from tasks.io.locations import has_scheme, normalise

# Object stores are shared with other writers (and other runs): never answer from a stale listing.
_UNCACHED_LISTINGS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}


def filesystem(location: str) -> tuple[AbstractFileSystem, str]:
    location = normalise(location)
    scheme = location.split("://", 1)[0].lower() if has_scheme(location) else "file"
    options = {"use_listings_cache": False} if scheme in _UNCACHED_LISTINGS else {}
    fs, path = fsspec.core.url_to_fs(location, **options)
    return fs, path


def is_local(fs: AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)
