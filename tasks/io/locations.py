"""Addresses of files and objects: local paths and URLs, normalised, joined and shown without secrets.

A leaf module (no fsspec, no network): everything that names a location may use it.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

AUDIO_EXTENSIONS = frozenset(
    {
        ".wav",
        ".wave",
        ".flac",
        ".mp3",
        ".ogg",
        ".oga",
        ".opus",
        ".m4a",
        ".mp4",
        ".aac",
        ".aif",
        ".aiff",
    }
)
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_SECRET_QUERY = re.compile(r"(?i)(signature|token|key|secret|credential)")


def has_scheme(location: str) -> bool:
    return bool(_SCHEME.match(location))


def normalise(location: str) -> str:
    """Absolute local paths; URLs unchanged. `file://` URLs become plain paths."""
    location = location.removeprefix("file://")
    if has_scheme(location):
        return location.rstrip("/") if location.count("/") > 3 else location
    return str(Path(location).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    base = normalise(base)
    if has_scheme(base):
        return "/".join([base.rstrip("/"), *parts])
    return str(Path(base, *parts))


def redact(location: str) -> str:
    """Drop credentials (user:password@) and query strings that may carry signatures."""
    if not has_scheme(location):
        return location
    parts = urlsplit(location)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = "" if _SECRET_QUERY.search(parts.query) else parts.query
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def is_audio_name(name: str) -> bool:
    return Path(name).suffix.lower() in AUDIO_EXTENSIONS
