"""Hostile inputs for tests: a loopback listener that counts connections, FIFO helpers, a decompression bomb.

Calls that could block forever run in daemon threads with a deadline (`bounded`), so a regression fails a test
instead of hanging the suite.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tests.helpers.audiogen import write_audio

SR = 44100
BLOCKED_S = 30.0  # far beyond what any call under test needs; only a call that blocks gets near it


class CountingListener:
    """A plain TCP server on 127.0.0.1 that counts every connection reaching it and closes it at once."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.05)
        self.port = self.server.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:  # the accept timeout: look at the stop flag again
                continue
            self.connections += 1
            conn.close()

    def close(self) -> int:
        """Stop serving, count connections still queued in the backlog; the total that ever arrived."""
        if self._stop.is_set():
            return self.connections
        self._stop.set()
        self._thread.join(10)
        self.server.setblocking(False)
        while True:
            try:
                conn, _ = self.server.accept()
            except BlockingIOError:
                break
            self.connections += 1
            conn.close()
        self.server.close()
        return self.connections


def bounded(call: Callable[[], Any], timeout: float = BLOCKED_S) -> Any:
    """Run `call` in a daemon thread; fail (not hang) if it is still blocked after `timeout`.

    Returns what it returned, or the exception it raised."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            outcome["value"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still blocked after {timeout:g} s"
    return outcome["value"]


def release_fifo(path: Path) -> None:
    """Unblock a reader stuck opening `path` (only a regression leaves one): open it for writing, close it."""
    with contextlib.suppress(OSError):  # no reader waiting: nothing to release
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def hidden_length_flac(path: Path, seconds: float) -> Path:
    """FLAC of silence whose STREAMINFO hides its length (total samples 0 means "unknown")."""
    write_audio(path, np.zeros((2, int(seconds * SR)), np.float32), SR, "flac")
    data = bytearray(path.read_bytes())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO comes first
    # STREAMINFO bytes 10..17: sample rate (20 bits), channels (3), bits per sample (5), total samples (36).
    fields = int.from_bytes(data[18:26], "big")
    data[18:26] = (fields & ~((1 << 36) - 1)).to_bytes(8, "big")
    path.write_bytes(bytes(data))
    return path
