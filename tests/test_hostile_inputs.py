"""Hostile sources meet real components: a loopback listener that counts connections, FIFOs, sockets, symbolic
link loops, folders an unprivileged user cannot read, a decompression bomb and absurd sample values.

Nothing is mocked. Calls that could block forever run in daemon threads with a deadline, so a regression fails
the test instead of hanging the suite.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest

from tasks.core.errors import DecodeError, FetchError, InvalidAudioError
from tasks.core.settings import Limits
from tasks.io.faults import is_transient
from tasks.io.hashcopy import copy_hashed_guarded
from tasks.io.npyfile import HEADER_BYTES, NpyAppender
from tasks.io.sources import expand_sources
from tasks.io.web.policy import ALLOWED_SCHEMES_ENV
from tasks.steps.decode import DecodedTooLongError, decode, decode_blocks, frame_limit
from tasks.steps.fetch import fetch
from tasks.steps.validate import probe
from tests.helpers.audiogen import audio_file, write_audio
from tests.helpers.hostile import (
    BLOCKED_S,
    SR,
    CountingListener,
    bounded,
    hidden_length_flac,
    release_fifo,
)

NOBODY = 65534


# -- helpers ---------------------------------------------------------------------------------------


@pytest.fixture
def listener() -> Iterator[CountingListener]:
    server = CountingListener()
    try:
        yield server
    finally:
        server.close()


# -- 1. one URL policy for every remote source ---------------------------------------------------------


def hostile_sources(port: int) -> list[str]:
    return [
        f"ftp://127.0.0.1:{port}/a.mp3",
        f"zip://x.wav::http://127.0.0.1:{port}/a.zip",
        f"tar://x.wav::http://127.0.0.1:{port}/a.tar",
        f"simplecache::http://127.0.0.1:{port}/a.wav",
        f"s3://bucket/a.wav::http://127.0.0.1:{port}/b.wav",
        f"http://127.0.0.1:{port}/a.zip::zip://x.wav",
        "memory://stemworks-test/a.wav",
    ]


def test_other_schemes_and_chained_urls_are_refused_before_any_connection(
    listener: CountingListener, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Private addresses allowed: what refuses these must be the scheme and chain rule, not the address policy.
    monkeypatch.setenv("STEMWORKS_ALLOW_PRIVATE_URLS", "1")
    monkeypatch.delenv(ALLOWED_SCHEMES_ENV, raising=False)
    sources = hostile_sources(listener.port)

    expanded = bounded(lambda: expand_sources(sources))
    assert expanded.tracks == []
    reasons = dict(expanded.problems)
    assert set(reasons) == set(sources)
    assert "URL scheme 'ftp' is not allowed" in reasons[sources[0]]
    assert "URL scheme 'memory' is not allowed" in reasons[sources[-1]]
    for source in sources[1:-1]:
        assert reasons[source] == "refused: chained URLs ('::') are not allowed as sources"

    for source in sources:  # at fetch too: a separate-track run gets its source without any expansion
        error = bounded(partial(fetch, source, tmp_path, Limits()))
        assert isinstance(error, FetchError), error
        assert error.reason.startswith("refused: ") and not error.retryable and not is_transient(error)
    assert listener.close() == 0, "a refused source reached the loopback listener"


def test_an_operator_can_allow_another_scheme_through_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    memory = fsspec.filesystem("memory")
    song = audio_file(tmp_path, "song.wav", seconds=0.3)
    memory.pipe_file("/stemworks-test/song.wav", song.read_bytes())
    try:
        monkeypatch.delenv(ALLOWED_SCHEMES_ENV, raising=False)
        assert expand_sources(["memory://stemworks-test/"]).tracks == []
        monkeypatch.setenv(ALLOWED_SCHEMES_ENV, "gcs, memory")
        (track,) = expand_sources(["memory://stemworks-test/"]).tracks
        assert track.startswith("memory://") and track.endswith("/stemworks-test/song.wav")
        fetched = fetch(track, tmp_path, Limits())
        assert Path(fetched.local_path).read_bytes() == song.read_bytes()
    finally:
        memory.rm("/stemworks-test", recursive=True)


# -- 2. special files never block a run; every wait has a limit --------------------------------------------


def test_special_files_in_a_library_are_reported_at_expansion(tmp_path: Path) -> None:
    library = tmp_path / "library"
    good = audio_file(library, "good.wav", seconds=0.3)
    os.mkfifo(library / "x.wav")
    with socket.socket(socket.AF_UNIX) as unix:
        unix.bind(str(library / "socket.wav"))  # the socket file stays after the socket closes
    os.symlink("/dev/null", library / "null.wav")  # a character device, through a link

    expanded = bounded(lambda: expand_sources([str(library), str(library / "x.wav"), str(library / "*.wav")]))
    assert expanded.tracks == [str(good)]
    problems = set(expanded.problems)
    assert (str(library / "x.wav"), "not a regular file (FIFO)") in problems
    assert (str(library / "socket.wav"), "not a regular file (socket)") in problems
    assert (str(library / "null.wav"), "not a regular file (character device)") in problems


def test_a_file_swapped_for_a_fifo_after_expansion_is_refused_without_blocking(tmp_path: Path) -> None:
    path = audio_file(tmp_path, "song.wav", seconds=0.3)
    info = probe(path, Limits())
    assert expand_sources([str(path)]).tracks == [str(path)]
    path.unlink()
    os.mkfifo(path)
    work = tmp_path / "work"
    work.mkdir()
    try:
        error = bounded(lambda: fetch(str(path), work, Limits()))
        assert isinstance(error, FetchError), error
        assert error.reason == "cannot read source: not a regular file (FIFO)" and not error.retryable
        error = bounded(lambda: probe(path, Limits()))
        assert isinstance(error, InvalidAudioError) and error.reason == "not a regular file (FIFO)"
        error = bounded(lambda: decode(path, info, SR, Limits(), work))
        assert isinstance(error, DecodeError) and error.reason == "not a regular file (FIFO)"
    finally:
        release_fifo(path)


def test_a_source_that_stops_sending_fails_the_fetch_attempt_as_transient(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair()
    theirs.sendall(b"x" * 1000)  # a little data, then silence
    target = tmp_path / "copy"
    try:
        started = time.monotonic()
        error = bounded(
            lambda: copy_hashed_guarded(
                lambda: ours.makefile("rb"), target, 1 << 20, lambda: AssertionError("no limit here"), stall_s=0.5
            )
        )
        assert isinstance(error, TimeoutError) and "no data from the source for 0.5 s" in str(error)
        assert is_transient(error) and time.monotonic() - started < BLOCKED_S
        assert not target.exists()
    finally:
        theirs.close()  # the reading thread, still waiting, now meets the end of the stream and ends
        ours.close()


def test_decoding_has_a_time_limit(tmp_path: Path) -> None:
    path = audio_file(tmp_path, "song.wav", seconds=1.0)
    info = probe(path, Limits())
    with pytest.raises(DecodeError, match="decoding took longer than 0 s"):
        list(decode_blocks(path, info, SR, Limits(), timeout_s=0.0))


# -- 3. what is permanent is not retried ---------------------------------------------------------------------


def test_symlink_loops_fail_at_once_and_are_never_retried(tmp_path: Path) -> None:
    library = tmp_path / "library"
    library.mkdir()
    os.symlink("self.wav", library / "self.wav")
    os.symlink("b.wav", library / "a.wav")
    os.symlink("a.wav", library / "b.wav")
    expanded = expand_sources([str(library)])
    assert expanded.tracks == [str(library / name) for name in ("a.wav", "b.wav", "self.wav")]
    for track in expanded.tracks:
        error = bounded(partial(fetch, track, tmp_path, Limits()))
        assert isinstance(error, FetchError), error
        assert error.reason == "cannot read source: Too many levels of symbolic links"
        assert not error.retryable and not is_transient(error)
    assert not is_transient(OSError(errno.ELOOP, os.strerror(errno.ELOOP)))
    assert not is_transient(PermissionError(errno.EACCES, os.strerror(errno.EACCES)))
    assert is_transient(OSError(errno.EIO, os.strerror(errno.EIO)))  # an I/O error may pass


def as_unprivileged(call: Callable[[], Any]) -> Any:
    """`call()` in a forked child that runs as `nobody` when the tests run as root (root reads any folder,
    whatever its mode); as the current user otherwise. Returns what it returned, or raises what it raised."""
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)

    def child() -> None:
        try:
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            sender.send(("value", call()))
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            sender.send(("error", repr(exc)))

    process = context.Process(target=child, daemon=True)
    process.start()
    try:
        assert receiver.poll(BLOCKED_S), f"the unprivileged child gave no answer in {BLOCKED_S:g} s"
        kind, value = receiver.recv()
    finally:
        process.join(5)
        if process.is_alive():
            process.kill()
    assert kind == "value", value
    return value


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A folder `nobody` can reach (pytest's own tmp_path sits under a folder private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="stemworks-test-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _expand_and_fetch(library: Path, unreadable_file: Path, work: Path) -> dict[str, Any]:
    expanded = expand_sources([str(library)])
    error = bounded(lambda: fetch(str(unreadable_file), work, Limits()))
    assert isinstance(error, FetchError), error
    return {"tracks": expanded.tracks, "problems": expanded.problems, "fetch": (error.reason, error.retryable)}


@pytest.mark.slow  # a forked child, unprivileged when the tests run as root
def test_unreadable_folders_and_files_fail_with_the_reason(reachable_dir: Path) -> None:
    library = reachable_dir / "library"
    good = audio_file(library, "good.wav", seconds=0.3)
    locked = library / "locked"
    audio_file(locked, "inside.wav", seconds=0.3)
    secret = audio_file(library, "secret.wav", seconds=0.3)
    work = reachable_dir / "work"
    work.mkdir(mode=0o777)
    work.chmod(0o777)
    locked.chmod(0)
    secret.chmod(0)
    try:
        found = as_unprivileged(lambda: _expand_and_fetch(library, secret, work))
    finally:
        locked.chmod(0o755)
    assert found["tracks"] == [str(good), str(secret)]
    assert found["problems"] == [(str(locked), f"cannot read folder {locked}: Permission denied")]
    assert found["fetch"] == ("cannot read source: Permission denied", False)


# -- 4. a decompression bomb stops at the limit, with scratch bounded by it -------------------------------


def test_a_decompression_bomb_stops_at_the_limit_with_bounded_scratch(tmp_path: Path) -> None:
    bomb = hidden_length_flac(tmp_path / "bomb.flac", seconds=60.0)
    assert bomb.stat().st_size < 32 * 1024  # a minute of silence, small on disk
    limits = Limits(max_seconds=2.0)
    info = probe(bomb, limits)  # the header claims nothing, so validation lets it through
    assert info.seconds < limits.max_seconds

    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(InvalidAudioError, match="decoded audio runs past the limit of 2 s") as caught:
        decode(bomb, info, SR, limits, work)
    assert caught.value.step == "decode" and not caught.value.retryable
    assert list(work.iterdir()) == []  # the scratch files are gone with the failure

    # The same blocks into the same writer, measuring the scratch on disk when decoding stops.
    writer = NpyAppender(work / "mixture.npy")
    largest_block = 0
    try:
        with pytest.raises(DecodedTooLongError):
            for block in decode_blocks(bomb, info, SR, limits):
                writer.append(block)
                largest_block = max(largest_block, block.shape[1])
        on_disk = writer.bytes_on_disk()
    finally:
        writer.abort()
    limit = frame_limit(limits, SR)
    assert limit - largest_block < writer.frames <= limit  # stopped at the first block past the limit
    assert on_disk <= limit * 2 * 4 + HEADER_BYTES  # a block past the limit is never written


# -- 5. absurd sample values ---------------------------------------------------------------------------------


def test_absurd_sample_values_are_refused_at_decode(tmp_path: Path) -> None:
    absurd = write_audio(tmp_path / "absurd.wav", np.full((2, SR // 2), 1e30, np.float32), SR, "wavf32")
    info = probe(absurd, Limits())
    with pytest.raises(DecodeError, match=r"sample peak \+600 dBFS .* out of range \(the limit is \+60 dBFS\)"):
        decode(absurd, info, SR, Limits(), tmp_path)
    hot = write_audio(tmp_path / "hot.wav", np.full((2, SR // 2), 2.0, np.float32), SR, "wavf32")
    decoded = decode(hot, probe(hot, Limits()), SR, Limits(), tmp_path)  # +6 dBFS float audio is still audio
    assert decoded.frames == SR // 2
