"""Where runs keep their intermediate files (decoded audio, raw stems) before publishing."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def default_work_root() -> str:
    """`STEMWORKS_WORK_DIR`, else a folder in the system temp dir. Each track's files are removed after it."""
    return os.environ.get("STEMWORKS_WORK_DIR") or str(Path(tempfile.gettempdir()) / "stemworks-work")
