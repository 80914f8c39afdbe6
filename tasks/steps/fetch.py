"""Step `fetch`: copy a source into the track's work area, hashing the bytes on the way.

Every source is first held to the source policy (`tasks.io.web.policy.source_problem`). Local paths
(regular files only, opened without fsspec) and store URLs (s3://..., through fsspec) are copied here,
with a stall timeout on every read; http(s) URLs go to `tasks.io.web.urls`, which applies the network
policy and fetches pages through yt-dlp.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from tasks.core.errors import FetchError, InvalidAudioError
from tasks.core.records import FetchedSource
from tasks.core.settings import Limits
from tasks.io.faults import describe, is_transient
from tasks.io.hashcopy import copy_hashed_guarded, open_regular
from tasks.io.locations import normalise, raw_bytes_hex, redact
from tasks.io.storage import filesystem
from tasks.io.web.policy import check_source, is_local_source, is_url_source
from tasks.io.web.urls import fetch_url


def fetch(source: str, work_dir: str | Path, limits: Limits) -> FetchedSource:
    """Copy `source` to `work_dir`; the size limit is enforced while copying, not after.

    The source policy (`check_source`: schemes, no chained URLs) is applied first, before any connection.
    """
    check_source(source)
    if is_url_source(source):
        return fetch_url(source, work_dir, limits)
    return fetch_store(source, work_dir, limits)


def fetch_store(source: str, work_dir: str | Path, limits: Limits) -> FetchedSource:
    """Local files (regular files only, opened without fsspec) and store objects, with a stall timeout."""
    label = redact(source)
    target = Path(work_dir) / ("source" + _suffix(source))
    local = is_local_source(source)
    path = normalise(source) if local else source
    # A name that is not UTF-8 is shown escaped (`label`); its exact bytes travel in `origin`.
    raw = raw_bytes_hex(path) if local else None
    origin: dict[str, str | None] = {"path_bytes_hex": raw} if raw else {}

    def over_limit() -> InvalidAudioError:
        return InvalidAudioError(f"file is over the limit of {limits.max_file_bytes} bytes", source=label)

    def open_source() -> AbstractContextManager[Any]:
        if local:
            return open_regular(path)
        fs, key = filesystem(path)
        return fs.open(key, "rb")

    try:
        sha, size = copy_hashed_guarded(open_source, target, limits.max_file_bytes, over_limit)
    except InvalidAudioError:
        raise
    except Exception as exc:  # noqa: BLE001 - store clients raise their own types; classify them all
        transient = is_transient(exc)
        what = "transient error while reading" if transient else "cannot read source"
        raise FetchError(f"{what}: {describe(exc)}", source=label, retryable=transient) from None
    return FetchedSource(source=label, local_path=str(target), content_sha256=sha, size_bytes=size, origin=origin)


def _suffix(source: str) -> str:
    name = source.rsplit("/", 1)[-1].split("?", 1)[0]
    suffix = "".join(Path(name).suffixes[-2:]).lower()
    return suffix if len(suffix) <= 12 and suffix.replace(".", "").isalnum() else ""
