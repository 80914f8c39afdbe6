"""Where runs keep their intermediate files (decoded audio, raw stems) before publishing."""

from __future__ import annotations

import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from pydantic import AwareDatetime

from tasks.core.records import Record
from tasks.io.processes import ProcessStamp


def default_work_root() -> str:
    """`STEMWORKS_WORK_DIR`, else a folder in the system temp dir. Each track's files are removed after it."""
    return os.environ.get("STEMWORKS_WORK_DIR") or str(Path(tempfile.gettempdir()) / "stemworks-work")


# A CLI run without a Prefect server gives its temporary server a database in a folder of the system temp
# folder named after the process, so that `stemworks clean` can remove the folder of one that was killed.
PREFECT_SCRATCH = "stemworks-prefect-"


def prefect_scratch_prefix() -> str:
    """`stemworks-prefect-<pid>@<host>.` (tempfile adds a random suffix)."""
    me = ProcessStamp.current()
    return f"{PREFECT_SCRATCH}{me.pid}@{me.hostname}."


# Written into each run's folder under the work root: `stemworks clean` removes the folder of a run whose
# process is gone (the work root is shared by runs of every catalog, so the catalog cannot say).
RUN_MARKER = "run.json"


class RunArea(Record):
    """`<work root>/<run id>/run.json`: which process works in this folder."""

    run_id: str
    process: ProcessStamp
    started_at: AwareDatetime


def open_run_area(work_root: str, run_id: str) -> Path:
    """Create the run's folder under the work root, marked with this process."""
    folder = Path(work_root) / run_id
    folder.mkdir(parents=True, exist_ok=True)
    marker = RunArea(run_id=run_id, process=ProcessStamp.current(), started_at=datetime.now(UTC))
    (folder / RUN_MARKER).write_text(marker.model_dump_json(indent=1))
    return folder


def read_run_area(folder: Path) -> RunArea | None:
    try:
        return RunArea.model_validate_json((folder / RUN_MARKER).read_bytes())
    except (OSError, ValueError):
        return None


def close_run_area(work_root: str, run_id: str) -> None:
    shutil.rmtree(Path(work_root) / run_id, ignore_errors=True)
