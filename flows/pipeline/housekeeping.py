"""Housekeeping: clear what dead runs left behind, and apply retention to published outputs.

What a run leaves when its process dies (SIGKILL, power loss, OOM):
- staging folders under `<out>/.stemworks-staging/` (a publish that never got to its rename);
- job claims under `<out>/.stemworks-claims/` (they lapse on their own, but are clutter);
- its folder under the work root (decoded audio and raw stems, often hundreds of MB);
- its catalog row, `running` forever.

Each is tied to a process (host, pid, start time), so it is removed as soon as that process is known to
be gone; something whose process cannot be checked from here (another host, an older layout) is removed
once it is older than `stale_after_hours`. Retention (`superseded`, `older_than_days`) is opt-in, and
`dry_run` lists everything that would go without touching anything.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import Field

from catalog import Catalog
from flows.pipeline.workarea import PREFECT_SCRATCH, read_run_area
from tasks.core.records import Record, Removal
from tasks.core.settings import Retention
from tasks.io.claims import CLAIMS_DIR, read_claims, remove_claim_file
from tasks.io.locations import redact
from tasks.io.manifest import MANIFEST_NAME, STAGING_DIR, Manifest, manifest_uri
from tasks.io.processes import alive_since
from tasks.io.storage import filesystem, is_local
from tasks.steps.publish import staging_owner

CleanKind = Literal["staging", "claim", "work", "scratch", "run", "superseded", "expired"]
# `stemworks-prefect-<pid>@<host>.<random>`: the temporary Prefect database of a CLI run (workarea).
_SCRATCH_NAME = re.compile(rf"^{PREFECT_SCRATCH}(?P<pid>\d+)@(?P<host>.+)\.[^.]+$")


class CleanItem(Record):
    kind: CleanKind
    location: str
    reason: str
    bytes: int | None = None


class CleanReport(Record):
    """What was removed (or, in a dry run, would be), and what was left alone and why."""

    dry_run: bool
    removed: list[CleanItem] = Field(default_factory=list)
    kept: list[CleanItem] = Field(default_factory=list)

    def total_bytes(self) -> int:
        return sum(item.bytes or 0 for item in self.removed)


def _age_hours(path: Path) -> float:
    try:
        return (time.time() - path.stat().st_mtime) / 3600
    except OSError:
        return 0.0


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for child in path.rglob("*"):
        with contextlib.suppress(OSError):
            if child.is_file() and not child.is_symlink():
                total += child.stat().st_size
    return total


def _owner_gone(host: str, pid: int, made_at: float) -> bool | None:
    """Is the process that made something at `made_at` gone? None when it ran on another host."""
    alive = alive_since(host, pid, made_at)
    return None if alive is None else not alive


def stale_staging(out: str, stale_after_hours: float) -> Iterator[CleanItem]:
    fs, root = filesystem(out)
    if not is_local(fs):
        return  # object stores publish object by object, without a staging folder
    folder = Path(root) / STAGING_DIR
    if not folder.is_dir():
        return
    for entry in sorted(folder.iterdir()):
        owner = staging_owner(entry.name)
        gone = _owner_gone(*owner, entry.stat().st_mtime) if owner else None
        if owner and gone:
            yield CleanItem(kind="staging", location=str(entry), reason=f"its publisher (pid {owner[1]}) is gone")
        elif gone is None and _age_hours(entry) > stale_after_hours:
            yield CleanItem(kind="staging", location=str(entry), reason=f"older than {stale_after_hours:g} h")


def stale_claims(out: str, stale_after_hours: float) -> Iterator[CleanItem]:
    for path, holder in read_claims(out):
        if holder is None:
            yield CleanItem(kind="claim", location=path, reason="unreadable claim")
        elif holder.dead():
            yield CleanItem(kind="claim", location=path, reason=f"its process ({holder.process.describe()}) is gone")
        elif holder.expired():
            yield CleanItem(
                kind="claim", location=path, reason=f"lease ran out at {holder.expires_at:%Y-%m-%d %H:%M} UTC"
            )
    fs, root = filesystem(out)
    if is_local(fs):  # half-written claims of a process killed mid-write
        for leftover in (Path(root) / CLAIMS_DIR).glob(".*.json.*"):
            if _age_hours(leftover) > stale_after_hours:
                yield CleanItem(kind="claim", location=str(leftover), reason="temporary file of a dead writer")


def stale_work(work_root: str, stale_after_hours: float) -> Iterator[CleanItem]:
    root = Path(work_root)
    if not root.is_dir():
        return
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        area = read_run_area(folder)
        alive = area.process.alive() if area else None
        if alive is False:
            assert area is not None
            yield CleanItem(
                kind="work",
                location=str(folder),
                reason=f"run {area.run_id}'s process ({area.process.describe()}) is gone",
            )
        elif alive is None and _age_hours(folder) > stale_after_hours:
            where = f"ran on {area.process.hostname}" if area else "no run marker"
            yield CleanItem(kind="work", location=str(folder), reason=f"{where}; older than {stale_after_hours:g} h")


def stale_prefect_scratch(temp_root: str) -> Iterator[CleanItem]:
    """Temporary Prefect databases of CLI runs that were killed (a run that ends removes its own)."""
    root = Path(temp_root)
    if not root.is_dir():
        return
    for entry in sorted(root.glob(f"{PREFECT_SCRATCH}*")):
        match = _SCRATCH_NAME.match(entry.name)
        if match and entry.is_dir() and _owner_gone(match["host"], int(match["pid"]), entry.stat().st_mtime):
            yield CleanItem(kind="scratch", location=str(entry), reason=f"Prefect database of dead pid {match['pid']}")


def dead_runs(catalog: Catalog) -> tuple[list[CleanItem], list[CleanItem]]:
    """Runs the catalog holds as `running`: (those whose process is gone, those left alone with the reason)."""
    dead: list[CleanItem] = []
    kept: list[CleanItem] = []
    for run in catalog.running_runs():
        if run.pid is None:
            kept.append(CleanItem(kind="run", location=run.run_id, reason="no process recorded for it"))
            continue
        alive = alive_since(run.hostname, run.pid, run.started_at.timestamp())
        if alive is None:
            kept.append(
                CleanItem(kind="run", location=run.run_id, reason=f"runs on {run.hostname}: clean there to check it")
            )
        elif alive:
            kept.append(CleanItem(kind="run", location=run.run_id, reason=f"still running (pid {run.pid})"))
        else:
            dead.append(
                CleanItem(
                    kind="run", location=run.run_id, reason=f"its process (pid {run.pid} on {run.hostname}) is gone"
                )
            )
    return dead, kept


def published_manifests(out: str) -> list[tuple[str, Manifest]]:
    """Every readable manifest one level under `out` (each track's folder), as (uri, manifest)."""
    fs, root = filesystem(out)
    found: list[tuple[str, Manifest]] = []
    try:
        paths = fs.glob(f"{root.rstrip('/')}/*/{MANIFEST_NAME}")
    except FileNotFoundError:
        return []
    for path in sorted(str(p) for p in paths):
        folder = PurePosixPath(path).parent.name
        if folder.startswith("."):
            continue
        with contextlib.suppress(FileNotFoundError, ValueError):
            found.append((manifest_uri(out, folder), Manifest.model_validate_json(fs.cat_file(path))))
    return found


def retention_items(out: str, retention: Retention, now: datetime) -> Iterator[tuple[CleanItem, Manifest]]:
    manifests = published_manifests(out)
    newest: dict[str, tuple[str, Manifest]] = {}
    for uri, manifest in manifests:
        best = newest.get(manifest.content_sha256)
        if best is None or manifest.created_at > best[1].created_at:
            newest[manifest.content_sha256] = (uri, manifest)
    for uri, manifest in manifests:
        latest_uri, latest = newest[manifest.content_sha256]
        if retention.superseded and latest.job_key != manifest.job_key:
            reason = f"superseded by {redact(latest_uri)} ({latest.model.name}, {latest.created_at:%Y-%m-%d %H:%M} UTC)"
            yield CleanItem(kind="superseded", location=uri, reason=reason), manifest
        elif retention.older_than_days is not None and manifest.created_at < now - timedelta(
            days=retention.older_than_days
        ):
            reason = f"published {manifest.created_at:%Y-%m-%d}, older than {retention.older_than_days:g} days"
            yield CleanItem(kind="expired", location=uri, reason=reason), manifest


def remove_output(manifest_uri: str, manifest: Manifest) -> None:
    """The manifest first (from then on nothing vouches for the stems), then the stems, then the folder."""
    fs, path = filesystem(manifest_uri)
    folder = str(PurePosixPath(path).parent)
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)
    for stem in manifest.stems:
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(f"{folder}/{stem.file}")
    if is_local(fs):
        shutil.rmtree(folder, ignore_errors=True)


def _remove_path(location: str) -> None:
    path = Path(location)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean(
    *,
    out: str | None,
    work_root: str | None,
    catalog: Catalog | None,
    retention: Retention,
    stale_after_hours: float,
    dry_run: bool,
) -> CleanReport:
    """Find (and unless `dry_run`, remove) stale leftovers and, when asked, outputs past retention."""
    now = datetime.now(UTC)
    report = CleanReport(dry_run=dry_run)
    removed, kept = report.removed, report.kept
    for item in stale_prefect_scratch(tempfile.gettempdir()):
        removed.append(item.model_copy(update={"bytes": _size(Path(item.location))}))
        if not dry_run:
            _remove_path(item.location)
    if work_root:
        for item in stale_work(work_root, stale_after_hours):
            removed.append(item.model_copy(update={"bytes": _size(Path(item.location))}))
            if not dry_run:
                _remove_path(item.location)
    if out:
        for item in stale_staging(out, stale_after_hours):
            removed.append(item.model_copy(update={"bytes": _size(Path(item.location))}))
            if not dry_run:
                _remove_path(item.location)
        for item in stale_claims(out, stale_after_hours):
            removed.append(item)
            if not dry_run:
                remove_claim_file(out, item.location)
        for item, manifest in retention_items(out, retention, now):
            removed.append(item.model_copy(update={"bytes": sum(s.bytes for s in manifest.stems)}))
            if dry_run:
                continue
            remove_output(item.location, manifest)
            if catalog is not None:
                catalog.record_removal(
                    Removal(
                        manifest_uri=item.location,
                        job_key=manifest.job_key,
                        content_sha256=manifest.content_sha256,
                        reason=item.reason,
                        removed_at=datetime.now(UTC),
                        hostname=socket.gethostname(),
                    )
                )
    if catalog is not None:
        dead, alive = dead_runs(catalog)
        kept.extend(alive)
        for item in dead:
            removed.append(item)
            if not dry_run:
                catalog.close_unfinished_run(item.location, datetime.now(UTC), "crashed")
    return report
