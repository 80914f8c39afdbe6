"""What a UI user sees on a separate-library run: a progress bar and a table of tracks and stems."""

from __future__ import annotations

from typing import cast
from uuid import UUID

from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact

from flows.pipeline.runs import LibrarySummary

TABLE_KEY = "separate-library-tracks"

# Prefect's artifact functions are typed `UUID | Coroutine[..., UUID]` (async_dispatch); called from
# synchronous code, as here, they return the UUID itself.


class RunProgress:
    """A Prefect progress artifact advanced once per finished track (failed and skipped count too)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.artifact_id = cast(
            UUID,
            create_progress_artifact(progress=0.0 if total else 100.0, description=f"Tracks finished out of {total}"),
        )

    def track_done(self) -> None:
        self.tracks_done(1)

    def tracks_done(self, count: int) -> None:
        if count <= 0:
            return
        self.done += count
        update_progress_artifact(self.artifact_id, progress=round(100.0 * self.done / max(1, self.total), 2))


def track_rows(summary: LibrarySummary) -> list[dict[str, str]]:
    fanned_out = any(t.shard is not None for t in summary.tracks)
    return [
        {
            "source": t.source,
            "status": t.status,
            "stems": ", ".join(t.stems) if t.stems else ("already published" if t.status == "skipped" else ""),
            "manifest": t.manifest_uri or "",
            "error": t.error or "",
            # a fanned-out run also says which shard and which worker handled each track
            **({"shard": "" if t.shard is None else str(t.shard), "worker": t.worker or ""} if fanned_out else {}),
        }
        for t in summary.tracks
    ]


def publish_table(summary: LibrarySummary) -> UUID:
    succeeded, skipped, failed = summary.count("succeeded"), summary.count("skipped"), summary.count("failed")
    artifact_id = create_table_artifact(
        table=track_rows(summary),
        key=TABLE_KEY,
        description=f"Run {summary.run_id}: {succeeded} separated, {skipped} skipped (unchanged), {failed} failed; "
        f"stems under {summary.out}, catalog {summary.catalog}",
    )
    return cast(UUID, artifact_id)
