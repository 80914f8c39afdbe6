"""Copy a byte stream to a file, hashing it and enforcing a size limit while copying, not after.

Reading a source must never hang a run: only regular files are opened (a FIFO or a device can block
`open()` or `read()` forever, and no timer in the same thread can interrupt that), and
`copy_hashed_guarded` opens and reads in a helper thread, giving up when no data arrives for
`READ_STALL_TIMEOUT_S`.
"""

from __future__ import annotations

import hashlib
import os
import queue
import stat
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import BinaryIO, Protocol

from tasks.io.faults import NotRegularFileError

CHUNK_BYTES = 1 << 20
# Opening a source, or any one read from it, that delivers nothing for this long fails the fetch
# attempt as transient (a hung network mount, a stalled store); the fetch task's retries then apply.
READ_STALL_TIMEOUT_S = 60.0
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # absent on Windows, which has no FIFOs to block on
_READ_AHEAD_CHUNKS = 4  # at most this many chunks wait in memory between the reading thread and the copy
_FILE_KINDS = (
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISDIR, "directory"),
)


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


def copy_hashed_guarded(
    open_reader: Callable[[], AbstractContextManager[Readable]],
    target: Path,
    limit: int,
    over_limit: Callable[[], Exception],
    *,
    stall_s: float = READ_STALL_TIMEOUT_S,
) -> tuple[str, int]:
    """`copy_hashed` from the reader `open_reader()` gives, opened and read in a helper thread.

    Raises TimeoutError (transient) when the open or a read delivers nothing for `stall_s`. The helper
    thread is a daemon: one stuck in the kernel is left behind (and ends with the process), never waited for.
    """
    chunks = _ReadAhead(open_reader, stall_s)
    try:
        return copy_hashed(chunks, target, limit, over_limit)
    finally:
        chunks.stop()


class _ReadAhead:
    """Chunks read by a daemon thread, handed over through a small queue; `read` waits at most `stall_s`."""

    def __init__(self, open_reader: Callable[[], AbstractContextManager[Readable]], stall_s: float) -> None:
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=_READ_AHEAD_CHUNKS)
        self._stopped = threading.Event()
        self._stall_s = stall_s
        self._finished = False
        thread = threading.Thread(target=self._run, args=(open_reader,), name="stemworks-read", daemon=True)
        thread.start()

    def _run(self, open_reader: Callable[[], AbstractContextManager[Readable]]) -> None:
        try:
            with open_reader() as reader:
                while True:
                    chunk = reader.read(CHUNK_BYTES)
                    if not self._hand_over(chunk) or not chunk:
                        return
        except BaseException as exc:  # noqa: BLE001 - handed to the copying thread, which raises it
            self._hand_over(exc)

    def _hand_over(self, item: bytes | BaseException) -> bool:
        """Queue `item`; False once the copy has given up (then nobody will take it)."""
        while not self._stopped.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def read(self, size: int = -1, /) -> bytes:
        if self._finished:
            return b""
        try:
            item = self._queue.get(timeout=self._stall_s)
        except queue.Empty:
            raise TimeoutError(f"no data from the source for {self._stall_s:g} s") from None
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        self._finished = not item
        return item

    def stop(self) -> None:
        self._stopped.set()


def file_kind(mode: int) -> str | None:
    """What a non-regular file is ("FIFO", "socket"...), or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _FILE_KINDS if test(mode)), "special file")


def require_regular(path: str | Path) -> None:
    """Raise NotRegularFileError unless `path` (links followed) is a regular file; never opens it."""
    kind = file_kind(os.stat(path).st_mode)
    if kind is not None:
        raise NotRegularFileError(f"not a regular file ({kind})")


def open_regular(path: str | Path) -> BinaryIO:
    """Open a regular file for reading, refusing FIFOs, devices and sockets without ever blocking.

    Checked before opening (a device is never opened), and again on the opened descriptor: opening
    with O_NONBLOCK returns at once even on a FIFO without a writer, so a file swapped for a FIFO
    in between is refused too.
    """
    require_regular(path)
    fd = os.open(path, os.O_RDONLY | _O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        kind = file_kind(os.fstat(fd).st_mode)
        if kind is not None:
            raise NotRegularFileError(f"not a regular file ({kind})")
        if _O_NONBLOCK:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
