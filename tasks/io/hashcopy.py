"""Copy a byte stream to a file, hashing it and enforcing a size limit while copying, not after."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

CHUNK_BYTES = 1 << 20


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def copy_hashed(reader: Readable, target: Path, limit: int, over_limit: Callable[[], Exception]) -> tuple[str, int]:
    """Stream `reader` into `target`; return (sha256 hex, bytes).

    Raises `over_limit()` as soon as more than `limit` bytes have arrived, so a lying or missing
    size cannot fill the disk. On any error the partial `target` is removed.
    """
    digest, size = hashlib.sha256(), 0
    try:
        with open(target, "wb") as writer:
            while chunk := reader.read(CHUNK_BYTES):
                size += len(chunk)
                if size > limit:
                    raise over_limit()
                digest.update(chunk)
                writer.write(chunk)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return digest.hexdigest(), size
