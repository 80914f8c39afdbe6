"""Addresses of files and objects: local paths and URLs, normalised, joined and shown without secrets.

A leaf module (no fsspec, no network): everything that names a location may use it.
"""

from __future__ import annotations

import os
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
# Query parameter names that carry credentials: presigned S3/GCS/Azure URLs (X-Amz-Signature, sig, se/sp with
# sig), API tokens and keys, passwords. A query holding any of them is dropped whole when shown or stored.
_SECRET_QUERY = re.compile(
    r"(?i)(^|[&;])[^=&;]*(sig|signature|token|key|secret|credential|pass|pwd|auth|session|policy|x-amz-|x-goog-)"
    r"[^=&;]*="
)


def has_scheme(location: str) -> bool:
    return bool(_SCHEME.match(location))


def normalise(location: str) -> str:
    """Absolute local paths; URLs unchanged. `file://` URLs become plain paths."""
    location = location.removeprefix("file://")
    if has_scheme(location):
        return location.rstrip("/") if location.count("/") > 3 else location
    path = Path(location).expanduser()
    try:
        return str(path.resolve())
    except RuntimeError:  # a symbolic link loop (Python < 3.13 raises here): opening the path will say so
        return os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    base = normalise(base)
    if has_scheme(base):
        return "/".join([base.rstrip("/"), *parts])
    return str(Path(base, *parts))


def redact(location: str) -> str:
    """How a location is shown and stored: credentials (user:password@) and query strings that may carry
    signatures dropped, and bytes that are not UTF-8 escaped (`display_text`)."""
    location = display_text(location)
    if not has_scheme(location):
        return location
    parts = urlsplit(location)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = "" if _SECRET_QUERY.search(parts.query) else parts.query
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def has_secret(location: str) -> bool:
    """Whether `location` carries credentials (user:password@ or a secret query) that `redact` would drop."""
    if not has_scheme(location):
        return False
    parts = urlsplit(location)
    return "@" in parts.netloc or bool(_SECRET_QUERY.search(parts.query))


def _has_surrogates(text: str) -> bool:
    return not text.isascii() and any("\ud800" <= ch <= "\udfff" for ch in text)


def display_text(text: str) -> str:
    """`text` as valid UTF-8, for people, logs, manifests and the catalog.

    A file name is any byte string on Linux; Python hands over the bytes that are not UTF-8 as
    surrogate escapes, which no JSON or DuckDB string can hold. They are shown the way Python's
    `backslashreplace` shows them: b"caf\\xe9.wav" becomes `caf\\xe9.wav`. The exact bytes are kept
    apart (`raw_bytes_hex`, in a track's `origin`).
    """
    if not _has_surrogates(text):
        return text
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # lone surrogates that are not escaped bytes
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def raw_bytes_hex(text: str) -> str | None:
    """The exact bytes of a name holding bytes that are not UTF-8, in hex; None for ordinary text."""
    if not _has_surrogates(text):
        return None
    try:
        return text.encode("utf-8", "surrogateescape").hex()
    except UnicodeEncodeError:  # lone surrogates that are not escaped bytes: kept as Python holds them
        return text.encode("utf-8", "surrogatepass").hex()


_GLOB_CHARS = re.compile(r"[*?\[]")


def is_glob(location: str) -> bool:
    """Whether `location` is a pattern (`*`, `?` or `[`) to be expanded rather than a name."""
    return bool(_GLOB_CHARS.search(location))


def is_audio_name(name: str) -> bool:
    return Path(name).suffix.lower() in AUDIO_EXTENSIONS
