"""Step `fetch`: copy a source into the track's work area, hashing the bytes on the way.

Local paths and fsspec URLs (s3://...) are copied here; http(s) URLs go to `tasks.io.web.urls`,
which applies the network policy and fetches pages through yt-dlp.
"""

from __future__ import annotations

from pathlib import Path

from tasks.core.errors import FetchError, InvalidAudioError
from tasks.core.records import FetchedSource
from tasks.core.settings import Limits
from tasks.io.faults import describe, is_transient
from tasks.io.hashcopy import copy_hashed
from tasks.io.locations import redact
from tasks.io.storage import filesystem
from tasks.io.web.policy import is_url_source
from tasks.io.web.urls import fetch_url


def fetch(source: str, work_dir: str | Path, limits: Limits) -> FetchedSource:
    """Copy `source` to `work_dir`; the size limit is enforced while copying, not after."""
    if is_url_source(source):
        return fetch_url(source, work_dir, limits)
    return fetch_store(source, work_dir, limits)


def fetch_store(source: str, work_dir: str | Path, limits: Limits) -> FetchedSource:
    label = redact(source)
    target = Path(work_dir) / ("source" + _suffix(source))

    def over_limit() -> InvalidAudioError:
        return InvalidAudioError(f"file is over the limit of {limits.max_file_bytes} bytes", source=label)

    try:
        fs, path = filesystem(source)
        with fs.open(path, "rb") as reader:
            sha, size = copy_hashed(reader, target, limits.max_file_bytes, over_limit)
    except InvalidAudioError:
        raise
    except Exception as exc:  # noqa: BLE001 - store clients raise their own types; classify them all
        transient = is_transient(exc)
        what = "transient error while reading" if transient else "cannot read source"
        raise FetchError(f"{what}: {describe(exc)}", source=label, retryable=transient) from None
    return FetchedSource(source=label, local_path=str(target), content_sha256=sha, size_bytes=size)


def _suffix(source: str) -> str:
    name = source.rsplit("/", 1)[-1].split("?", 1)[0]
    suffix = "".join(Path(name).suffixes[-2:]).lower()
    return suffix if len(suffix) <= 12 and suffix.replace(".", "").isalnum() else ""
