"""The `stemworks` command as a user runs it: a process of its own, the project on PYTHONPATH."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def stemworks(
    *args: str, env: Mapping[str, str], cwd: Path = ROOT, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """`python -m flows.cli ARGS` with `env` (plus PYTHONPATH=the checkout); output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=cwd,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        check=False,
        text=True,
        timeout=timeout,
    )
