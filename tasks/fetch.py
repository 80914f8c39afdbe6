"""Copy a source into the run's work area, hashing the bytes on the way.

Local paths and fsspec URLs (s3://...) are copied here; http(s) URLs go to `tasks.urls`, which
applies the network policy and fetches pages through yt-dlp.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tasks.errors import FetchError, ValidationError
from tasks.faults import describe, is_transient
from tasks.netsafety import is_url_source
from tasks.records import FetchedSource
from tasks.settings import Limits
from tasks.storage import filesystem, redact

CHUNK_BYTES = 1 << 20


def fetch(source: str, work_dir: str | Path, limits: Limits) -> FetchedSource:
    """Copy `source` to `work_dir`; the size limit is enforced while copying, not after."""
    if is_url_source(source):
        from tasks.urls import fetch_url  # yt-dlp is only imported when a URL is fetched

        return fetch_url(source, work_dir, limits)
    return fetch_store(source, work_dir, limits)


def fetch_store(source: str, work_dir: str | Path, limits: Limits) -> FetchedSource:
    label = redact(source)
    target = Path(work_dir) / ("source" + _suffix(source))
    digest = hashlib.sha256()
    size = 0
    try:
        fs, path = filesystem(source)
        with fs.open(path, "rb") as reader, open(target, "wb") as writer:
            while chunk := reader.read(CHUNK_BYTES):
                size += len(chunk)
                if size > limits.max_file_bytes:
                    raise ValidationError(f"file is over the limit of {limits.max_file_bytes} bytes",
                                          source=label)
                digest.update(chunk)
                writer.write(chunk)
    except ValidationError:
        target.unlink(missing_ok=True)
        raise
    except Exception as exc:  # noqa: BLE001 - store clients raise their own types; classify them all
        target.unlink(missing_ok=True)
        if is_transient(exc):
            raise FetchError(f"transient error while reading: {describe(exc)}", source=label, retryable=True) from None
        raise FetchError(f"cannot read source: {describe(exc)}", source=label, retryable=False) from None
    return FetchedSource(source=label, local_path=str(target), content_sha256=digest.hexdigest(), size_bytes=size)


def _suffix(source: str) -> str:
    name = source.rsplit("/", 1)[-1].split("?", 1)[0]
    suffix = "".join(Path(name).suffixes[-2:]).lower()
    return suffix if len(suffix) <= 12 and suffix.replace(".", "").isalnum() else ""
