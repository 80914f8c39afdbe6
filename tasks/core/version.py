"""The code version recorded in manifests and the catalog."""

from __future__ import annotations

import functools
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        result = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    commit = _git_commit()
    ours = _package_version("stemworks") + (f"+g{commit}" if commit else "")
    return f"stemworks {ours}; demucs {_package_version('demucs')}; torch {_package_version('torch')}"
