"""Windowed access to (channels, frames) float32 `.npy` files: audio on disk, never whole in memory.

Reads and writes go through positional file I/O (`os.pread`/`os.pwrite`) rather than `np.memmap`:
pages touched through a mapping count towards the process's resident set until the kernel
reclaims them, so a memory map of a one-hour stem would look like gigabytes of RSS. Positional
I/O keeps resident memory at the size of the window being worked on. The files stay ordinary
`.npy` files that `np.load` reads.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import Self

import numpy as np

DTYPE = np.dtype("<f4")
HEADER_BYTES = 128  # fixed, so the header can be rewritten in place once the length is known
_COPY_BYTES = 1 << 22


def header(channels: int, frames: int) -> bytes:
    """A version 1.0 `.npy` header for C-ordered float32 (channels, frames), padded to HEADER_BYTES."""
    text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({channels}, {frames}), }}"
    padded = text.ljust(HEADER_BYTES - 10 - 1) + "\n"
    data = b"\x93NUMPY\x01\x00" + len(padded).to_bytes(2, "little") + padded.encode("latin1")
    assert len(data) == HEADER_BYTES
    return data


class NpyAudio:
    """A read-only (channels, frames) float32 `.npy` that serves windows on demand.

    Slicing `audio[:, a:b]` returns an array, so code written for in-memory arrays (the encoder)
    accepts it unchanged.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        with open(self.path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(handle)
            self._data_offset = handle.tell()
        if fortran or np.dtype(dtype) != DTYPE or len(shape) != 2:
            raise ValueError(f"{self.path} is not a C-ordered float32 (channels, frames) array")
        self.channels, self.frames = int(shape[0]), int(shape[1])
        self._fd = os.open(self.path, os.O_RDONLY)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.channels, self.frames)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Frames [start, stop) of every channel; zeros where the range lies outside the file."""
        out = np.zeros((self.channels, max(0, stop - start)), dtype=np.float32)
        lo, hi = max(0, start), min(self.frames, stop)
        if hi > lo:
            for channel in range(self.channels):
                offset = self._data_offset + (channel * self.frames + lo) * 4
                out[channel, lo - start : hi - start] = _pread_f32(self._fd, offset, hi - lo)
        return out

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        rows, cols = key
        start, stop, step = cols.indices(self.frames)
        if step != 1:
            raise IndexError("only contiguous frame ranges are supported")
        return self.read(start, stop)[rows]

    def windows(self, size: int) -> list[tuple[int, int]]:
        return [(s, min(self.frames, s + size)) for s in range(0, self.frames, size)]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pread_f32(fd: int, offset: int, count: int) -> np.ndarray:
    data = bytearray(count * 4)
    view = memoryview(data)
    done = 0
    while done < len(data):
        chunk = os.preadv(fd, [view[done:]], offset + done)
        if chunk <= 0:
            raise OSError(f"unexpected end of file at byte {offset + done}")
        done += chunk
    return np.frombuffer(data, dtype=DTYPE)


class NpyOutput:
    """A (channels, frames) float32 `.npy` of known length, written (or summed into) window by window."""

    def __init__(self, path: str | Path, channels: int, frames: int) -> None:
        self.path = str(path)
        self.channels, self.frames = channels, frames
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self._fd, header(channels, frames), 0)
        os.ftruncate(self._fd, HEADER_BYTES + channels * frames * 4)  # sparse: reads as zeros

    def _offset(self, channel: int, start: int) -> int:
        return HEADER_BYTES + (channel * self.frames + start) * 4

    def write(self, start: int, block: np.ndarray) -> None:
        for channel in range(self.channels):
            data = np.ascontiguousarray(block[channel], dtype=DTYPE).tobytes()
            _pwrite_all(self._fd, data, self._offset(channel, start))

    def add(self, start: int, block: np.ndarray) -> None:
        """Sum `block` into frames [start, start + n): how passes of a bag of models or shifts combine."""
        for channel in range(self.channels):
            current = _pread_f32(self._fd, self._offset(channel, start), block.shape[1])
            data = (current + block[channel].astype(np.float32)).astype(DTYPE).tobytes()
            _pwrite_all(self._fd, data, self._offset(channel, start))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


class NpyAppender:
    """Writes a stereo float32 `.npy` whose length is unknown until the end (a decoder's output).

    Channel 0 goes straight into the target after a fixed-size header, channel 1 into a side
    file appended at `finish`; nothing is held in memory beyond the block being written.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.frames = 0
        self._side_path = self.path.with_name(self.path.name + ".ch1")
        self._main = open(self.path, "wb")  # noqa: SIM115 - held open until finish() or abort()
        self._main.write(header(2, 0))
        self._side = open(self._side_path, "wb")  # noqa: SIM115 - held open until finish() or abort()

    def append(self, block: np.ndarray) -> None:
        """Append (1 or 2, n) samples; mono is duplicated into both channels, as Demucs does."""
        left = block[0]
        right = block[1] if block.shape[0] > 1 else block[0]
        self._main.write(np.ascontiguousarray(left, dtype=DTYPE).tobytes())
        self._side.write(np.ascontiguousarray(right, dtype=DTYPE).tobytes())
        self.frames += block.shape[1]

    def bytes_on_disk(self) -> int:
        """Bytes written so far, both channels' files together (flushed first): the scratch this decode holds."""
        for handle in (self._main, self._side):
            handle.flush()
        return os.fstat(self._main.fileno()).st_size + os.fstat(self._side.fileno()).st_size

    def finish(self) -> int:
        self._side.close()
        with open(self._side_path, "rb") as side:
            shutil.copyfileobj(side, self._main, _COPY_BYTES)
        self._main.seek(0)
        self._main.write(header(2, self.frames))
        self._main.close()
        self._side_path.unlink()
        return self.frames

    def abort(self) -> None:
        for handle in (self._main, self._side):
            handle.close()
        self._side_path.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is not None:
            self.abort()
