"""Step `publish`: encode stems and publish a track's folder atomically: stems first, `manifest.json` last.

Readers trust only what a manifest lists. On local disk the whole folder appears at once
(a directory rename); on object stores each object is written whole and the manifest goes last.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import unicodedata
import uuid
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from fsspec import AbstractFileSystem

from tasks.core.errors import PublishError
from tasks.core.records import AudioInfo, FetchedSource, PublishedTrack, SeparatedStems, TrackQuality
from tasks.core.settings import OutputSettings, SeparationSettings
from tasks.core.version import code_version
from tasks.io.faults import describe, is_transient
from tasks.io.locations import join, redact
from tasks.io.manifest import (
    MANIFEST_NAME,
    STAGING_DIR,
    Manifest,
    ManifestModel,
    ManifestStem,
    complete_manifest,
    manifest_uri,
)
from tasks.io.npyfile import NpyAudio
from tasks.io.processes import ProcessStamp
from tasks.io.storage import filesystem, is_local
from tasks.steps.encode import encode, extension

NAME_LIMIT = 80
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
_UNSAFE = re.compile(r"[^\w .()&+,'!\-\u2013\u2014]+")  # also keeps en and em dashes


class AlreadyPublishedError(PublishError):
    """The track's folder already holds a complete result for this job: it is kept, never replaced."""

    def __init__(self, reason: str, *, manifest_uri: str, source: str | None = None) -> None:
        super().__init__(reason, source=source, retryable=False)
        self.manifest_uri = manifest_uri

    def __reduce__(self) -> tuple[object, ...]:
        return (_already_published, (self.reason, self.manifest_uri, self.source))


def _already_published(reason: str, manifest_uri: str, source: str | None) -> AlreadyPublishedError:
    return AlreadyPublishedError(reason, manifest_uri=manifest_uri, source=source)


# `<pid>@<host>.<32 hex>`, plus `-stale` for a folder set aside during a swap.
_STAGING_NAME = re.compile(r"^(?P<pid>\d+)@(?P<host>.+)\.[0-9a-f]{32}(-stale)?$")


def staging_name() -> str:
    """`<pid>@<host>.<random>`: `stemworks clean` can tell a dead publisher's leftovers from a live one's."""
    me = ProcessStamp.current()
    return f"{me.pid}@{me.hostname}.{uuid.uuid4().hex}"


def staging_owner(name: str) -> tuple[str, int] | None:
    """(host, pid) of the process that made the staging entry `name`; None for a name it did not make."""
    match = _STAGING_NAME.match(name)
    return (match["host"], int(match["pid"])) if match else None


def safe_name(text: str) -> str:
    """A file-system-safe, readable name: no separators, control characters, `..` or reserved names."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(ch for ch in text if unicodedata.category(ch)[0] != "C")
    text = _UNSAFE.sub("_", text).strip(" .")
    text = re.sub(r"\.{2,}", ".", text)[:NAME_LIMIT].strip(" .")
    if not text or text.split(".")[0].lower() in _WINDOWS_RESERVED:
        text = f"track_{text}" if text else "track"
    return text


def track_folder(source: str, key: str, title: str | None = None) -> str:
    """Readable name plus the job key's prefix: same-named files from different folders never collide.

    `title` (a URL source's page title, untrusted) is preferred over the file name; both are
    sanitised by `safe_name`, and the key prefix keeps equal titles apart.
    """
    if title and title.strip():
        return f"{safe_name(title)}-{key[:12]}"
    name = PurePosixPath(source.split("?", 1)[0].rstrip("/")).name
    for suffix in (".stem.mp4", ".stem.m4a"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    else:
        name = PurePosixPath(name).stem
    return f"{safe_name(name)}-{key[:12]}"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def encode_stems(separated: SeparatedStems, output: OutputSettings, work_dir: str | Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for stem, npy in separated.paths.items():
        target = Path(work_dir) / f"{stem}.{extension(output)}"
        with NpyAudio(npy) as samples:  # read window by window: memory does not grow with length
            encode(samples, separated.sample_rate, target, output)
        files[stem] = target
    return files


def build_manifest(
    *,
    key: str,
    run_id: str,
    fetched: FetchedSource,
    info: AudioInfo,
    separated: SeparatedStems,
    quality: TrackQuality,
    separation: SeparationSettings,
    output: OutputSettings,
    files: dict[str, Path],
) -> Manifest:
    seconds = separated.frames / separated.sample_rate
    return Manifest(
        job_key=key,
        run_id=run_id,
        created_at=datetime.now(UTC),
        source=fetched.source,
        origin=fetched.origin,
        content_sha256=fetched.content_sha256,
        source_audio=info,
        model=ManifestModel(name=separated.model.name, signature=separated.model.signature),
        device=separated.device,
        parameters={
            "separation": separation.model_dump(exclude={"model_repo", "device"}),
            "output": output.model_dump(exclude={"out"}),
        },
        sample_rate=separated.sample_rate,
        seconds=seconds,
        residual_db=quality.residual_db,
        stems=[
            ManifestStem(
                stem=stem, file=path.name, sha256=_file_sha256(path), bytes=path.stat().st_size, seconds=seconds
            )
            for stem, path in files.items()
        ],
        code_version=code_version(),
    )


def publish(*, out: str, folder: str, manifest: Manifest, files: dict[str, Path]) -> PublishedTrack:
    """Publish `files` and their manifest as `folder` under `out`; a complete result already there is kept.

    Claims keep two runs from working on one job; should a claim have lapsed (a stalled host), the first
    complete result stays and the catalog rows of the other run never describe bytes that were replaced.
    """
    target = manifest_uri(out, folder)
    existing = complete_manifest(target, manifest.job_key)
    if existing is not None:
        raise AlreadyPublishedError(
            f"run {existing.run_id} published it first", manifest_uri=target, source=manifest.source
        )
    fs, root = filesystem(out)
    try:
        if is_local(fs):
            _publish_local(Path(root), folder, manifest, files)
        else:
            _publish_remote(fs, f"{root}/{folder}", manifest, files)
    except Exception as exc:  # noqa: BLE001 - store clients raise their own types; classify them all
        raise PublishError(
            f"writing to {redact(join(out, folder))} failed: {describe(exc)}",
            source=manifest.source,
            retryable=is_transient(exc),
        ) from None
    return manifest.published(manifest_uri(out, folder))


def _publish_local(root: Path, folder: str, manifest: Manifest, files: dict[str, Path]) -> None:
    staging = root / STAGING_DIR / staging_name()
    staging.mkdir(parents=True)
    try:
        for path in files.values():
            shutil.copyfile(path, staging / path.name)
        (staging / MANIFEST_NAME).write_bytes(manifest.to_bytes())
        final = root / folder
        if final.exists():  # an incomplete earlier attempt: set it aside, then swap in the new folder
            stale = root / STAGING_DIR / f"{staging_name()}-stale"
            final.rename(stale)
            staging.rename(final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish_remote(fs: AbstractFileSystem, folder: str, manifest: Manifest, files: dict[str, Path]) -> None:
    manifest_path = f"{folder}/{MANIFEST_NAME}"
    abort_incomplete_uploads(fs, folder)  # left by an attempt that died mid-upload
    if fs.exists(manifest_path):  # stale manifest must not vouch for objects we are about to replace
        fs.rm_file(manifest_path)
    written: list[str] = []
    try:
        for path in files.values():
            fs.put_file(str(path), f"{folder}/{path.name}")
            written.append(f"{folder}/{path.name}")
        fs.pipe_file(manifest_path, manifest.to_bytes())
    except BaseException:
        _withdraw(fs, manifest_path, written)
        abort_incomplete_uploads(fs, folder, quiet=True)
        raise


def abort_incomplete_uploads(fs: AbstractFileSystem, folder: str, quiet: bool = False) -> int:
    """Abort S3 multipart uploads under `folder` (they cost storage and are invisible to listings).

    Returns how many were aborted. Stores without multipart uploads have nothing to abort.
    """
    call = getattr(fs, "call_s3", None)
    if call is None:
        return 0
    bucket, _, prefix = folder.partition("/")
    try:
        uploads = call("list_multipart_uploads", Bucket=bucket, Prefix=f"{prefix}/").get("Uploads") or []
        for upload in uploads:
            call("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    except Exception:  # a cleanup during an outage may fail too; the next attempt retries it
        if quiet:
            return 0
        raise
    return len(uploads)


def _withdraw(fs: AbstractFileSystem, manifest_path: str, written: list[str]) -> None:
    """Best effort after a failed attempt: objects without a manifest are invisible, but need not linger.

    The manifest goes first: a write that timed out may still have landed, and stems are only
    removed once no manifest can vouch for them.
    """
    try:
        if fs.exists(manifest_path):
            fs.rm_file(manifest_path)
    except Exception:  # noqa: BLE001 - the store may be the thing that failed; keep the stems then
        return
    for path in written:
        try:
            fs.rm_file(path)
        except Exception:  # noqa: BLE001 - best effort, as above; an orphan stem is harmless without a manifest
            continue
