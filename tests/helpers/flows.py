"""Running the library flow from tests: its summary, whether or not some tracks failed."""

from __future__ import annotations

from typing import Any

from flows.library import library_summary, separate_library
from flows.pipeline.runs import LibrarySummary


def library_run(sources: list[str], **parameters: Any) -> LibrarySummary:
    """`separate_library(...)`'s summary; a run whose tracks failed (state `TracksFailed`) is summarised too."""
    return library_summary(separate_library(sources, return_state=True, **parameters))
