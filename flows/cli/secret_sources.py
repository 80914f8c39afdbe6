"""Sources that carry credentials reach the flow through a private file, never as flow parameters.

Prefect stores a flow run's parameters in its database and shows them in the UI and API. A signed URL
(`?X-Amz-Signature=...`, `?sig=...`) or `https://user:password@host/...` given on the command line is
therefore written to a file only this user can read, passed as `@PATH` (a source list), and the file is
removed when the run ends.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.io.locations import has_secret
from tasks.io.sources import LIST_PREFIX


@contextmanager
def secrets_out_of_band(sources: list[str]) -> Iterator[list[str]]:
    """`sources` with those carrying credentials replaced by one `@PATH` list (mode 0600) for the run's length."""
    secret = [source for source in sources if has_secret(source)]
    if not secret:
        yield sources
        return
    folder = Path(tempfile.mkdtemp(prefix="stemworks-sources-"))  # mode 0700
    listing = folder / "sources.txt"
    try:
        descriptor = os.open(listing, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8", errors="surrogateescape") as handle:
            handle.write("".join(f"{source}\n" for source in secret))
        yield [source for source in sources if not has_secret(source)] + [f"{LIST_PREFIX}{listing}"]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
