"""A whole library run over hostile files, under a real Prefect API with the tiny real-architecture model.

A FIFO, a symbolic link loop, a decompression bomb, absurd sample values and a file name that is not UTF-8
sit beside an ordinary song: the run ends, each bad file fails alone at its step with its reason, and the
odd name is separated, published, recorded and skipped on the next run like any other.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest

from catalog.rebuild import rebuild
from flows.library import separate_library
from tasks.core.settings import Limits, OutputSettings, SeparationSettings
from tests.helpers.audiogen import audio_file, write_audio
from tests.helpers.constants import MODEL_NAME
from tests.helpers.hostile import hidden_length_flac, release_fifo

pytestmark = [pytest.mark.slow, pytest.mark.prefect_server, pytest.mark.usefixtures("prefect_harness")]
NAME = b"caf\xe9.wav"
SHOWN = "caf\\xe9.wav"
LIMITS = Limits(max_seconds=10.0)


def run_library(music: Path, out: Path, catalog: Path, model_repo: Path) -> Any:
    """The run's summary, also when tracks failed (the flow then raises an error that carries it)."""
    try:
        return separate_library(
            [str(music)],
            separation=SeparationSettings(model=MODEL_NAME, model_repo=str(model_repo), shifts=0),
            output=OutputSettings(out=str(out)),
            limits=LIMITS,
            catalog=str(catalog),
        )
    except Exception as exc:
        summary = getattr(exc, "summary", None)
        if summary is None:
            raise
        return summary


def test_hostile_files_fail_alone_and_an_odd_name_is_processed_and_recorded(tmp_path: Path, model_repo: Path) -> None:
    music, out, catalog = tmp_path / "music", tmp_path / "stems", tmp_path / "catalog.duckdb"
    audio_file(music, "good.wav", seconds=1.0, seed=1)
    odd = os.path.join(os.fsencode(music), NAME)
    os.rename(audio_file(music, "odd.wav", seconds=1.0, seed=2), odd)
    os.mkfifo(music / "x.wav")
    os.symlink("loop.wav", music / "loop.wav")
    hidden_length_flac(music / "bomb.flac", seconds=60.0)
    write_audio(music / "absurd.wav", np.full((2, 44100), 1e30, np.float32), 44100, "wavf32")

    started = time.monotonic()
    try:
        summary = run_library(music, out, catalog, model_repo)
    finally:
        release_fifo(music / "x.wav")  # only a regression leaves a reader blocked on it
    by_name = {Path(t.source).name: t for t in summary.tracks}
    assert by_name["good.wav"].status == "succeeded" and by_name[SHOWN].status == "succeeded"
    expected = {
        "x.wav": ("expand", "not a regular file (FIFO)"),
        "loop.wav": ("fetch", "cannot read source: Too many levels of symbolic links"),
        "bomb.flac": ("decode", "decoded audio runs past the limit of 10 s"),
        "absurd.wav": ("decode", "sample peak +600 dBFS"),
    }
    for name, (step, reason) in expected.items():
        track = by_name[name]
        assert (track.status, track.error_step) == ("failed", step) and reason in (track.error or ""), track
    assert time.monotonic() - started < 300  # a blocking FIFO or retried loops would stall here

    with duckdb.connect(str(catalog), read_only=True) as con:
        source, origin, manifest_uri = con.execute(
            "SELECT source, origin, manifest_uri FROM tracks WHERE source LIKE ?", [f"%{SHOWN}"]
        ).fetchone() or (None, None, None)
        fetch_s = con.execute("SELECT fetch_s FROM tracks WHERE source LIKE '%loop.wav'").fetchone()
    assert source == f"{music}/{SHOWN}"
    assert json.loads(origin)["path_bytes_hex"] == odd.hex()
    assert fetch_s is not None and fetch_s[0] < 2.0  # failed at once: the first retry would wait 2 s
    manifest = json.loads(Path(manifest_uri).read_bytes().decode("utf-8"))
    assert manifest["source"] == source and manifest["origin"]["path_bytes_hex"] == odd.hex()

    again = run_library(music, out, catalog, model_repo)  # the odd name's manifest reads back: skipped
    assert {Path(t.source).name: t.status for t in again.tracks}[SHOWN] == "skipped"

    rebuilt = tmp_path / "rebuilt.duckdb"
    report = rebuild(str(out), rebuilt)
    assert (report.tracks, report.skipped) == (2, [])
    with duckdb.connect(str(rebuilt), read_only=True) as con:
        assert con.execute("SELECT origin FROM tracks WHERE source = ?", [source]).fetchone() == (origin,)
