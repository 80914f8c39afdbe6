"""The manifest: the one file that says a track's stems are published, and exactly which bytes they are.

Written last into a track's folder by `publish`; read by the skip check (is this job done?), by the
catalog when it records stems a dead run published, and by `catalog rebuild`. Readers trust only what
a complete manifest lists: every stem file present with its listed size.
"""

from __future__ import annotations

import json
from pathlib import PurePosixPath
from typing import Any

from pydantic import AwareDatetime, ConfigDict, Field

from tasks.core.errors import PublishError
from tasks.core.records import AudioInfo, PublishedStem, PublishedTrack, Record
from tasks.io.faults import describe, is_transient
from tasks.io.locations import join, redact
from tasks.io.storage import filesystem

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
# Hidden folder under an output location where local publishes are assembled before their rename.
STAGING_DIR = ".stemworks-staging"


class ManifestModel(Record):
    name: str
    signature: str


class ManifestStem(Record):
    stem: str
    file: str = Field(description="File name inside the track's folder.")
    sha256: str
    bytes: int
    seconds: float


class Manifest(Record):
    """`manifest.json`, version 1. Unknown keys (from newer writers) are ignored when reading."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    manifest_version: int = MANIFEST_VERSION
    job_key: str
    run_id: str
    created_at: AwareDatetime
    source: str
    origin: dict[str, str | None] = Field(default_factory=dict)
    content_sha256: str
    source_audio: AudioInfo
    model: ManifestModel
    device: str | None = None
    parameters: dict[str, Any]
    sample_rate: int
    seconds: float
    residual_db: float
    stems: list[ManifestStem]
    code_version: str

    def to_bytes(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True).encode()

    def published(self, uri: str) -> PublishedTrack:
        """The published track this manifest, found at `uri`, describes (addressed as publishing addressed it)."""
        folder = uri.rsplit("/", 1)[0]
        stems = [
            PublishedStem(
                stem=s.stem,
                uri=join(folder, s.file),
                sha256=s.sha256,
                seconds=s.seconds,
                bytes=s.bytes,
                format=PurePosixPath(s.file).suffix[1:],
            )
            for s in self.stems
        ]
        return PublishedTrack(manifest_uri=uri, track_uri=folder, stems=stems)


def manifest_uri(out: str, folder: str) -> str:
    return join(out, folder, MANIFEST_NAME)


def read_manifest(uri: str) -> Manifest:
    """Parse the manifest at `uri`; raises FileNotFoundError, ValueError (bad JSON or fields) or store errors."""
    fs, path = filesystem(uri)
    return Manifest.model_validate_json(fs.cat_file(path))


def complete_manifest(uri: str, job_key: str) -> Manifest | None:
    """The manifest at `uri` when it is for `job_key` and every stem it lists exists with its listed size.

    None when it is missing, unreadable, for another job or incomplete. A store that cannot be asked
    raises PublishError (retryable when transient) rather than answering "not there" and redoing work.
    """
    fs, path = filesystem(uri)
    try:
        manifest = Manifest.model_validate_json(fs.cat_file(path))
        folder = str(PurePosixPath(path).parent)
        complete = manifest.job_key == job_key and all(
            fs.size(f"{folder}/{stem.file}") == stem.bytes for stem in manifest.stems
        )
    except (FileNotFoundError, ValueError):  # pydantic's ValidationError is a ValueError
        return None
    except Exception as exc:  # noqa: BLE001 - e.g. the store is down: say so instead of redoing the work
        raise PublishError(
            f"cannot check {redact(uri)} for an earlier result: {describe(exc)}", retryable=is_transient(exc)
        ) from None
    return manifest if complete else None
